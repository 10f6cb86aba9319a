"""The serving kernel as a torch custom op, and the per-token slot index it reads.

`roadkit::rotate_slots` is opaque to torch.compile (its fake implementation gives the output's
shape), so vLLM's compiled graphs and CUDA graphs capture it as one call that reads persistent
tables and a persistent index buffer: adapter changes write those in place and need no recompile.
On CUDA it runs roadkit's Triton kernel; elsewhere the torch reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from ...kernels import torch_ops


@torch.library.custom_op("roadkit::rotate_slots", mutates_args=())
def rotate_slots(
    x: torch.Tensor, c_table: torch.Tensor, s_table: torch.Tensor, half_table: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Rotate row r of x (n, d) by table row index[r] (see `kernels.triton_ops.forward_slots`)."""
    if x.is_cuda:
        from ...kernels import triton_ops

        return triton_ops.forward_slots(x, c_table, s_table, half_table, index)
    n_slots = c_table.shape[0] - 1
    safe = torch.where((index < 0) | (index > n_slots), n_slots, index)
    return torch_ops.forward_slots(x, c_table, s_table, half_table, safe)


@rotate_slots.register_fake
def _(
    x: torch.Tensor, c_table: torch.Tensor, s_table: torch.Tensor, half_table: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    return x.new_empty(x.shape)  # contiguous, as both implementations return it (empty_like keeps x's strides)


class SlotRouting:
    """Each token's adapter slot for the current step, in a persistent buffer all layers read.

    vLLM marks tokens without an adapter with -1; here they point at the identity row `n_slots`,
    and so does every entry past the live tokens, so any prefix of the buffer is a valid index.
    On the CPU (no device sync to pay) it also keeps, for the layers' fast paths, the set of slots
    the step uses and, when tokens come in long runs of one slot (a prefill), those runs.
    """

    RUN_TOKENS = 8  # mean run length from which layers rotate run by run instead of gathering per token

    def __init__(self, max_tokens: int, n_slots: int, device: torch.device | str) -> None:
        self.n_slots = n_slots
        self.index = torch.full((max_tokens,), n_slots, dtype=torch.long, device=device)
        self.slots_in_use: Optional[frozenset[int]] = None  # None: unknown (CUDA)
        self.runs: Optional[list[tuple[int, int, int]]] = None

    def update(self, token_slots: torch.Tensor) -> None:
        """Take the engine's per-token slots (-1: no adapter) for the next forward."""
        n = token_slots.shape[0]
        live = self.index[:n]
        live.copy_(token_slots)
        live.masked_fill_(token_slots < 0, self.n_slots)
        self.index[n:] = self.n_slots
        if live.is_cuda:
            return
        slots, counts = torch.unique_consecutive(live, return_counts=True)
        self.slots_in_use = frozenset(slots.tolist())
        if len(slots) * self.RUN_TOKENS > n:
            self.runs = None
        else:
            ends = counts.cumsum(0).tolist()
            self.runs = [
                (slot, end - count, end) for slot, count, end in zip(slots.tolist(), counts.tolist(), ends, strict=True)
            ]
