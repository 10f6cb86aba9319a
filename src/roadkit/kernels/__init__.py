"""Fused RoAd kernels, chosen by device: Triton for CUDA tensors (when Triton is installed), torch elsewhere."""

from __future__ import annotations

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


def rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int, dim: int = -1) -> torch.Tensor:
    """y = R x along `dim` with per-feature coefficients (or per-row ones, torch path); differentiable."""
    ops = _triton_for(x, dim) if c.dim() == 1 else None
    if ops is not None:
        return ops.rotate(x, c, s, group_size)
    return torch_ops.rotate(x, c, s, group_size, dim)


def rotate_indexed(x: torch.Tensor, c_table: torch.Tensor, s_table: torch.Tensor, index: torch.Tensor,
                   group_size: int, dim: int = -1) -> torch.Tensor:
    """Mixed batches: each row (or token) of x uses its own row of the coefficient tables. Inference only."""
    ops = _triton_for(x, dim)
    if ops is not None:
        return ops.rotate_indexed(x, c_table, s_table, index, group_size)
    return torch_ops.rotate_indexed(x, c_table, s_table, index, group_size, dim)


rotate_values = torch_ops.rotate_values

__all__ = ["rotate", "rotate_indexed", "rotate_values"]
