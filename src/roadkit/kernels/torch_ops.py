"""The RoAd rotation as fused elementwise torch ops: forward and backward primitives (no autograd).

A tensor's feature axis `dim` is viewed as (groups, 2, half): slot 0 holds features j, slot 1
features j + group_size/2 of each group. With per-feature coefficients (c, s) the rotation is

    y0 = c0 * x0 - s0 * x1        y1 = c1 * x1 + s1 * x0

Coefficients have the feature axis last; leading axes (if any) broadcast against the leading axes
of `x` (one coefficient row per batch row or per token, for mixed-adapter batches).

This is the eager backend that serves every tensor (see `kernels.Backend`). Beside the backend's functions
it holds the merge (`rotate_rows_`, for every device), the torch slot backend (`kernels.SlotBackend`:
`handles_slots`, and `forward_slots` on `SlotTables.packed` rows through `rotate_shifted_halves`), and
`rotate_slot_rows`, which the custom op (`custom_ops`) runs off CUDA and the Triton slot kernel is tested
against.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch

if TYPE_CHECKING:
    from . import SlotTables

per_row = True  # forward and backward take per-row coefficients (..., d) as well as per-feature ones (d,)


def pairs_view(t: torch.Tensor, group_size: int, dim: int = -1) -> torch.Tensor:
    """t viewed as (..., groups, 2, half, ...) along `dim`: slot 0 of each pair holds the first half of its
    group, slot 1 the second."""
    return t.unflatten(dim, (-1, 2, group_size // 2))


def rotate_values(
    x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int, dim: int = -1, transpose: bool = False
) -> torch.Tensor:
    """R x (or R^T x) along `dim`, computed and returned in the coefficients' dtype. No autograd.

    One output buffer: out = x * c, then each half gets its cross term added in place.
    """
    trailing = x.dim() - 1 - dim % x.dim()
    xv = pairs_view(x, group_size, dim)
    cv, sv = pairs_view(c, group_size), pairs_view(s, group_size)
    if trailing:  # features not last (e.g. conv channels): coefficients broadcast over what follows
        cv = cv[(...,) + (None,) * trailing]
        sv = sv[(...,) + (None,) * trailing]
    pair = -2 - trailing
    out = torch.mul(xv, cv)
    x0, x1 = xv.unbind(pair)
    o0, o1 = out.unbind(pair)
    s0, s1 = sv.unbind(pair)
    if transpose:  # R^T: o0 = c0 x0 + s1 x1, o1 = c1 x1 - s0 x0
        o0.addcmul_(x1, s1)
        o1.addcmul_(x0, s0, value=-1)
    else:  # R: o0 = c0 x0 - s0 x1, o1 = c1 x1 + s1 x0
        o0.addcmul_(x1, s0, value=-1)
        o1.addcmul_(x0, s1)
    return out.flatten(pair - 1, pair + 1)


def reduce_to(full: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    """Sum a per-element gradient (feature axis `dim` of x) down to a coefficient tensor's shape."""
    trailing = tuple(range(dim + 1, full.dim()))
    if trailing:
        full = full.sum(dim=trailing)
    return full.sum_to_size(shape)


class ShiftedLayout(NamedTuple):
    """Coefficients packed for `rotate_shifted` (built by `shifted_layout`).

    `packed` is one (..., 3, d) tensor, so a mixed batch gathers each row's coefficients with a
    single `index_select`. Row 0 is c. Row 1 holds s_up[f] = -s[f] where f is in the first half of
    its group (y0 = c0 x0 - s0 x1), else 0; row 2 holds s_down[f] = s[f + g/2] where f + g/2 is in
    the second half (y1 = c1 x1 + s1 x0), else 0. `c`, `s_up` and `s_down` are views of its rows as
    `rotate_shifted` reads them (the sines cut to their first d - g/2 entries), made once here so a
    call does not slice them again; `row_bytes` is the size of one (3, d) row, what a mixed batch
    gathers per index entry.
    """

    packed: torch.Tensor
    c: torch.Tensor
    s_up: torch.Tensor
    s_down: torch.Tensor
    row_bytes: int


