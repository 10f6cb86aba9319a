"""`SlotTable`: the RoAd rotations of one served layer, one row per adapter slot of the engine, and
`SlotRouting`: each token's slot for the current step.

vLLM gives every token of a batch a slot index (-1: no adapter). A layer keeps, for its local
output features, one coefficient row per slot plus the identity in the last row, so a whole mixed
batch is rotated in one call, however many adapters share it. Rows are written
when the engine activates an adapter in a slot, never during a forward.

Slots may hold adapters of different group sizes. The table is rotated through `kernels.forward_slots`
(the `kernels.SlotBackend` seam). On CUDA one Triton kernel reads each row's group size from a table, so
the forward has no data-dependent Python (torch.compile and CUDA graphs capture it, through the
`roadkit::rotate_slots` custom op). On CPU, where vLLM runs adapters eagerly, roadkit's C kernel
(`kernels.c_ops`) does the same in one pass over the activations in their own dtype. Where it cannot run
(no C compiler, a failed build, `ROADKIT_C_KERNELS=0`, or a tensor it does not take), the torch path
reads the rows packed in the shifted layout with one pair of sine windows per group size in use
(`packed`): 1 + 2k elementwise ops for k group sizes, three for the usual one, in float32.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import functional as F
from ... import kernels
from ...kernels import c_ops, torch_ops


class SlotTable:
    """Per-slot RoAd coefficients of `features` output features; row `n_slots` is the identity.

    `c`, `s` (float32, (n_slots + 1, features)) and `half` (int32, group size / 2 per row) are the
    source of truth and the CUDA kernel's input. `k` = c - 1 and `w` (the sines signed by half:
    y = x + k x + w x_partner) are the C kernel's, kept with them in the dtype it reads for activations
    of `serving_dtype` (`c_ops.table_dtype`: bfloat16 for 16-bit ones); `packed`, the torch
    fallback's layout (one pair of sine rows per group size in `halves`), is built when that path first
    runs after a row changed.
    """

    def __init__(
        self,
        n_slots: int,
        features: int,
        device: torch.device | str = "cpu",
        serving_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.n_slots, self.features = n_slots, features
        self.c = torch.ones(n_slots + 1, features, dtype=torch.float32, device=device)
        self.s = torch.zeros(n_slots + 1, features, dtype=torch.float32, device=device)
        table = c_ops.table_dtype(serving_dtype)
        self.k = torch.zeros(n_slots + 1, features, dtype=table, device=device)
        self.w = torch.zeros(n_slots + 1, features, dtype=table, device=device)
        self.half = torch.ones(n_slots + 1, dtype=torch.int32, device=device)
        self.slot_halves: list[Optional[int]] = [None] * n_slots  # None: the identity
        self.active_slots: frozenset[int] = frozenset()  # slots that hold a rotation
        self._packed: Optional[torch.Tensor] = None  # None: stale

    @property
    def active(self) -> bool:
        """Whether any slot holds a rotation (else the layer can skip the pass)."""
        return bool(self.active_slots)

    def set(self, slot: int, c: torch.Tensor, s: torch.Tensor, group_size: int) -> None:
        """Put the rotation (c, s) of group size `group_size` in `slot`."""
        if c.shape != (self.features,) or s.shape != (self.features,):
            raise ValueError(f"slot coefficients must have shape ({self.features},), got {tuple(c.shape)}.")
        F.check_group_size(self.features, group_size)
        self.c[slot].copy_(c)
        self.s[slot].copy_(s)
        self.k[slot].copy_(self.c[slot] - 1)
        signs = torch.tensor([-1.0, 1.0], device=self.w.device).repeat_interleave(group_size // 2)
        self.w[slot].copy_((self.s[slot].view(-1, group_size) * signs).view(-1))
        self.half[slot] = group_size // 2
        self._changed(slot, group_size // 2)

    def reset(self, slot: int) -> None:
        """Make `slot` the identity."""
        self.c[slot].fill_(1)
        self.s[slot].zero_()
        self.k[slot].zero_()
        self.w[slot].zero_()
        self.half[slot] = 1
        self._changed(slot, None)

    def _changed(self, slot: int, half: Optional[int]) -> None:
        self.slot_halves[slot] = half
        self.active_slots = frozenset(slot for slot, h in enumerate(self.slot_halves) if h is not None)
        self._packed = None

    @property
    def halves(self) -> tuple[int, ...]:
        """The half-group sizes in use, in the order of the torch fallback's packed sine rows."""
        return tuple(sorted({h for h in self.slot_halves if h is not None}))

    @property
    def packed(self) -> torch.Tensor:
        """The torch fallback's rows: c, then one pair of shifted-layout sine rows per entry of `halves`."""
        if self._packed is None:
            self._packed = self._pack()
        return self._packed

    def _pack(self) -> torch.Tensor:
        halves = self.halves
        packed = torch.zeros(
            self.n_slots + 1, 1 + 2 * len(halves), self.features, dtype=torch.float32, device=self.c.device
        )
        packed[:, 0] = self.c
        for i, half in enumerate(halves):
            rows = [slot for slot, h in enumerate(self.slot_halves) if h == half]
            shifted = torch_ops.shifted_layout(self.c[rows], self.s[rows], 2 * half)
            packed[rows, 1 + 2 * i] = shifted.packed[:, 1]
            packed[rows, 2 + 2 * i] = shifted.packed[:, 2]
        return packed

    def forward(
        self, x: torch.Tensor, index: torch.Tensor, runs: Optional[list[tuple[int, int, int]]] = None
    ) -> torch.Tensor:
        """Rotate each row of x (n, features) by its slot's row; the result has x's dtype.

        `index` (int64) holds one slot per row of x, in [0, n_slots] (n_slots: the identity); `runs`, when
        given, the same index as (slot, start, end) runs (see `SlotRouting`). The slot backend that serves x
        does the work (`kernels.forward_slots`).
        """
        return kernels.forward_slots(x, self, index, runs)


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
        self.slots_in_use: Optional[frozenset[int]] = None  # None: unknown (off the CPU)
        self.runs: Optional[list[tuple[int, int, int]]] = None

    def update(self, token_slots: torch.Tensor) -> None:
        """Take the engine's per-token slots (-1: no adapter) for the next forward."""
        n = token_slots.shape[0]
        live = self.index[:n]
        live.copy_(token_slots)
        live.masked_fill_(token_slots < 0, self.n_slots)
        self.index[n:] = self.n_slots
        if not live.is_cpu:
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
