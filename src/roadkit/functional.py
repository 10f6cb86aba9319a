"""The RoAd math on plain tensors: parameters -> coefficients -> rotations, merges, inverses.

Every RoAd rotation is block-diagonal in 2x2 blocks. Inside each group of `group_size` features,
feature a = j pairs with b = j + group_size/2, and the block acting on (x_a, x_b) is

    [[c_a, -s_a],
     [s_b,  c_b]]

so a rotation is fully described by two per-feature vectors (c, s) of length d_out. The three
variants differ only in how (theta, alpha) map to (c, s); see `coefficients`.
"""

from __future__ import annotations

import torch

from . import kernels
from .config import VARIANTS, normalize_variant

Coefficients = tuple[torch.Tensor, torch.Tensor]


def parameter_length(variant: str, out_features: int) -> int:
    """Length of each of `road_theta` and `road_alpha` for a layer with `out_features` outputs."""
    return {"road_1": out_features // 2, "road_2": out_features, "road_4": 2 * out_features}[
        normalize_variant(variant)
    ]


def check_group_size(out_features: int, group_size: int, where: str = "layer") -> None:
    """Raise if `group_size` cannot pair the `out_features` of `where`."""
    if group_size <= 0 or group_size % 2 or out_features % group_size:
        raise ValueError(
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


def rotate(x: torch.Tensor, coeffs: Coefficients, group_size: int, dim: int = -1) -> torch.Tensor:
    """Apply the rotation (c, s) to the feature axis `dim` of x: y = x*c + rot(x)*s. Differentiable."""
    c, s = coeffs
    return kernels.rotate(x, c, s, group_size, dim)


def rotate_indexed(x: torch.Tensor, tables: Coefficients, index: torch.Tensor, group_size: int,
                   dim: int = -1) -> torch.Tensor:
    """Mixed batches: rotate each row (or token) of x by the coefficient row `index` selects.

    `tables` are (c, s) of shape (n_adapters, d_out); `index` has the shape of the leading axes of
    x before `dim` (per token) or a prefix of them (per batch row). Cost is independent of n_adapters.
    """
    return kernels.rotate_indexed(x, tables[0], tables[1], index, group_size, dim)


def _pairs(v: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (a, b) halves of every pair of a per-feature vector (or of rows of a table)."""
    vv = v.unflatten(-1, (-1, 2, group_size // 2))
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
        raise ValueError("this RoAd rotation is singular (some pair has c_a*c_b + s_a*s_b == 0); it cannot be inverted.")
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


def identity(out_features: int, dtype: torch.dtype = torch.float32, device=None) -> Coefficients:
    """Coefficients of the identity rotation (what `__base__` rows use)."""
    return (torch.ones(out_features, dtype=dtype, device=device),
            torch.zeros(out_features, dtype=dtype, device=device))


def rotate_rows(weight: torch.Tensor, coeffs: Coefficients, group_size: int) -> torch.Tensor:
    """R @ weight for a (d_out, ...) weight or a (d_out,) bias, elementwise over rows, in fp32 or better.

    This is merging: y = R (W h + b) = (R W) h + R b. No dense d_out x d_out matrix is formed.
    """
    c, s = coeffs
    work = torch.promote_types(weight.dtype, c.dtype)
    return kernels.rotate_values(weight.to(work), c.to(work), s.to(work), group_size, dim=0).to(weight.dtype)


__all__ = [
    "VARIANTS",
    "Coefficients",
    "check_group_size",
    "coefficients",
    "compose",
    "identity",
    "inverse",
    "parameter_length",
    "rotate",
    "rotate_indexed",
    "rotate_rows",
]
