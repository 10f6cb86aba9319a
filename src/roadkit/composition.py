"""Composing RoAd adapters into one new adapter, without training.

Every RoAd adapter is, per layer, a block-diagonal product of 2x2 rotation-scalings, so adapters
combine in closed form:

- "sequential": apply a, then b. Per pair, the 2x2 product. road_1 x road_1 stays road_1 (angles
  add, scales multiply); anything else becomes road_2, whose per-feature (alpha, theta) is the polar
  form of any (c, s), so the product is represented exactly.
- "union": adapters that own disjoint pairs (see `RoadConfig.subspace`) merge into one; each pair
  comes from the adapter that owns it. Overlaps are an error that lists them.
- "interpolate": a weighted sum of angles and of log-scales (alpha = prod alpha_i ** w_i), in the
  largest variant among the inputs. Weight 0.5 on one adapter halves its rotation angles. A negative
  scale is read as what it is, its magnitude with the angle turned by pi (wrapped into [-pi, pi)).

A layer an adapter does not target counts as the identity for it. `compose_adapters` works on
saved adapters alone (configs and PEFT-keyed tensors, no model): the CLI's `roadkit compose`.
`compose` does the same for adapters loaded in a `RoadModel` and adds the result to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import checkpoint as ckpt
from . import functional as rf
from .config import VARIANTS, RoadConfig
from .errors import InputError
from .model import RoadModel
from .subspace import entries_of, features_of, outside_count, pairs_of

MODES = ("sequential", "union", "interpolate")
_Params = tuple[torch.Tensor, torch.Tensor]
_PARAMS = ("road_theta", "road_alpha")


@dataclass(frozen=True)
class SavedAdapter:
    """One input to a composition: a name (for messages), its config and its tensors under PEFT's keys."""

    name: str
    config: RoadConfig
    tensors: dict[str, torch.Tensor]


def compose(
    model: RoadModel,
    adapters: Sequence[str],
    new_name: str,
    mode: str = "sequential",
    weights: Optional[Sequence[float]] = None,
) -> RoadConfig:
    """Add `new_name` to `model`: the composition of its `adapters` (in order) by `mode`.

    The new adapter is added inactive (activate it with `model.set_adapter`); its config is returned.
    Everything is checked before the model changes.
    """
    if not isinstance(model, RoadModel):
        raise TypeError(f"compose needs a roadkit RoadModel, got {type(model).__name__}.")
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    model.check_adapter_names(names)
    model.check_new_adapter_name(new_name)
    inputs = [SavedAdapter(n, model.peft_config[n], model.adapter_state_dict(n)) for n in names]
    config, tensors = compose_adapters(inputs, mode, weights)
    model.add_adapter(new_name, config, state_dict=tensors)
    return config


def compose_adapters(
    adapters: Sequence[SavedAdapter], mode: str = "sequential", weights: Optional[Sequence[float]] = None
) -> tuple[RoadConfig, dict[str, torch.Tensor]]:
    """The composition of saved adapters (in order) by `mode`: its config and tensors (PEFT keys)."""
    if mode not in MODES:
        raise InputError(f"compose mode={mode!r} is not supported; allowed: {', '.join(MODES)}.")
    adapters = list(adapters)
    if not adapters:
        raise InputError("compose needs at least one adapter.")
    w = _check_weights(mode, weights, len(adapters))
    saving = [a.name for a in adapters if a.config.modules_to_save or any(not k.endswith(_PARAMS) for k in a.tensors)]
    if saving:
        raise InputError(
            f"adapters {saving} train whole modules (modules_to_save), which have no rotation to "
            "compose; compose adapters without modules_to_save."
        )
    sizes = {a.name: a.config.group_size for a in adapters}
    if len(set(sizes.values())) > 1:
        raise InputError(f"compose needs adapters with one group_size (their pairs must coincide); got {sizes}.")
    g = adapters[0].config.group_size
    layers = _layers(adapters)
    _check_inside_subspaces(adapters, layers)

    if mode == "sequential":
        variant = "road_1" if all(a.config.variant == "road_1" for a in adapters) else "road_2"
    elif mode == "union":
        _check_disjoint(adapters, layers)
        same = len({a.config.variant for a in adapters}) == 1
        variant = adapters[0].config.variant if same else "road_2"
    else:
        variant = max((a.config.variant for a in adapters), key=VARIANTS.index)
    # Every mode leaves the pairs that no input owns at the identity.
    specs = [a.config.subspace for a in adapters if a.config.subspace is not None]
    subspace = None if len(specs) < len(adapters) else _union_spec(specs)

    by_position = w or [0.0] * len(adapters)  # weights: only interpolate has them, and reads them
    tensors: dict[str, torch.Tensor] = {}
    for path, d_out in layers.items():
        present = [
            (a, wi)
            for a, wi in zip(adapters, by_position, strict=True)
            if ckpt.adapter_key(path, "road_theta") in a.tensors
        ]
        if mode == "sequential":
            theta, alpha = _sequential(path, [a for a, _ in present], d_out, variant, g)
        elif mode == "union":
            theta, alpha = _union(path, [a for a, _ in present], d_out, variant, g)
        else:  # weights by position: an adapter given twice counts with both its weights
            theta, alpha = _interpolate(path, present, variant, g)
        dtype = present[0][0].tensors[ckpt.adapter_key(path, "road_theta")].dtype
        tensors[ckpt.adapter_key(path, "road_theta")] = theta.to(dtype)
        tensors[ckpt.adapter_key(path, "road_alpha")] = alpha.to(dtype)

    first = adapters[0].config
    config = RoadConfig(
        variant=variant,
        group_size=g,
        target_modules=sorted(layers),
        subspace=subspace,
        base_model_name_or_path=first.base_model_name_or_path,
        task_type=first.task_type,
        inference_mode=True,
    )
    return config, tensors


