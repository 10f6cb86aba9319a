"""The RoAd math on plain tensors: parameters -> coefficients -> rotations, merges, inverses.

Every RoAd rotation is block-diagonal in 2x2 blocks. Inside each group of `group_size` features,
feature a = j pairs with b = j + group_size/2, and the block acting on (x_a, x_b) is

    [[c_a, -s_a],
     [s_b,  c_b]]

so a rotation is fully described by two per-feature vectors (c, s) of length d_out. The three
variants differ only in how (theta, alpha) map to (c, s); see `coefficients`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import kernels
from .config import VARIANTS, normalize_variant
from .errors import InputError

Coefficients = tuple[torch.Tensor, torch.Tensor]


def parameter_length(variant: str, out_features: int) -> int:
    """Length of each of `road_theta` and `road_alpha` for a layer with `out_features` outputs."""
    return {"road_1": out_features // 2, "road_2": out_features, "road_4": 2 * out_features}[normalize_variant(variant)]


def out_features_for(variant: str, length: int) -> int:
    """The layer output size whose parameters have `length` entries (the inverse of `parameter_length`)."""
    return {"road_1": 2 * length, "road_2": length, "road_4": length // 2}[normalize_variant(variant)]


def check_group_size(out_features: int, group_size: int, where: str = "layer") -> None:
    """Raise if `group_size` cannot pair the `out_features` of `where`."""
    if group_size <= 0 or group_size % 2 or out_features % group_size:
        raise InputError(
            f"{where}: out_features={out_features} is not divisible by group_size={group_size}; "
            f"choose an even group_size that divides {out_features}."
        )


def coefficients(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor) -> Coefficients:
    """Map (theta, alpha) to per-feature (c, s), each of length d_out.

    road_1: entry j of group k serves both features of its pair: c = alpha cos(theta), s = alpha sin(theta).
    road_2: one (theta, alpha) per feature.
    road_4: viewed as (groups, 2, group_size): slot 0 gives c = alpha cos(theta), slot 1 gives s = alpha sin(theta).
    """
    variant = normalize_variant(variant)
    if variant == "road_1":
        c = (alpha * torch.cos(theta)).unflatten(0, (-1, 1, group_size // 2))
        s = (alpha * torch.sin(theta)).unflatten(0, (-1, 1, group_size // 2))
        return c.expand(-1, 2, -1).flatten(), s.expand(-1, 2, -1).flatten()
    if variant == "road_2":
        return alpha * torch.cos(theta), alpha * torch.sin(theta)
    theta4 = theta.unflatten(0, (-1, 2, group_size))
    alpha4 = alpha.unflatten(0, (-1, 2, group_size))
    c = alpha4[:, 0] * torch.cos(theta4[:, 0])
    s = alpha4[:, 1] * torch.sin(theta4[:, 1])
    return c.flatten(), s.flatten()


def value_problem(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor) -> Optional[str]:
    """Why (theta, alpha) cannot be served, or None: non-finite values, or 2x2 blocks whose determinant
    c_a*c_b + s_a*s_b is zero, subnormal or not finite (a zero scale: the rotation throws features away
    and cannot be unmerged). One pass over the adapter's parameters, in float32."""
    theta, alpha = theta.detach().float(), alpha.detach().float()
    bad = int((~torch.isfinite(theta)).sum() + (~torch.isfinite(alpha)).sum())
    if bad:
        return f"{bad} of its {theta.numel() + alpha.numel()} parameters are NaN or infinite"
    c, s = coefficients(variant, group_size, theta, alpha)
    ca, cb = _pairs(c, group_size)
    sa, sb = _pairs(s, group_size)
    det = (ca * cb + sa * sb).abs()
    singular = int((~(det >= torch.finfo(torch.float32).tiny) | ~torch.isfinite(det)).sum())
    if singular:
        return (
            f"{singular} of its {det.numel()} rotation blocks are degenerate (a zero or overflowing scale: "
            "c_a*c_b + s_a*s_b is 0 or not finite)"
        )
    return None


