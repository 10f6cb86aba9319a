"""What a saved adapter holds, layer by layer: sizes, parameters, rotation angles and scales.

Reads the adapter directory alone (no base model): every RoAd layer's `road_theta` / `road_alpha`
pair, with the layer's output width recovered from the variant (road_1 stores d/2 values per
layer, road_2 d, road_4 2d). Per feature group the statistics follow the layout of
`functional.coefficients`, which keeps each group's entries contiguous. Values that cannot be served
(NaN, infinite, degenerate rotations: `functional.value_problem`), the mark of a diverged training,
are reported per layer and by `AdapterReport.value_problem`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .. import checkpoint as ckpt
from ..config import RoadConfig
from ..errors import InputError
from ..functional import out_features_for, parameter_length, value_problem
from ..messages import some_of

THETA, ALPHA = ".road_theta", ".road_alpha"


@dataclass(frozen=True)
class LayerStats:
    """One RoAd layer of a saved adapter. Angles are in degrees; `*_by_group` have one entry per group."""

    module: str
    variant: str
    group_size: int
    out_features: int
    parameters: int
    mean_abs_angle: float
    alpha_min: float
    alpha_max: float
    angle_by_group: list[float]
    alpha_by_group: list[float]
    problem: Optional[str] = None  # why its values cannot be served (`functional.value_problem`), or None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of each of the layer's `road_theta` and `road_alpha`."""
        return (parameter_length(self.variant, self.out_features),)


@dataclass(frozen=True)
class AdapterReport:
    """A saved adapter: its config, its RoAd layers, and how many further (modules_to_save) values it holds."""

    config: RoadConfig
    layers: list[LayerStats]
    other_parameters: int
    other_non_finite: list[str] = field(default_factory=list)  # modules_to_save tensors with NaN or inf values

    @property
    def parameters(self) -> int:
        return sum(layer.parameters for layer in self.layers) + self.other_parameters

    def value_problem(self) -> Optional[str]:
        """Why roadkit would refuse to load this adapter's values (NaN, infinite or degenerate), or None."""
        bad = [layer for layer in self.layers if layer.problem]
        parts = []
        if bad:
            parts.append(
                f"unusable values in {len(bad)} of its {len(self.layers)} RoAd layers, "
                f"first in {bad[0].module}: {bad[0].problem}"
            )
        if self.other_non_finite:
            parts.append(f"NaN or infinite values in {some_of(self.other_non_finite, 'modules_to_save tensors')}")
        return "; ".join(parts) or None


def inspect_adapter(directory: Union[str, os.PathLike]) -> AdapterReport:
    """Per-layer statistics of the adapter saved in `directory`."""
    config, tensors = ckpt.read_adapter(directory)
    layers, other, non_finite = [], 0, []
    for key in sorted(tensors, key=_natural):
        if key.endswith(THETA):
            path = key[len(ckpt.KEY_PREFIX) : -len(THETA)]
            alpha_key = key[: -len(THETA)] + ALPHA
            if alpha_key not in tensors:
                raise InputError(f"{os.fspath(directory)}: {key} has no matching {alpha_key}.")
            layers.append(_layer_stats(path, config, tensors[key], tensors[alpha_key]))
        elif not key.endswith(ALPHA):
            other += tensors[key].numel()
            if tensors[key].is_floating_point() and not bool(torch.isfinite(tensors[key]).all()):
                non_finite.append(key[len(ckpt.KEY_PREFIX) :] if key.startswith(ckpt.KEY_PREFIX) else key)
    if not layers:
        raise InputError(f"{os.fspath(directory)}: the adapter holds no RoAd layers (no *{THETA} tensors).")
    return AdapterReport(config, layers, other, non_finite)


def _natural(key: str) -> list:
    """Sort key that orders "layers.2" before "layers.10"."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


def _layer_stats(path: str, config: RoadConfig, theta: torch.Tensor, alpha: torch.Tensor) -> LayerStats:
    theta, alpha = theta.detach().double().flatten(), alpha.detach().double().flatten()
    out_features = out_features_for(config.variant, theta.numel())
    groups = max(1, out_features // config.group_size)
    if theta.numel() % groups or theta.shape != alpha.shape:
        raise InputError(
            f"layer {path}: road_theta {tuple(theta.shape)} / road_alpha {tuple(alpha.shape)} do "
            f"not fit variant {config.variant} with group_size {config.group_size}."
        )
    problem = value_problem(config.variant, config.group_size, theta, alpha)
    degrees = torch.rad2deg(theta.abs())
    return LayerStats(
        module=path,
        variant=config.variant,
        group_size=config.group_size,
        out_features=out_features,
        parameters=theta.numel() + alpha.numel(),
        mean_abs_angle=float(degrees.mean()),
        alpha_min=float(alpha.min()),
        alpha_max=float(alpha.max()),
        angle_by_group=degrees.view(groups, -1).mean(1).tolist(),
        alpha_by_group=alpha.view(groups, -1).mean(1).tolist(),
        problem=problem,
    )


def format_table(report: AdapterReport) -> str:
    """A plain-text table, one row per layer (a "!" after the name of a layer whose values cannot be served),
    and a totals line."""
    header = ("layer", "d_out", "theta/alpha", "variant", "group", "params", "mean |theta| deg", "alpha range")
    rows = [
        (
            s.module + (" !" if s.problem else ""),
            str(s.out_features),
            "x".join(map(str, s.shape)),
            s.variant,
            str(s.group_size),
            f"{s.parameters:,d}",
            f"{s.mean_abs_angle:.3f}",
            f"{s.alpha_min:.4f} .. {s.alpha_max:.4f}",
        )
        for s in report.layers
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {1, 2, 4, 5, 6}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(header), "  ".join("-" * w for w in widths), *map(line, rows)]
    angles = [s.mean_abs_angle for s in report.layers]
    summary = (
        f"{len(report.layers)} RoAd layers, {report.parameters:,d} parameters, mean |theta| "
        f"{sum(angles) / len(angles):.3f} deg (max layer {max(angles):.3f})"
    )
    if report.other_parameters:
        summary += f"; {report.other_parameters:,d} of them in modules_to_save"
    out.append(summary)
    problem = report.value_problem()
    if problem:
        out.append(f"! cannot be served: {problem} (the training that wrote it probably diverged)")
    return "\n".join(out)


def plot_report(report: AdapterReport, path: Union[str, os.PathLike], title: str = "") -> None:
    """Heatmaps of mean |theta| and mean alpha by layer and feature group, as a PNG."""
    from .plots import adapter_heatmap

    layers = report.layers
    adapter_heatmap(
        [s.module for s in layers],
        [s.angle_by_group for s in layers],
        [s.alpha_by_group for s in layers],
        path,
        title=title or f"{report.config.variant}, group_size {report.config.group_size}",
    )