def _layers(adapters: Sequence[SavedAdapter]) -> dict[str, int]:
    """Every layer path any adapter targets, with its output size (read off the tensor lengths, which
    must agree between adapters: they must be adapters of one base model)."""
    out: dict[str, int] = {}
    seen: dict[str, str] = {}
    for a in adapters:
        for key, t in a.tensors.items():
            if not key.endswith(".road_theta"):
                continue
            path, d_out = (
                key[len(ckpt.KEY_PREFIX) : -len(".road_theta")],
                rf.out_features_for(a.config.variant, t.numel()),
            )
            rf.check_group_size(d_out, a.config.group_size, where=f"adapter {a.name!r}, layer {path}")
            if out.setdefault(path, d_out) != d_out:
                raise InputError(
                    f"adapters {seen[path]!r} and {a.name!r} disagree on the size of layer {path} "
                    f"({out[path]} vs {d_out} features): they were trained on different base models."
                )
            seen.setdefault(path, a.name)
    return dict(sorted(out.items()))


def _check_inside_subspaces(adapters: Sequence[SavedAdapter], layers: dict[str, int]) -> None:
    """Refuse tensors that move pairs outside their adapter's declared subspace (as loading does)."""
    for a in adapters:
        for path, d_out in layers.items():
            key = ckpt.adapter_key(path, "road_theta")
            if a.config.subspace is None or key not in a.tensors:
                continue
            if outside_count(
                a.config.subspace, a.config.variant, a.config.group_size, d_out, *_params64(a, path), where=path
            ):
                raise InputError(
                    f"adapter {a.name!r} has subspace={a.config.subspace} but is not the identity outside it in {path}."
                )


def _check_weights(mode: str, weights: Optional[Sequence[float]], n: int) -> list[float]:
    if mode != "interpolate":
        if weights is not None:
            raise InputError(f"weights apply only to mode='interpolate', not mode={mode!r}.")
        return []
    if weights is None:
        return [1.0 / n] * n
    w = list(weights)
    if (
        len(w) != n
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)
        or not all(math.isfinite(x) for x in w)
    ):
        raise InputError(f"interpolate needs one finite number per adapter ({n}), got weights={weights!r}.")
    return [float(x) for x in w]


def _params64(a: SavedAdapter, path: str) -> _Params:
    theta, alpha = (a.tensors[ckpt.adapter_key(path, p)].detach().to(torch.float64) for p in _PARAMS)
    return theta, alpha


def _coefficients64(a: SavedAdapter, path: str) -> rf.Coefficients:
    return rf.coefficients(a.config.variant, a.config.group_size, *_params64(a, path))


def _sequential(path: str, adapters: list[SavedAdapter], d_out: int, variant: str, g: int) -> _Params:
    if variant == "road_1":  # the product of same-pair rotations: angles add, scales multiply
        params = [_params64(a, path) for a in adapters]
        theta = sum((t for t, _ in params), torch.zeros((), dtype=torch.float64))
        return theta, torch.stack([a for _, a in params]).prod(0)
    acc = rf.identity(d_out, dtype=torch.float64, device=_device(adapters[0], path))
    for a in adapters:
        acc = rf.compose(acc, _coefficients64(a, path), g)
    return rf.polar(acc)


