"""Fused RoAd kernels behind one seam: a backend is one module of this package plus its entry in `BACKENDS`.

Every backend module offers the same functions, none of them autograd-aware (functional.py builds
the autograd Functions on top):
    handles(x, dim)                              whether it should rotate x along `dim`
    prepare(c, s, g)                             coefficients packed in its own layout (or None), made
                                                 once by callers that reuse them
    new_memo()                                   scratch one routing keeps between its calls (or None)
    forward(x, c, s, g, dim, prepared)           y = R x
    backward(gy, x, c, s, g, dim, need_gx)       (R^T gy, dc, ds)
    forward_indexed(x, c_tab, s_tab, idx, g, dim, prepared, memo)
                                                 mixed batches: row/token i uses table row idx[i]
`prepared` and `memo` are opaque outside the backend that made them. The first backend in
`BACKENDS` that serves a tensor's device type, is installed and handles the tensor runs; torch
handles every tensor, and everything under torch.compile. Per-row
coefficients (a coefficient row per batch row, for `forward`) are the torch backend's alone.
Merging (`rotate_rows_`: w <- R w over its first axis) runs once, not per token: the torch
implementation serves every device.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Any, Optional

import torch

from . import torch_ops

# (module `<name>_ops` of this package, the device type it serves or None for any), tried in this order; the
# last, torch, serves every tensor. A backend is imported when a tensor of its device type first shows up
# (Triton takes seconds).
BACKENDS = (("triton", "cuda"), ("torch", None))


@functools.cache
def _load(name: str) -> Optional[ModuleType]:
    """The backend module, or None when its dependencies are not installed (Triton)."""
    try:
        return importlib.import_module(f"{__name__}.{name}_ops")
    except ImportError:
        return None


@functools.cache
def _backends_for(device_type: str) -> tuple[ModuleType, ...]:
    """The installed backends that serve tensors of `device_type`, in the order of `BACKENDS`."""
    loaded = (_load(name) for name, serves in BACKENDS if serves is None or serves == device_type)
    return tuple(module for module in loaded if module is not None)


def backend(x: torch.Tensor, dim: int = -1) -> ModuleType:
    """The backend that rotates x along `dim` (under torch.compile, torch: the compiler fuses it).

    Asked on every rotation, so it costs little where torch is the only backend (CPU): the device type is
    read through the tensor's flags (`x.device` builds an object), and nothing else is asked.
    """
    if torch.compiler.is_compiling():
        return torch_ops
    candidates = _backends_for("cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type)
    if len(candidates) > 1:
        for module in candidates[:-1]:
            if module.handles(x, dim):
                return module
    return torch_ops


def implementation(x: torch.Tensor, dim: int = -1) -> str:
    """Which backend rotates x along `dim`, by name ("triton" or "torch")."""
    return backend(x, dim).__name__.rpartition(".")[2].removesuffix("_ops")


def prepare(c: torch.Tensor, s: torch.Tensor, group_size: int, dim: int = -1) -> Any:
    """(c, s) packed for the backend that will rotate tensors on their device along `dim`."""
    return backend(c, dim).prepare(c, s, group_size)


def new_memo(x: torch.Tensor, dim: int = -1) -> Any:
    """Scratch for one routing of tensors like x, from the backend that rotates them."""
    return backend(x, dim).new_memo()


def forward(
    x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int, dim: int = -1, prepared: Any = None
) -> torch.Tensor:
    """y = R x along `dim`, result in x's dtype; c and s are per feature (d,) or per row (..., d)."""
    ops = backend(x, dim) if c.dim() == 1 else torch_ops
    return ops.forward(x, c, s, group_size, dim, prepared)


def backward(
    gy: torch.Tensor,
    x: Optional[torch.Tensor],
    c: torch.Tensor,
    s: torch.Tensor,
    group_size: int,
    dim: int,
    need_gx: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx, dc, ds) of y = R x; dc and ds only when x is given (else None)."""
    ops = backend(gy, dim) if c.dim() == 1 else torch_ops
    return ops.backward(gy, x, c, s, group_size, dim, need_gx)


def forward_indexed(
    x: torch.Tensor,
    c_table: torch.Tensor,
    s_table: torch.Tensor,
    index: torch.Tensor,
    group_size: int,
    dim: int = -1,
    prepared: Any = None,
    memo: Any = None,
) -> torch.Tensor:
    """Mixed batches: each row (or token) of x uses its own row of the coefficient tables.

    `prepared` is `prepare(c_table, s_table, group_size)`; `memo` (`new_memo`) is kept by one
    routing across its calls.
    """
    return backend(x, dim).forward_indexed(x, c_table, s_table, index, group_size, dim, prepared, memo)


rotate_rows_ = torch_ops.rotate_rows_

__all__ = [
    "BACKENDS",
    "backend",
    "backward",
    "forward",
    "forward_indexed",
    "implementation",
    "new_memo",
    "prepare",
    "rotate_rows_",
]