def coefficient_grads(
    variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor, grad_c: torch.Tensor, grad_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chain rule through `coefficients`: (dL/dtheta, dL/dalpha) from (dL/dc, dL/ds)."""
    variant = normalize_variant(variant)
    if variant == "road_4":
        t = theta.unflatten(0, (-1, 2, group_size))
        a = alpha.unflatten(0, (-1, 2, group_size))
        gc = grad_c.unflatten(0, (-1, group_size))
        gs = grad_s.unflatten(0, (-1, group_size))
        d_theta = torch.stack((-gc * a[:, 0] * torch.sin(t[:, 0]), gs * a[:, 1] * torch.cos(t[:, 1])), dim=1)
        d_alpha = torch.stack((gc * torch.cos(t[:, 0]), gs * torch.sin(t[:, 1])), dim=1)
        return d_theta.flatten(), d_alpha.flatten()
    if variant == "road_1":  # each entry serves both features of its pair
        grad_c = kernels.pairs_view(grad_c, group_size).sum(1).flatten()
        grad_s = kernels.pairs_view(grad_s, group_size).sum(1).flatten()
    cos, sin = torch.cos(theta), torch.sin(theta)
    return alpha * (grad_s * cos - grad_c * sin), grad_c * cos + grad_s * sin


class _Rotate(torch.autograd.Function):
    """y = R x for given coefficients (c, s), differentiable in all three."""

    @staticmethod
    def forward(ctx, x, c, s, group_size, dim):
        ctx.group_size, ctx.dim = group_size, dim
        ctx.save_for_backward(x if (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]) else None, c, s)
        return kernels.forward(x, c, s, group_size, dim)

    @staticmethod
    def backward(ctx, gy):
        x, c, s = ctx.saved_tensors
        gx, gc, gs = kernels.backward(gy, x, c, s, ctx.group_size, ctx.dim, ctx.needs_input_grad[0])
        return gx, gc, gs, None, None


class _Road(torch.autograd.Function):
    """y = R(theta, alpha) x in one fused pass, straight from the adapter parameters.

    Of the activations it saves only x (when the parameters need gradients). The coefficients
    (c, s) are kept too: two vectors of d_out, which spares the backward recomputing them.
    """

    @staticmethod
    def forward(ctx, x, theta, alpha, variant, group_size, dim):
        ctx.variant, ctx.group_size, ctx.dim = variant, group_size, dim
        need_params = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        c, s = coefficients(variant, group_size, theta, alpha)
        ctx.save_for_backward(x if need_params else None, theta, alpha, c, s)
        return kernels.forward(x, c, s, group_size, dim)

    @staticmethod
    def backward(ctx, gy):
        x, theta, alpha, c, s = ctx.saved_tensors
        gx, gc, gs = kernels.backward(gy, x, c, s, ctx.group_size, ctx.dim, ctx.needs_input_grad[0])
        d_theta = d_alpha = None
        if x is not None:
            assert gc is not None and gs is not None  # kernels.backward returns them whenever x is given
            d_theta, d_alpha = coefficient_grads(ctx.variant, ctx.group_size, theta, alpha, gc, gs)
        return gx, d_theta, d_alpha, None, None, None


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def rotate(x: torch.Tensor, coeffs: Coefficients, group_size: int, dim: int = -1, prepared: Any = None) -> torch.Tensor:
    """Apply the rotation (c, s) to the feature axis `dim` of x: y = x*c + rot(x)*s.

    Math in the coefficients' dtype, result in x's dtype; differentiable in x, c and s.
    `prepared` (`prepare(coeffs, group_size, dim)`) speeds up the no-grad path for callers that
    reuse (c, s) across calls.
    """
    c, s = coeffs
    if _needs_grad(x, c, s):
        return _Rotate.apply(x, c, s, group_size, dim)
    return kernels.forward(x, c, s, group_size, dim, prepared)


def road(
    x: torch.Tensor, variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor, dim: int = -1
) -> torch.Tensor:
    """Apply one adapter's rotation, from its parameters, to the feature axis `dim` of x.

    The training path: one fused pass forward and backward, saving nothing but x.
    """
    if _needs_grad(x, theta, alpha):
        return _Road.apply(x, theta, alpha, normalize_variant(variant), group_size, dim)
    return kernels.forward(x, *coefficients(variant, group_size, theta, alpha), group_size, dim)


def rotate_indexed(
    x: torch.Tensor,
    tables: Coefficients,
    index: torch.Tensor,
    group_size: int,
    dim: int = -1,
    prepared: Any = None,
    scratch: Any = None,
) -> torch.Tensor:
    """Mixed batches: rotate each row (or token) of x by the coefficient row `index` selects.

    `tables` are (c, s) of shape (n_adapters, d_out); `index` has the shape of the leading axes of
    x before `dim` (per token) or a prefix of them (per batch row). Cost is independent of
    n_adapters. Inference only (no autograd). `prepared` is `prepare(tables, group_size, dim)`;
    `scratch` (`new_scratch`), one per routing (the same tables and index on every call), spares
    later calls work the kernels can keep.
    """
    return kernels.forward_indexed(x, tables[0], tables[1], index, group_size, dim, prepared, scratch)


def new_scratch(index: torch.Tensor) -> Any:
    """What one routing keeps between its calls (its `index`'s device picks the kernel backend): pass it as
    `scratch` to every `rotate_indexed` call of that routing. Opaque; None where the backend keeps nothing."""
    return kernels.new_scratch(index)


def prepare(coeffs: Coefficients, group_size: int, dim: int = -1) -> Any:
    """(c, s) packed by the kernel backend that will rotate along `dim` on their device, for callers
    that reuse them (opaque: pass it back to `rotate` or `rotate_indexed`)."""
    return kernels.prepare(*coeffs, group_size, dim)


@dataclass(frozen=True)
class Rotation:
    """A rotation as the inference paths apply it, again and again: its coefficients (one adapter's, or
    tables with a row per adapter for mixed batches), the kernel backend's packing of them (`prepare`),
    and its group size."""

    coeffs: Coefficients
    prepared: Any
    group_size: int


def rotation(coeffs: Coefficients, group_size: int, dim: int = -1) -> Rotation:
    """`coeffs` with their packing for rotations along `dim`."""
    return Rotation(coeffs, prepare(coeffs, group_size, dim), group_size)


def _pairs(v: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (a, b) halves of every pair of a per-feature vector (or of rows of a table)."""
    vv = kernels.pairs_view(v, group_size)
    return vv[..., 0, :], vv[..., 1, :]


def _join(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.stack((a, b), dim=-2).flatten(-3)


def inverse(coeffs: Coefficients, group_size: int) -> Coefficients:
    """Coefficients of R^-1: [[c_b, s_a], [-s_b, c_a]] / (c_a c_b + s_a s_b) for every pair."""
    c, s = coeffs
    ca, cb = _pairs(c, group_size)
    sa, sb = _pairs(s, group_size)
    det = ca * cb + sa * sb
    if not torch.all(det != 0):
        raise InputError(
            "this RoAd rotation is singular (some pair has c_a*c_b + s_a*s_b == 0); it cannot be inverted."
        )
    return _join(cb / det, ca / det), _join(-sa / det, -sb / det)


def compose(first: Coefficients, second: Coefficients, group_size: int) -> Coefficients:
    """Coefficients of R_second @ R_first: apply `first`, then `second` (same group size)."""
    c1a, c1b = _pairs(first[0], group_size)
    s1a, s1b = _pairs(first[1], group_size)
    c2a, c2b = _pairs(second[0], group_size)
    s2a, s2b = _pairs(second[1], group_size)
    c = _join(c2a * c1a - s2a * s1b, c2b * c1b - s2b * s1a)
    s = _join(c2a * s1a + s2a * c1b, s2b * c1a + c2b * s1b)
    return c, s


def expand_parameters(
    theta: torch.Tensor, alpha: torch.Tensor, variant: str, to_variant: str, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rotation's (theta, alpha) in a larger variant (road_1 -> road_2 -> road_4), exactly:
    road_1's per-pair values serve both features of the pair; road_2's per-feature values fill both
    of road_4's slots."""
    order = {v: i for i, v in enumerate(VARIANTS)}
    variant, to_variant = normalize_variant(variant), normalize_variant(to_variant)
    if order[to_variant] < order[variant]:
        raise InputError(f"cannot express {variant} parameters as {to_variant}: only road_1 -> road_2 -> road_4.")
    if variant == "road_1" and to_variant != "road_1":
        theta, alpha = (t.unflatten(0, (-1, 1, group_size // 2)).expand(-1, 2, -1).flatten() for t in (theta, alpha))
        variant = "road_2"
    if variant == "road_2" and to_variant == "road_4":
        theta, alpha = (t.unflatten(0, (-1, 1, group_size)).expand(-1, 2, -1).flatten() for t in (theta, alpha))
    return theta, alpha


def polar(coeffs: Coefficients) -> tuple[torch.Tensor, torch.Tensor]:
    """road_2 parameters of any per-feature (c, s): theta = atan2(s, c), alpha = |(c, s)| (>= 0)."""
    c, s = coeffs
    return torch.atan2(s, c), torch.hypot(c, s)


def identity(out_features: int, dtype: torch.dtype = torch.float32, device=None) -> Coefficients:
    """Coefficients of the identity rotation (what `__base__` rows use)."""
    return (torch.ones(out_features, dtype=dtype, device=device), torch.zeros(out_features, dtype=dtype, device=device))


def rotate_rows_(weight: torch.Tensor, coeffs: Coefficients, group_size: int) -> torch.Tensor:
    """In place: weight <- R @ weight, for a (d_out, ...) weight or a (d_out,) bias. Returns weight.

    This is merging: y = R (W h + b) = (R W) h + R b, elementwise over pairs of rows, with no dense
    d_out x d_out matrix.

    Precision follows the conditioning of R. Blocks that are scaled rotations (c0 = c1 and
    s0 = s1, as road_1's always are) have condition number 1: math in the weight's dtype (at least
    float32) rounds each element a couple of ulps at most, and unmerging cannot amplify that.
    Other blocks can be nearly singular, and unmerging multiplies the merged weight's rounding by
    their condition number, so their math runs in float64 and the weight is rounded once.
    """
    c, s = coeffs
    cv, sv = kernels.pairs_view(c, group_size), kernels.pairs_view(s, group_size)
    scaled_rotation = torch.equal(cv[:, 0], cv[:, 1]) and torch.equal(sv[:, 0], sv[:, 1])
    return kernels.rotate_rows_(weight, c, s, group_size, dtype=None if scaled_rotation else torch.float64)


__all__ = [
    "VARIANTS",
    "Coefficients",
    "Rotation",
    "check_group_size",
    "coefficient_grads",
    "coefficients",
    "compose",
    "expand_parameters",
    "identity",
    "inverse",
    "new_scratch",
    "out_features_for",
    "parameter_length",
    "polar",
    "prepare",
    "road",
    "rotate",
    "rotate_indexed",
    "rotate_rows_",
    "rotation",
    "value_problem",
]
