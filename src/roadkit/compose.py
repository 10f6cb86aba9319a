"""Composing RoAd adapters into one new adapter, without training.

Every RoAd adapter is, per layer, a block-diagonal product of 2x2 rotation-scalings, so adapters
combine in closed form:

- "sequential": apply a, then b. Per pair, the 2x2 product. road_1 x road_1 stays road_1 (angles
  add, scales multiply); anything else becomes road_2, whose per-feature (alpha, theta) is the polar
  form of any (c, s), so the product is represented exactly.
- "union": adapters that own disjoint pairs (see `RoadConfig.subspace`) merge into one; each pair
  comes from the adapter that owns it. Overlaps are an error that lists them.
- "interpolate": a weighted sum of angles and of log-scales (alpha = prod alpha_i ** w_i), in the
  largest variant among the inputs. Weight 0.5 on one adapter halves its rotation angles.

A layer an adapter does not target counts as the identity for it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import checkpoint as ckpt
from . import functional as F
from .config import VARIANTS, RoadConfig
from .model import RoadModel
from .subspace import entries_of, features_of, pairs_of

MODES = ("sequential", "union", "interpolate")
_Params = tuple[torch.Tensor, torch.Tensor]


def compose(model: RoadModel, adapters: Sequence[str], new_name: str, mode: str = "sequential",
            weights: Optional[Sequence[float]] = None) -> RoadConfig:
    """Add `new_name` to `model`: the composition of `adapters` (in order) by `mode`.

    The new adapter is added inactive (activate it with `model.set_adapter`); its config is returned.
    Everything is checked before the model changes.
    """
    if not isinstance(model, RoadModel):
        raise TypeError(f"compose needs a roadkit RoadModel, got {type(model).__name__}.")
    if mode not in MODES:
        raise ValueError(f"compose mode={mode!r} is not supported; allowed: {', '.join(MODES)}.")
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    if not names:
        raise ValueError("compose needs at least one adapter name.")
    model._check_known(names)
    model._check_new_name(new_name, existing=model.peft_config)
    configs = [model.peft_config[n] for n in names]
    w = _check_weights(mode, weights, len(names))
    saving = [n for n, c in zip(names, configs, strict=True) if c.modules_to_save]
    if saving:
        raise ValueError(f"adapters {saving} train whole modules (modules_to_save), which have no rotation to "
                         "compose; compose adapters without modules_to_save.")
    sizes = sorted({c.group_size for c in configs})
    if len(sizes) > 1:
        raise ValueError(f"compose needs adapters with one group_size (their pairs must coincide); got "
                         f"{dict(zip(names, [c.group_size for c in configs], strict=True))}.")
    g = sizes[0]
    layers = {path: layer for path, layer in model.road_layers() if any(n in layer.road_theta for n in names)}

    if mode == "sequential":
        variant = "road_1" if all(c.variant == "road_1" for c in configs) else "road_2"
    elif mode == "union":
        _check_disjoint(names, configs, layers)
        same = len({c.variant for c in configs}) == 1
        variant = configs[0].variant if same else "road_2"
    else:
        variant = max((c.variant for c in configs), key=VARIANTS.index)
    # Every mode leaves the pairs that no input owns at the identity.
    subspace = None if any(c.subspace is None for c in configs) else _union_spec([c.subspace for c in configs])

    tensors: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        present = [(n, c) for n, c in zip(names, configs, strict=True) if n in layer.road_theta]
        if mode == "sequential":
            theta, alpha = _sequential(layer, [n for n, _ in present], variant, g)
        elif mode == "union":
            theta, alpha = _union(layer, present, variant, g)
        else:  # weights by position: a name given twice counts with both its weights
            weighted = [(n, c, wi) for n, c, wi in zip(names, configs, w, strict=True) if n in layer.road_theta]
            theta, alpha = _interpolate(layer, path, weighted, variant, g)
        dtype = layer.road_theta[present[0][0]].dtype
        tensors[ckpt.adapter_key(path, "road_theta")] = theta.to(dtype)
        tensors[ckpt.adapter_key(path, "road_alpha")] = alpha.to(dtype)

    config = RoadConfig(variant=variant, group_size=g, target_modules=sorted(layers), subspace=subspace,
                        base_model_name_or_path=configs[0].base_model_name_or_path,
                        task_type=configs[0].task_type, inference_mode=True)
    model.add_adapter(new_name, config, state_dict=tensors)
    return config


def _check_weights(mode: str, weights: Optional[Sequence[float]], n: int) -> list[float]:
    if mode != "interpolate":
        if weights is not None:
            raise ValueError(f"weights apply only to mode='interpolate', not mode={mode!r}.")
        return []
    if weights is None:
        return [1.0 / n] * n
    w = list(weights)
    if len(w) != n or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w) \
            or not all(torch.isfinite(torch.tensor(float(x))) for x in w):
        raise ValueError(f"interpolate needs one finite number per adapter ({n}), got weights={weights!r}.")
    return [float(x) for x in w]


def _params64(layer, name: str) -> _Params:
    theta, alpha = layer.parameters_of(name)
    return theta.detach().to(torch.float64), alpha.detach().to(torch.float64)


def _sequential(layer, names: list[str], variant: str, g: int) -> _Params:
    if variant == "road_1":  # the product of same-pair rotations: angles add, scales multiply
        theta = sum(_params64(layer, n)[0] for n in names)
        alpha = torch.stack([_params64(layer, n)[1] for n in names]).prod(0)
        return theta, alpha
    acc = F.identity(layer.out_features, dtype=torch.float64, device=layer.road_theta[names[0]].device)
    for n in names:
        acc = F.compose(acc, layer.coefficients(n, dtype=torch.float64), g)
    return F.polar(acc)


def _check_disjoint(names: list[str], configs: list[RoadConfig], layers: dict) -> None:
    overlaps = []
    for path, layer in layers.items():
        owned: dict[int, str] = {}
        for n, c in zip(names, configs, strict=True):
            if n not in layer.road_theta:
                continue
            pairs = pairs_of(c.subspace, layer.out_features // 2, path)
            clash = sorted(p for p in pairs.tolist() if p in owned)
            if clash:
                shown = ", ".join(map(str, clash[:8])) + (f" ... ({len(clash)} pairs)" if len(clash) > 8 else "")
                overlaps.append(f"{path}: {owned[clash[0]]!r} and {n!r} share pairs {shown}")
            owned.update(dict.fromkeys(pairs.tolist(), n))
    if overlaps:
        raise ValueError("union needs adapters in disjoint subspaces (RoadConfig.subspace), but they overlap:\n  "
                         + "\n  ".join(overlaps))


def _union(layer, present: list[tuple[str, RoadConfig]], variant: str, g: int) -> _Params:
    n_pairs = layer.out_features // 2
    device = layer.road_theta[present[0][0]].device
    if all(c.variant == variant for _, c in present):  # copy each owner's own entries
        n = F.parameter_length(variant, layer.out_features)
        theta = torch.zeros(n, dtype=torch.float64, device=device)
        alpha = torch.ones(n, dtype=torch.float64, device=device)
        for name, c in present:
            idx = entries_of(variant, g, pairs_of(c.subspace, n_pairs)).to(device)
            t, a = _params64(layer, name)
            theta[idx], alpha[idx] = t[idx], a[idx]
        return theta, alpha
    c_out, s_out = F.identity(layer.out_features, dtype=torch.float64, device=device)
    for name, c in present:  # mixed variants: per-feature coefficients, then road_2's polar form
        idx = features_of(pairs_of(c.subspace, n_pairs), g).to(device)
        cc, ss = layer.coefficients(name, dtype=torch.float64)
        c_out[idx], s_out[idx] = cc[idx], ss[idx]
    return F.polar((c_out, s_out))


def _interpolate(layer, path: str, weighted: list[tuple[str, RoadConfig, float]], variant: str,
                 g: int) -> _Params:
    theta = alpha_log = 0.0
    for name, c, weight in weighted:
        t, a = _params64(layer, name)
        if not bool((a > 0).all()):  # counted on the adapter's own entries, before any expansion
            raise ValueError(f"interpolate works on log-scales, but adapter {name!r} has alpha <= 0 in {path} "
                             f"({int((a <= 0).sum())} entries).")
        t, a = F.expand_parameters(t, a, c.variant, variant, g)
        theta = theta + weight * t
        alpha_log = alpha_log + weight * torch.log(a)
    return theta, torch.exp(alpha_log)


def _union_spec(specs: list[dict]) -> dict:
    """One spec covering every pair of `specs` (the spec itself when they are all the same)."""
    parts: list[dict] = []
    for spec in specs:
        parts.extend(p for p in (spec["union"] if "union" in spec else [spec]) if p not in parts)
    return parts[0] if len(parts) == 1 else {"union": parts}
