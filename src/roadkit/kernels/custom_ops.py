"""The slot backend for compiled graphs (`kernels.SlotBackend`): the serving kernel as one torch custom op.

`roadkit::rotate_slots` is opaque to torch.compile (its fake implementation gives the output's shape), so
vLLM's compiled graphs and CUDA graphs capture it as one call that reads persistent tables and a persistent
index buffer: adapter changes write those in place and need no recompile. On CUDA it runs the Triton kernel
(`triton_ops.rotate_slot_rows`) when Triton is installed; elsewhere the torch reference
(`torch_ops.rotate_slot_rows`). Importing `roadkit.kernels` registers the op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from . import torch_ops

if TYPE_CHECKING:
    from . import SlotTables


@torch.library.custom_op("roadkit::rotate_slots", mutates_args=())
def rotate_slots(
    x: torch.Tensor, c_table: torch.Tensor, s_table: torch.Tensor, half_table: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Rotate row r of x (n, d) by table row index[r]; indices outside [0, n_slots) select the identity row."""
    if x.is_cuda:
        try:
            from . import triton_ops
        except ImportError:  # no Triton: the torch reference below
            pass
        else:
            return triton_ops.rotate_slot_rows(x, c_table, s_table, half_table, index)
    n_slots = c_table.shape[0] - 1
    safe = torch.where((index < 0) | (index > n_slots), n_slots, index)
    return torch_ops.rotate_slot_rows(x, c_table, s_table, half_table, safe)


@rotate_slots.register_fake
def _(
    x: torch.Tensor, c_table: torch.Tensor, s_table: torch.Tensor, half_table: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    return x.new_empty(x.shape)  # contiguous, as both implementations return it (empty_like keeps x's strides)


def handles_slots(x: torch.Tensor) -> bool:
    """The op serves tensors off the CPU, where engines compile their graphs (on CUDA: Triton)."""
    return not x.is_cpu


def forward_slots(
    x: torch.Tensor, tables: SlotTables, index: torch.Tensor, runs: Optional[list[tuple[int, int, int]]] = None
) -> torch.Tensor:
    """Row t of x rotated by row index[t] of the slot tables (`c`, `s`, `half`), as one captured op."""
    return rotate_slots(x, tables.c, tables.s, tables.half, index)
