"""Fused RoAd kernels behind two seams: the `Backend` protocol (`torch_ops`, `triton_ops`, `traced_ops`) for
roadkit's layers, and the `SlotBackend` protocol (`c_ops`, `custom_ops`, `torch_ops`) for serving engines.

A backend is one module of this package, `<name>_ops`. The eager ones are listed in `BACKENDS` with the
device type each serves; the first that serves a tensor's device type, is installed and `handles` the tensor
runs, and torch handles every tensor. Under torch.compile the traced backend runs instead, on every device:
its formulation is the one a compiler fuses. Merging (`rotate_rows_`: w <- R w over its first axis) runs
once, not per token: the torch implementation serves every device.

Serving engines (the vLLM integration) rotate through a second seam, the `SlotBackend` protocol: each row of
the batch has its own row of per-slot tables (`SlotTables`) and its own group size. `forward_slots` picks
the backend: on CPU the C kernel (`c_ops`) where it runs and takes the tensor, else torch (`torch_ops`);
elsewhere the custom op that compiled graphs capture (`custom_ops`, Triton on CUDA). Importing this package
registers that op (`roadkit::rotate_slots`) with torch.library.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any, Optional, Protocol, cast

import torch

from . import c_ops, custom_ops, torch_ops, traced_ops

Gradients = tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


class Backend(Protocol):
    """What a kernel backend offers. Nothing of it is autograd-aware (functional.py builds the autograd
    Functions on top). `prepared` and `scratch` are opaque outside the backend that made them."""

    per_row: bool  # whether `forward` and `backward` take per-row coefficients (..., d), not only (d,)

    def handles(self, x: torch.Tensor, dim: int) -> bool:
        """Whether this backend should rotate x along `dim`."""

    def prepare(self, c: torch.Tensor, s: torch.Tensor, group_size: int) -> Any:
        """(c, s) packed in the backend's own layout (or None), made once by callers that reuse them."""

    def new_scratch(self) -> Any:
        """What one routing keeps between its calls to `forward_indexed` (or None)."""

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int, dim: int, prepared: Any
    ) -> torch.Tensor:
        """y = R x along `dim`, math in the coefficients' dtype, result in x's dtype."""

    def backward(
        self,
        gy: torch.Tensor,
        x: Optional[torch.Tensor],
        c: torch.Tensor,
        s: torch.Tensor,
        group_size: int,
        dim: int,
        need_gx: bool,
    ) -> Gradients:
        """(R^T gy if `need_gx`, dc, ds); dc and ds only when x is given."""

    def forward_indexed(
        self,
        x: torch.Tensor,
        c_table: torch.Tensor,
        s_table: torch.Tensor,
        index: torch.Tensor,
        group_size: int,
        dim: int,
        prepared: Any,
        scratch: Any,
    ) -> torch.Tensor:
        """Mixed batches: row (or token) i of x uses row index[i] of the tables."""


class SlotTables(Protocol):
    """What a serving layer keeps for the slot backends (the vLLM integration's `SlotTable`): one row per
    adapter slot, the identity in row `n_slots`. `c`, `s` (float32) and `half` (int32: group size / 2 per
    row) are the source; `k` = c - 1 and `w` (the sines signed by half) the C kernel's; `packed` (rows in
    the shifted layout, one pair of sine rows per entry of `halves`) the torch path's."""

    n_slots: int
    c: torch.Tensor
    s: torch.Tensor
    half: torch.Tensor
    k: torch.Tensor
    w: torch.Tensor
    active_slots: frozenset[int]

    @property
    def packed(self) -> torch.Tensor: ...

    @property
    def halves(self) -> tuple[int, ...]: ...


Runs = Optional[list[tuple[int, int, int]]]  # (slot, start, end): an index as runs of consecutive rows


class SlotBackend(Protocol):
    """What a serving (slot) backend offers: row t of x (n, d) rotated by row index[t] of the slot tables,
    with that row's own group size; index values are in [0, n_slots], n_slots being the identity."""

    def handles_slots(self, x: torch.Tensor) -> bool:
        """Whether this backend can rotate x."""

    def forward_slots(self, x: torch.Tensor, tables: SlotTables, index: torch.Tensor, runs: Runs) -> torch.Tensor:
        """The rotated rows, a new tensor in x's dtype. `runs`, when the caller has them, is the same index as
        runs of consecutive rows (a prefill), which a backend may use instead."""


# (module `<name>_ops` of this package, the device type it serves or None for any), tried in this order; the
# last, torch, serves every tensor. A backend is imported when a tensor of its device type first shows up
# (Triton takes seconds).
BACKENDS = (("triton", "cuda"), ("torch", None))

if TYPE_CHECKING:  # every backend module satisfies the protocol (checked by mypy)
    from . import triton_ops

    _CHECKED: tuple[Backend, ...] = (torch_ops, traced_ops, triton_ops)
    _CHECKED_SLOTS: tuple[SlotBackend, ...] = (c_ops, custom_ops, torch_ops)


