"""The RoAd rotation for compilers: the backend `kernels.backend` picks under torch.compile, on every device.

Each function is one expression with no in-place ops, which a compiler fuses into one pass over x:
R x = x*c + swap(x)*(-s0, s1), where swap exchanges the halves of each group. Eager PyTorch would copy
the swapped x first, so the eager backends (torch_ops, triton_ops) use other formulations. Math in the
coefficients' dtype. Coefficients may be per feature (d,) or per row (..., d).
"""

from __future__ import annotations

from typing import Optional

import torch

from .torch_ops import in_dtype_of, pairs_view, reduce_to, rows_of

per_row = True


def handles(x: torch.Tensor, dim: int) -> bool:
    """Any tensor, along any axis."""
    return True


def prepare(c: torch.Tensor, s: torch.Tensor, group_size: int) -> None:
    """A compiler fuses the plain coefficients: nothing to pack."""
    return None


def new_scratch() -> None:
    """A compiled graph fuses the gather into the rotation: nothing to keep between calls."""
    return None


def _signed(s: torch.Tensor, group_size: int) -> torch.Tensor:
    """(-s0, s1): the sines with the sign each half's cross term takes in R (last axis, per group)."""
    sv = pairs_view(s, group_size)
    return torch.stack((-sv.select(-2, 0), sv.select(-2, 1)), dim=-2).flatten(-3)


def _along(v: torch.Tensor, trailing: int, group_size: int) -> torch.Tensor:
    """A (..., d) coefficient tensor viewed as (..., groups, 2, half), broadcasting over `trailing` axes."""
    return pairs_view(v, group_size)[(...,) + (None,) * trailing]


def forward(
    x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int, dim: int = -1, prepared: None = None
) -> torch.Tensor:
    """y = R x along `dim`, result in x's dtype."""
    dim = dim % x.dim()
    trailing = x.dim() - 1 - dim
    xv = pairs_view(x.to(c.dtype), group_size, dim)
    cv, sv = (_along(v, trailing, group_size) for v in (c, _signed(s, group_size)))
    return in_dtype_of(x, (xv * cv + xv.flip(dim + 1) * sv).flatten(dim, dim + 2))


def backward(
    gy: torch.Tensor,
    x: Optional[torch.Tensor],
    c: torch.Tensor,
    s: torch.Tensor,
    group_size: int,
    dim: int,
    need_gx: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx = R^T gy, dc, ds): R^T gy is gy*c + swap(gy*(-s0, s1)); dc sums gy*x, and ds sums gy*swap(x),
    then takes the signs back."""
    dim = dim % gy.dim()
    trailing = gy.dim() - 1 - dim
    gyv = pairs_view(gy.to(c.dtype), group_size, dim)
    gx = None
    if need_gx:
        cv, sv = (_along(v, trailing, group_size) for v in (c, _signed(s, group_size)))
        gx = (gyv * cv + (gyv * sv).flip(dim + 1)).flatten(dim, dim + 2).to(gy.dtype)
    if x is None:
        return gx, None, None
    xv = pairs_view(x.to(c.dtype), group_size, dim)
    gc = reduce_to((gyv * xv).flatten(dim, dim + 2), dim, c.shape)
    gs = _signed(reduce_to((gyv * xv.flip(dim + 1)).flatten(dim, dim + 2), dim, s.shape), group_size)
    return gx, gc, gs


def forward_indexed(
    x: torch.Tensor,
    c_table: torch.Tensor,
    s_table: torch.Tensor,
    index: torch.Tensor,
    group_size: int,
    dim: int = -1,
    prepared: None = None,
    scratch: None = None,
) -> torch.Tensor:
    """Mixed batches: each row's (or token's) coefficients gathered from the tables, then `forward`, which a
    compiler fuses with the gather."""
    dim = dim % x.dim()
    return forward(x, rows_of(c_table, index, dim), rows_of(s_table, index, dim), group_size, dim)