def _device(a: SavedAdapter, path: str) -> torch.device:
    return a.tensors[ckpt.adapter_key(path, "road_theta")].device


def _check_disjoint(adapters: Sequence[SavedAdapter], layers: dict[str, int]) -> None:
    overlaps = []
    for path, d_out in layers.items():
        owned: dict[int, str] = {}
        for a in adapters:
            if ckpt.adapter_key(path, "road_theta") not in a.tensors:
                continue
            pairs = pairs_of(a.config.subspace, d_out // 2, path).tolist()
            clash = sorted(p for p in pairs if p in owned)
            if clash:
                shown = ", ".join(map(str, clash[:8])) + (f" ... ({len(clash)} pairs)" if len(clash) > 8 else "")
                overlaps.append(f"{path}: {owned[clash[0]]!r} and {a.name!r} share pairs {shown}")
            owned.update(dict.fromkeys(pairs, a.name))
    if overlaps:  # the first few layers, one per line, and a count of the rest
        more = [f"... and {len(overlaps) - 5} more layers"] if len(overlaps) > 5 else []
        raise InputError(
            "union needs adapters in disjoint subspaces (RoadConfig.subspace), but they overlap:\n  "
            + "\n  ".join(overlaps[:5] + more)
        )


def _union(path: str, adapters: list[SavedAdapter], d_out: int, variant: str, g: int) -> _Params:
    device, n_pairs = _device(adapters[0], path), d_out // 2
    if all(a.config.variant == variant for a in adapters):  # copy each owner's own entries
        n = rf.parameter_length(variant, d_out)
        theta = torch.zeros(n, dtype=torch.float64, device=device)
        alpha = torch.ones(n, dtype=torch.float64, device=device)
        for a in adapters:
            idx = entries_of(variant, g, pairs_of(a.config.subspace, n_pairs)).to(device)
            t, al = _params64(a, path)
            theta[idx], alpha[idx] = t[idx], al[idx]
        return theta, alpha
    c_out, s_out = rf.identity(d_out, dtype=torch.float64, device=device)
    for a in adapters:  # mixed variants: per-feature coefficients, then road_2's polar form
        idx = features_of(pairs_of(a.config.subspace, n_pairs), g).to(device)
        cc, ss = _coefficients64(a, path)
        c_out[idx], s_out[idx] = cc[idx], ss[idx]
    return rf.polar((c_out, s_out))


def _interpolate(path: str, weighted: list[tuple[SavedAdapter, float]], variant: str, g: int) -> _Params:
    theta = alpha_log = torch.zeros((), dtype=torch.float64)  # broadcasts to the parameters' shape
    for a, weight in weighted:
        t, al = _params64(a, path)
        if not bool(torch.isfinite(t).all() and torch.isfinite(al).all()):
            raise InputError(f"adapter {a.name!r} has NaN or infinite values in {path}.")
        if not bool((al != 0).all()):  # counted on the adapter's own entries, before any expansion
            raise InputError(
                f"interpolate works on log-scales, but adapter {a.name!r} has alpha = 0 in {path} "
                f"({int((al == 0).sum())} entries there)."
            )
        # alpha * (cos t, sin t) = |alpha| * (cos, sin)(t + pi): the same entry with a positive scale
        t = torch.where(al < 0, torch.remainder(t, 2 * torch.pi) - torch.pi, t)
        t, al = rf.expand_parameters(t, al.abs(), a.config.variant, variant, g)
        theta = theta + weight * t
        alpha_log = alpha_log + weight * torch.log(al)
    alpha = torch.exp(alpha_log)
    if not bool(torch.isfinite(theta).all() and (torch.isfinite(alpha) & (alpha > 0)).all()):
        weights = [w for _, w in weighted]
        raise InputError(f"interpolating with weights {weights} overflows in {path}; use smaller weights.")
    return theta, alpha


def _union_spec(specs: list[dict]) -> dict:
    """One spec covering every pair of `specs` (the spec itself when they are all the same)."""
    parts: list[dict] = []
    for spec in specs:
        parts.extend(p for p in (spec["union"] if "union" in spec else [spec]) if p not in parts)
    return parts[0] if len(parts) == 1 else {"union": parts}