def _windows(packed: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c, s_up, s_down) of a packed (..., 3, d) tensor, the sines cut to d - half entries."""
    n = packed.shape[-1] - half
    c, s_up, s_down = packed.unbind(-2)
    return c, s_up[..., :n], s_down[..., :n]


def shifted_layout(c: torch.Tensor, s: torch.Tensor, group_size: int) -> ShiftedLayout:
    """(c, s) packed for `rotate_shifted` (see `ShiftedLayout`)."""
    half = group_size // 2
    out = torch.zeros(s.shape[:-1] + (3, s.shape[-1]), dtype=s.dtype, device=s.device)
    out.select(-2, 0).copy_(c)
    sv = pairs_view(s, group_size)
    first_halves = [pairs_view(out.select(-2, row), group_size).select(-2, 0) for row in (1, 2)]
    first_halves[0].copy_(sv.select(-2, 0)).neg_()  # entry f: output f, partner f + g/2
    first_halves[1].copy_(sv.select(-2, 1))  # entry f: output f + g/2, partner f
    return ShiftedLayout(out, *_windows(out, half), out.shape[-2] * out.shape[-1] * out.element_size())


def handles(x: torch.Tensor, dim: int) -> bool:
    """The torch backend rotates any tensor, on any device, along any axis (outside torch.compile)."""
    return True


def prepare(c: torch.Tensor, s: torch.Tensor, group_size: int) -> ShiftedLayout:
    """This backend's packed coefficients: the shifted layout (see `ShiftedLayout`)."""
    return shifted_layout(c, s, group_size)


def new_scratch() -> Scratch:
    """What one routing keeps between its calls: the per-row coefficients it gathered (see `Scratch`)."""
    return Scratch()


def rotate_shifted(
    x: torch.Tensor, c: torch.Tensor, s_up: torch.Tensor, s_down: torch.Tensor, half: int
) -> torch.Tensor:
    """R x for features on the last axis, as three ops over long contiguous rows. No autograd.

    Each feature's partner sits g/2 away, so the cross terms are two windows of x shifted by g/2
    against the output, weighted by the zero-padded sines of `shifted_layout`. `rotate_values`
    addresses the halves directly, which on CPU means inner loops of g/2 elements; here every
    loop runs over d - g/2, which costs about as much as one elementwise multiply. Finite inputs
    give the same result; an inf or NaN feature can also reach, through its zero weights, the
    feature g/2 away in the neighbouring group (the next layer's matmul would spread it to every
    feature anyway). `half` is group_size / 2; c, s_up and s_down are a `ShiftedLayout`'s.
    """
    n = x.shape[-1] - half
    out = torch.mul(x, c)
    out[..., :n].addcmul_(x[..., half:], s_up)
    out[..., half:].addcmul_(x[..., :n], s_down)
    return out


