"""Fused RoAd kernels, chosen by device: Triton for CUDA tensors (when Triton is installed), torch elsewhere.

Every implementation offers the same primitives, none of them autograd-aware (functional.py builds
the autograd Functions on top):
    forward(x, c, s, g, dim)                    y = R x
    backward(gy, x, c, s, g, dim, need_gx)      (R^T gy, dc, ds)
    forward_indexed(x, c_tab, s_tab, idx, g, dim)   mixed batches: row/token i uses table row idx[i]
                                                    (a `RowMemo` keeps gathered rows between calls)
and, for merging, the in-place `rotate_rows_(w, c, s, g)`: w <- R w over its first axis.
`forward` and `forward_indexed` also take the coefficients packed by `shifted_layout`, which the
torch path turns into fewer, longer loops (callers that reuse coefficients pack them once).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import torch_ops

_TRITON = None  # the triton_ops module once imported, False when Triton is unavailable


def _triton_for(x: torch.Tensor, dim: int):
    """The Triton module when it should handle x (CUDA, features last, not being traced), else None."""
    global _TRITON
    if not x.is_cuda or dim % x.dim() != x.dim() - 1 or torch.compiler.is_compiling():
        return None
    if _TRITON is None:
        try:
            from . import triton_ops
        except ImportError:
            _TRITON = False
        else:
            _TRITON = triton_ops
    return _TRITON or None


def implementation(x: torch.Tensor, dim: int = -1) -> str:
    """Which kernels rotate x along `dim`: "triton" or "torch"."""
    return "torch" if _triton_for(x, dim) is None else "triton"


def forward(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int, dim: int = -1,
            shifted: Optional[torch_ops.ShiftedLayout] = None) -> torch.Tensor:
    """y = R x along `dim`, result in x's dtype; c and s are per feature (d,) or per row (..., d).

    `shifted` (`shifted_layout(c, s, group_size)`) lets the torch path use its faster layout;
    callers that reuse coefficients (the serving cache) pack them once.
    """
    ops = _triton_for(x, dim) if c.dim() == 1 else None
    if ops is not None:
        return ops.forward(x, c, s, group_size)
    return torch_ops.forward(x, c, s, group_size, dim, shifted)


def backward(gy: torch.Tensor, x: Optional[torch.Tensor], c: torch.Tensor, s: torch.Tensor, group_size: int,
             dim: int, need_gx: bool):
    """(dx, dc, ds) of y = R x; dc and ds only when x is given (else None)."""
    ops = _triton_for(gy, dim) if c.dim() == 1 else None
    if ops is not None:
        return ops.backward(gy, x, c, s, group_size, need_gx)
    return torch_ops.backward(gy, x, c, s, group_size, dim, need_gx)


def forward_indexed(x: torch.Tensor, c_table: torch.Tensor, s_table: torch.Tensor, index: torch.Tensor,
                    group_size: int, dim: int = -1, shifted_table: Optional[torch_ops.ShiftedLayout] = None,
                    memo: Optional[torch_ops.RowMemo] = None) -> torch.Tensor:
    """Mixed batches: each row (or token) of x uses its own row of the coefficient tables.

    The torch path gathers those rows first, and keeps them in `memo` for the routing's later
    calls; the Triton kernel reads the tables through the index and needs no memo.
    """
    ops = _triton_for(x, dim)
    if ops is not None:
        return ops.forward_indexed(x, c_table, s_table, index, group_size)
    return torch_ops.forward_indexed(x, c_table, s_table, index, group_size, dim, shifted_table, memo)


shifted_layout = torch_ops.shifted_layout
ShiftedLayout = torch_ops.ShiftedLayout
RowMemo = torch_ops.RowMemo


# Merging runs once, not per token: the torch implementation serves every device.
rotate_rows_ = torch_ops.rotate_rows_

__all__ = ["RowMemo", "ShiftedLayout", "backward", "forward", "forward_indexed", "implementation", "rotate_rows_",
           "shifted_layout"]