@functools.cache
def _load(name: str) -> Optional[Backend]:
    """The backend module, or None when its dependencies are not installed (Triton)."""
    try:
        return cast(Backend, importlib.import_module(f"{__name__}.{name}_ops"))
    except ImportError:
        return None


@functools.cache
def _backends_for(device_type: str) -> tuple[Backend, ...]:
    """The installed backends that serve tensors of `device_type`, in the order of `BACKENDS`."""
    loaded = (_load(name) for name, serves in BACKENDS if serves is None or serves == device_type)
    return tuple(module for module in loaded if module is not None)


def backend(x: torch.Tensor, dim: int = -1) -> Backend:
    """The backend that rotates x along `dim`: under torch.compile the traced one, which the compiler fuses
    (the one place roadkit's kernels ask whether they are being traced).

    Asked on every rotation, so it costs little where torch is the only backend (CPU): the device type is
    read through the tensor's flags (`x.device` builds an object), and nothing else is asked.
    """
    if torch.compiler.is_compiling():
        return traced_ops
    candidates = _backends_for("cpu" if x.is_cpu else "cuda" if x.is_cuda else x.device.type)
    if len(candidates) > 1:
        for module in candidates[:-1]:
            if module.handles(x, dim):
                return module
    return torch_ops


def implementation(x: torch.Tensor, dim: int = -1) -> str:
    """Which backend rotates x along `dim`, by name ("triton", "torch" or "traced")."""
    return cast(Any, backend(x, dim)).__name__.rpartition(".")[2].removesuffix("_ops")


def _for_coefficients(x: torch.Tensor, c: torch.Tensor, dim: int) -> Backend:
    """The backend for x and coefficients c: per-row coefficients go to one that takes them."""
    ops = backend(x, dim)
    return ops if c.dim() == 1 or ops.per_row else torch_ops


def prepare(c: torch.Tensor, s: torch.Tensor, group_size: int, dim: int = -1) -> Any:
    """(c, s) packed for the backend that will rotate tensors on their device along `dim`."""
    return backend(c, dim).prepare(c, s, group_size)


def new_scratch(x: torch.Tensor, dim: int = -1) -> Any:
    """What one routing of tensors like x keeps between its calls, from the backend that rotates them."""
    return backend(x, dim).new_scratch()


def forward(
    x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int, dim: int = -1, prepared: Any = None
) -> torch.Tensor:
    """y = R x along `dim`, result in x's dtype; c and s are per feature (d,) or per row (..., d)."""
    return _for_coefficients(x, c, dim).forward(x, c, s, group_size, dim, prepared)


def backward(
    gy: torch.Tensor,
    x: Optional[torch.Tensor],
    c: torch.Tensor,
    s: torch.Tensor,
    group_size: int,
    dim: int,
    need_gx: bool,
) -> Gradients:
    """(dx, dc, ds) of y = R x; dc and ds only when x is given (else None)."""
    return _for_coefficients(gy, c, dim).backward(gy, x, c, s, group_size, dim, need_gx)


def forward_indexed(
    x: torch.Tensor,
    c_table: torch.Tensor,
    s_table: torch.Tensor,
    index: torch.Tensor,
    group_size: int,
    dim: int = -1,
    prepared: Any = None,
    scratch: Any = None,
) -> torch.Tensor:
    """Mixed batches: each row (or token) of x uses its own row of the coefficient tables.

    `prepared` is `prepare(c_table, s_table, group_size)`; `scratch` (`new_scratch`) is kept by one
    routing across its calls.
    """
    return backend(x, dim).forward_indexed(x, c_table, s_table, index, group_size, dim, prepared, scratch)


def slot_backend(x: torch.Tensor) -> SlotBackend:
    """The slot backend for x: on CPU (eager only), the C kernel where it runs and takes x, else torch; on other
    devices the custom op, which compiled graphs capture. Off the CPU the choice is one attribute check
    (`x.is_cpu`), so a compiled caller stays one graph."""
    if x.is_cpu:
        return c_ops if c_ops.handles_slots(x) else torch_ops
    return custom_ops


def forward_slots(x: torch.Tensor, tables: SlotTables, index: torch.Tensor, runs: Runs = None) -> torch.Tensor:
    """Serving: row t of x (n, d) rotated by row index[t] of the slot tables (see `SlotBackend`)."""
    return slot_backend(x).forward_slots(x, tables, index, runs)


rotate_rows_ = torch_ops.rotate_rows_
pairs_view = torch_ops.pairs_view

__all__ = [
    "BACKENDS",
    "Backend",
    "SlotBackend",
    "SlotTables",
    "backend",
    "backward",
    "forward",
    "forward_indexed",
    "forward_slots",
    "implementation",
    "new_scratch",
    "pairs_view",
    "prepare",
    "rotate_rows_",
    "slot_backend",
]