def forward(
    x: torch.Tensor,
    c: torch.Tensor,
    s: torch.Tensor,
    group_size: int,
    dim: int = -1,
    prepared: Optional[ShiftedLayout] = None,
) -> torch.Tensor:
    """y = R x along `dim`: math in the coefficients' dtype, result in x's dtype. No autograd.

    With `prepared` (`prepare(c, s)`, the shifted layout, made once by callers that reuse coefficients) and
    the features last, the faster `rotate_shifted` runs. When x already has the coefficients'
    dtype, nothing is allocated beyond the output.
    """
    if prepared is not None and dim % x.dim() == x.dim() - 1:
        return in_dtype_of(x, rotate_shifted(x, prepared.c, prepared.s_up, prepared.s_down, group_size // 2))
    return in_dtype_of(x, rotate_values(x, c, s, group_size, dim))


def in_dtype_of(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` in x's dtype (itself when it has it)."""
    return out if out.dtype == x.dtype else out.to(x.dtype)


def backward(
    gy: torch.Tensor,
    x: Optional[torch.Tensor],
    c: torch.Tensor,
    s: torch.Tensor,
    group_size: int,
    dim: int,
    need_gx: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx = R^T gy, dc, ds) of y = R x; dc and ds (reduced to c's shape) only when x is given.

    dc sums gy * x; ds sums gy0 * x1 and gy1 * x0 half by half and stacks the reduced halves, so no
    product is ever stacked or negated at full size.
    """
    dim = dim % gy.dim()
    gx = rotate_values(gy, c, s, group_size, dim, transpose=True).to(gy.dtype) if need_gx else None
    if x is None:
        return gx, None, None
    xv = pairs_view(x.to(c.dtype), group_size, dim)
    gyv = pairs_view(gy.to(c.dtype), group_size, dim)
    pair = dim + 1
    gc = reduce_to((gyv * xv).flatten(dim, dim + 2), dim, c.shape)
    (x0, x1), (g0, g1) = xv.unbind(pair), gyv.unbind(pair)
    half_shape = pairs_view(s, group_size).select(-2, 0).shape
    gs0 = reduce_to(g0 * x1, dim + 1, half_shape)  # y0 = c0 x0 - s0 x1: the sign goes on after the sum
    gs1 = reduce_to(g1 * x0, dim + 1, half_shape)
    gs = torch.stack((gs0.neg_(), gs1), dim=-2).flatten(-3)
    return gx, gc, gs


def forward_indexed(
    x: torch.Tensor,
    c_table: torch.Tensor,
    s_table: torch.Tensor,
    index: torch.Tensor,
    group_size: int,
    dim: int = -1,
    prepared: Optional[ShiftedLayout] = None,
    scratch: Optional[Scratch] = None,
) -> torch.Tensor:
    """Mixed batches: gather each row's (or token's) coefficients by `index`, then one fused pass.

    `index` covers a prefix of the axes before `dim` (per batch row) or all of them (per token).
    `prepared` is `prepare(c_table, s_table)`: with the features last, each row's
    coefficients then come with one gather and go through the faster pass, and `scratch` (one per
    routing of a model call) keeps gathered rows for the calls after (see `Scratch`).
    """
    dim = dim % x.dim()
    if prepared is not None and dim == x.dim() - 1:
        if index.numel() * prepared.row_bytes <= GATHER_BYTES:  # the common case: one gather
            half = group_size // 2
            return in_dtype_of(x, rotate_shifted(x, *_gathered(prepared, index, x.dim(), half, scratch), half))
        return _forward_indexed_chunked(x, prepared, index, group_size // 2)
    return forward(x, rows_of(c_table, index, dim), rows_of(s_table, index, dim), group_size, dim)


def rows_of(table: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Each index entry's row of `table`, shaped to broadcast against an x whose features are on axis `dim`
    (the index covers a prefix of the axes before it)."""
    lead = tuple(index.shape) + (1,) * (dim - index.dim())
    # index_select is several times faster than advanced indexing on CPU
    return table.index_select(0, index.reshape(-1)).view(lead + tuple(table.shape[1:]))


GATHER_BYTES = 32 << 20  # most per-row coefficients a mixed batch gathers at once
SCRATCH_BYTES = 64 << 20  # most gathered per-row coefficients one routing's `Scratch` keeps


_Windows = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Scratch:
    """This backend's per-routing scratch: the per-row coefficients gathered for one routing of a model
    call, kept from their second use on.

    A `generate` call routes its prefill and every decode step the same way: the first use marks the
    rows, the second (the first decode step) keeps them, and from the second decode step on each layer
    finds its rows here instead of gathering them again. A plain forward
    uses its rows once and keeps none. At most `SCRATCH_BYTES` are kept; past that, layers gather on
    every call. Entries are keyed by the packed table (which the routing keeps alive), the index's
    shape and x's rank: within one routing those fix the index's values. An entry also holds its table
    weakly, so a table rebuilt at the address of a freed one (the adapters changed) is a miss.
    """

    __slots__ = ("entries", "nbytes")

    def __init__(self) -> None:
        # key -> (the table, the (c, s_up, s_down) windows); None: gathered once so far
        self.entries: dict[tuple, Optional[tuple[Callable[[], Optional[torch.Tensor]], _Windows]]] = {}
        self.nbytes = 0


def _gathered(
    table: ShiftedLayout, index: torch.Tensor, x_dim: int, half: int, scratch: Optional[Scratch] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each index entry's packed row, shaped to broadcast against an x of `x_dim` axes, as the
    windows `rotate_shifted` reads; through `scratch` when given."""
    key = (id(table.packed), tuple(index.shape), x_dim)
    hit = scratch.entries.get(key) if scratch is not None else None
    if hit is not None and hit[0]() is table.packed:  # not a table rebuilt since, at a reused address
        return hit[1]
    rows = rows_of(table.packed, index, x_dim - 1)
    windows = _windows(rows, half)
    if scratch is not None:
        keep = key in scratch.entries and scratch.nbytes + rows.nbytes <= SCRATCH_BYTES
        scratch.entries[key] = (weakref.ref(table.packed), windows) if keep else None
        scratch.nbytes += rows.nbytes if keep else 0
    return windows


def _forward_indexed_chunked(
    x: torch.Tensor, shifted_table: ShiftedLayout, index: torch.Tensor, half: int
) -> torch.Tensor:
    """`forward_indexed` through the packed tables, over chunks of at most `GATHER_BYTES` gathered.

    Each index entry gathers a (3, d) row, three times the size of a row of x. With one entry per
    token (a long prefill, packed sequences) gathering them all at once would take a scratch tensor
    of three times the activations.
    """
    if index.dim() == x.dim() - 1 and x.is_contiguous():  # one entry per token: chunk over all tokens
        x_, index_ = x.view(-1, x.shape[-1]), index.reshape(-1)
    else:
        x_, index_ = x, index
    step = max(1, GATHER_BYTES // (shifted_table.row_bytes * math.prod(index_.shape[1:])))
    out = torch.empty(x_.shape, dtype=x.dtype, device=x.device)
    for start in range(0, index_.shape[0], step):
        windows = _gathered(shifted_table, index_[start : start + step], x_.dim(), half)
        out[start : start + step] = rotate_shifted(x_[start : start + step], *windows, half)
    return out.view(x.shape)


def rotate_rows_(
    w: torch.Tensor,
    c: torch.Tensor,
    s: torch.Tensor,
    group_size: int,
    dtype: Optional[torch.dtype] = None,
    chunk_bytes: int = 4 << 20,
) -> torch.Tensor:
    """In place: w <- R w, for the output features on axis 0 of w (a weight or a bias).

    The math runs in `dtype` (default: w's dtype, at least float32). In w's own dtype each chunk is
    rotated in place with one half-size scratch; otherwise through scratch in `dtype`, rounded once
    on the store. w is processed a few groups at a time, so each chunk is read and written about
    once while it is in cache.
    """
    dtype = dtype or torch.promote_types(w.dtype, torch.float32)
    wv = pairs_view(w, group_size, 0)
    tail = (None,) * (w.dim() - 1)
    cv = pairs_view(c.to(dtype), group_size)[(...,) + tail]
    sv = pairs_view(s.to(dtype), group_size)[(...,) + tail]
    row_bytes = max(1, w[0].numel()) * torch.finfo(dtype).bits // 8
    step = max(1, chunk_bytes // (group_size * row_bytes))
    native = w.dtype == dtype  # rotate in place, keeping only the first half of each pair aside
    scratch = torch.empty((1 if native else 3,) + tuple(wv[:step, 0].shape), dtype=dtype, device=w.device)
    for start in range(0, wv.shape[0], step):
        a, b = wv[start : start + step].unbind(1)
        ca, cb = cv[start : start + step].unbind(1)
        sa, sb = sv[start : start + step].unbind(1)
        n = a.shape[0]
        if native:
            a_ = scratch[0, :n].copy_(a)
            a.mul_(ca).addcmul_(b, sa, value=-1)
            b.mul_(cb).addcmul_(a_, sb)
        else:
            a_, b_, out = (t[:n] for t in scratch)
            a_.copy_(a)
            b_.copy_(b)
            a.copy_(torch.mul(a_, ca, out=out).addcmul_(b_, sa, value=-1))
            b.copy_(torch.mul(b_, cb, out=out).addcmul_(a_, sb))
    return w


def rotate_shifted_halves(x: torch.Tensor, rows: torch.Tensor, halves: tuple[int, ...]) -> torch.Tensor:
    """R x for rows of x whose rotations may have different group sizes, as 1 + 2k ops. No autograd.

    `rows` has one packed coefficient row per row of x, shaped (..., 1 + 2k, d) to broadcast against
    x: row 0 holds c, and rows 1 + 2i and 2 + 2i hold the `shifted_layout` sines for group size
    2 * halves[i] (zero where a row's rotation has another group size). With one group size this is
    `rotate_shifted`. Math in the rows' dtype.
    """
    d = x.shape[-1]
    out = torch.mul(x, rows.select(-2, 0))
    for i, half in enumerate(halves):
        n = d - half
        out[..., :n].addcmul_(x[..., half:], rows.select(-2, 1 + 2 * i)[..., :n])
        out[..., half:].addcmul_(x[..., :n], rows.select(-2, 2 + 2 * i)[..., :n])
    return out


def rotate_slot_rows(
    x: torch.Tensor, c_table: torch.Tensor, s_table: torch.Tensor, half_table: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Row r of x (features last) is rotated by table row index[r], with that row's own group size
    2 * half_table[index[r]]. The reference for `triton_ops.rotate_slot_rows`: one masked pass per group
    size in use. Result in x's dtype."""
    c, s, half = c_table[index], s_table[index], half_table[index]
    out = torch.empty(x.shape, dtype=c.dtype, device=x.device)
    for h in torch.unique(half).tolist():
        rows = half == h
        out[rows] = rotate_values(x[rows], c[rows], s[rows], 2 * int(h))
    return in_dtype_of(x, out)


def handles_slots(x: torch.Tensor) -> bool:
    """The torch slot path rotates every tensor (the fallback of `kernels.forward_slots`)."""
    return True


def forward_slots(
    x: torch.Tensor, tables: SlotTables, index: torch.Tensor, runs: Optional[list[tuple[int, int, int]]] = None
) -> torch.Tensor:
    """Row t of x (n, d) rotated by row index[t] of the slot tables, on their `packed` rows, in float32;
    result in x's dtype.

    `runs`, when given, is the same index as (slot, start, end) runs of consecutive rows, each rotated by
    its slot's row as is. That spares a prefill, whose requests are long runs of tokens, gathering a
    coefficient row per token (three times the size of x).
    """
    packed, halves = tables.packed, tables.halves
    if runs is None:
        out = rotate_shifted_halves(x, packed.index_select(0, index), halves)
    else:
        out = torch.empty(x.shape, dtype=packed.dtype, device=x.device)
        for slot, start, end in runs:
            if slot in tables.active_slots:
                out[start:end] = rotate_shifted_halves(x[start:end], packed[slot], halves)
            else:
                out[start:end] = x[start:end]
    return in_dtype_of(x, out)
