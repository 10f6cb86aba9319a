"""Figures as PNG files: training loss curves and adapter heatmaps.

matplotlib is imported only here, when a figure is drawn, and only its object-oriented API is
used (no pyplot): no global backend or figure state changes in the caller's process.
"""

from __future__ import annotations

import io
import math
import os
from typing import Mapping, Sequence

from ..fileio import PathLike, atomic_write_bytes


def _save(fig, path: PathLike) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())


def _smooth(values: Sequence[float], width: int) -> list[float]:
    """Trailing moving average over `width` points."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def loss_curves(
    runs: Mapping[str, Mapping[str, Sequence[Mapping[str, float]]]], path: PathLike, title: str = "training loss"
) -> None:
    """One panel per run: per-step training loss (raw and smoothed) and the eval losses.

    `runs` maps a run name to a training log: {"train": [{"step", "loss"}, ...], "eval": [...]}.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * len(runs), 4.2), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False)[0]
    for ax, (name, log) in zip(axes, runs.items(), strict=True):
        train = log.get("train", [])
        if train:
            steps, losses = [e["step"] for e in train], [e["loss"] for e in train]
            width = len(losses) // 20
            if width > 1:
                ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (per step)")
                ax.plot(steps, _smooth(losses, width), color="tab:blue", label=f"train (mean of {width} steps)")
            else:
                ax.plot(steps, losses, color="tab:blue", label="train")
        evals = log.get("eval", [])
        if evals:
            ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", color="tab:orange", label="held-out")
        ax.set_xlabel("step")
        ax.set_ylabel("mean token loss")
        ax.set_title(name if len(runs) > 1 else title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # an empty log draws no lines, and needs no legend
            ax.legend()
    if len(runs) > 1:
        fig.suptitle(title)
    _save(fig, path)


def adapter_heatmap(
    layers: Sequence[str],
    angles: Sequence[Sequence[float]],
    scales: Sequence[Sequence[float]],
    path: PathLike,
    title: str = "RoAd adapter",
) -> None:
    """Two heatmaps, rows = layers, columns = feature groups: mean |theta| (degrees) and mean alpha.

    Rows may have different lengths (layers of different widths); missing cells stay blank.
    """
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    width = max(len(r) for r in angles)

    def grid(rows: Sequence[Sequence[float]]) -> np.ndarray:
        out = np.full((len(rows), width), np.nan)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    a, s = grid(angles), grid(scales)
    # Capped at 24 inches (2880 pixels): a 30-layer all-linear adapter has 210 rows. Labels shrink to
    # fit their rows, down to 5 points; below that only every k-th row is labelled.
    height = min(2.0 + 0.22 * len(layers), 24.0)
    points_per_row = (height - 1.5) * 72 / len(layers)
    fontsize = min(7.0, max(5.0, 0.8 * points_per_row))
    every = max(1, math.ceil(fontsize / points_per_row))
    fig = Figure(figsize=(13, height), layout="constrained")
    ax_a, ax_s = fig.subplots(1, 2, sharey=True)
    img = ax_a.imshow(a, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0)
    fig.colorbar(img, ax=ax_a, label="mean |theta| (degrees)")
    spread = float(np.nanmax(np.abs(s - 1.0))) if np.isfinite(s).any() else 0.0
    spread = spread if spread > 0 and math.isfinite(spread) else 1e-3
    img = ax_s.imshow(
        s,
        aspect="auto",
        cmap="coolwarm",
        interpolation="nearest",
        norm=TwoSlopeNorm(vcenter=1.0, vmin=1.0 - spread, vmax=1.0 + spread),
    )
    fig.colorbar(img, ax=ax_s, label="mean alpha (1 = no scaling)")
    ax_a.set_yticks(range(0, len(layers), every), _short_names(layers)[::every], fontsize=fontsize)
    ax_a.set_title("rotation angle by feature group")
    ax_s.set_title("scale by feature group")
    for ax in (ax_a, ax_s):
        ax.set_xlabel("feature group")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    _save(fig, path)


def _short_names(paths: Sequence[str]) -> list[str]:
    """Module paths without the dotted prefix they all share ("model.layers."), for narrower labels."""
    if len(paths) < 2:
        return list(paths)
    prefix = os.path.commonprefix(list(paths))
    cut = prefix.rfind(".") + 1
    return [p[cut:] for p in paths]
