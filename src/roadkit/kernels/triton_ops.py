"""The RoAd rotation as Triton kernels, for CUDA tensors with the features on the last axis.

The feature axis is viewed as (groups, 2, half): feature k*g + j pairs with k*g + j + g/2. Each
program handles a (rows, groups, half) tile, and `half` is a compile-time constant, so the
compiler sees runs of `half` contiguous, aligned features and moves them with vector loads and
stores (16 bytes at a time where the run is long enough) instead of one element per instruction.
Each pair is read once from x and once from each coefficient vector; nothing but the output is
written. For mixed batches the kernel reads each row's coefficients from a table through its
adapter index, so no per-row coefficient tensor is ever materialised.

One kernel is compiled per group size (and dtype), which a model has one or a few of.
On machines without a GPU these kernels run under `TRITON_INTERPRET=1` (the tests do this).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(pid_g, d, HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_G: tl.constexpr):
    """Offsets of the first features of this program's pairs, as a (1, groups, half) tile, and its mask."""
    groups = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    j = tl.arange(0, HALF_P2)
    fa = groups[:, None] * (2 * HALF) + j[None, :]
    fmask = (groups < d // (2 * HALF))[:, None] & (j < HALF)[None, :]
    return fa[None, :, :], fmask[None, :, :]


@triton.jit
def _rotate_fwd(
    X,
    C,
    S,
    IDX,
    Y,
    n_rows,
    d,
    rows_per_index,
    HALF: tl.constexpr,
    HALF_P2: tl.constexpr,
    HAS_IDX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    fa, fmask = _tile(tl.program_id(1), d, HALF, HALF_P2, BLOCK_G)
    rmask = (rows < n_rows)[:, None, None]
    mask = rmask & fmask
    if HAS_IDX:
        entry = tl.load(IDX + rows // rows_per_index, mask=rows < n_rows, other=0)
        crow = entry.to(tl.int64)[:, None, None] * d
        cmask = mask
    else:
        crow = tl.zeros((1, 1, 1), dtype=tl.int64)
        cmask = fmask
    ca = tl.load(C + crow + fa, mask=cmask, other=0.0)
    cb = tl.load(C + crow + fa + HALF, mask=cmask, other=0.0)
    sa = tl.load(S + crow + fa, mask=cmask, other=0.0)
    sb = tl.load(S + crow + fa + HALF, mask=cmask, other=0.0)
    xa_ptr = X + rows.to(tl.int64)[:, None, None] * d + fa
    ya_ptr = Y + rows.to(tl.int64)[:, None, None] * d + fa
    xa = tl.load(xa_ptr, mask=mask, other=0.0).to(tl.float32)
    xb = tl.load(xa_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ya_ptr, (ca * xa - sa * xb).to(Y.dtype.element_ty), mask=mask)
    tl.store(ya_ptr + HALF, (cb * xb + sb * xa).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_bwd(
    GY,
    X,
    C,
    S,
    GX,
    DC,
    DS,
    n_rows,
    d,
    n_row_progs,
    HALF: tl.constexpr,
    HALF_P2: tl.constexpr,
    NEED_GX: tl.constexpr,
    NEED_CS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """dx = R^T gy, and per-program partial sums of dc = sum gy*x, ds = sum gy*rot(x)."""
    pid_r = tl.program_id(0)
    fa, fmask = _tile(tl.program_id(1), d, HALF, HALF_P2, BLOCK_G)
    ca = tl.load(C + fa, mask=fmask, other=0.0)
    cb = tl.load(C + fa + HALF, mask=fmask, other=0.0)
    sa = tl.load(S + fa, mask=fmask, other=0.0)
    sb = tl.load(S + fa + HALF, mask=fmask, other=0.0)
    acc_ca = tl.zeros((BLOCK_G, HALF_P2), dtype=tl.float32)
    acc_cb = tl.zeros((BLOCK_G, HALF_P2), dtype=tl.float32)
    acc_sa = tl.zeros((BLOCK_G, HALF_P2), dtype=tl.float32)
    acc_sb = tl.zeros((BLOCK_G, HALF_P2), dtype=tl.float32)
    for start in range(pid_r * BLOCK_R, n_rows, n_row_progs * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < n_rows)[:, None, None] & fmask
        offs = rows.to(tl.int64)[:, None, None] * d + fa
        ga = tl.load(GY + offs, mask=mask, other=0.0).to(tl.float32)
        gb = tl.load(GY + offs + HALF, mask=mask, other=0.0).to(tl.float32)
        if NEED_GX:
            tl.store(GX + offs, (ca * ga + sb * gb).to(GX.dtype.element_ty), mask=mask)
            tl.store(GX + offs + HALF, (cb * gb - sa * ga).to(GX.dtype.element_ty), mask=mask)
        if NEED_CS:
            xa = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            xb = tl.load(X + offs + HALF, mask=mask, other=0.0).to(tl.float32)
            acc_ca += tl.sum(ga * xa, axis=0)
            acc_cb += tl.sum(gb * xb, axis=0)
            acc_sa -= tl.sum(ga * xb, axis=0)
            acc_sb += tl.sum(gb * xa, axis=0)
    if NEED_CS:
        out = pid_r.to(tl.int64) * d + tl.reshape(fa, (BLOCK_G, HALF_P2))
        omask = tl.reshape(fmask, (BLOCK_G, HALF_P2))
        tl.store(DC + out, acc_ca, mask=omask)
        tl.store(DC + out + HALF, acc_cb, mask=omask)
        tl.store(DS + out, acc_sa, mask=omask)
        tl.store(DS + out + HALF, acc_sb, mask=omask)


MAX_ROW_PROGRAMS = 128  # backward: programs along the rows, each looping over row blocks
TILE_PAIRS = 2048  # pairs per program and row block: enough bytes in flight, few enough registers


def _blocks(d: int, group_size: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_G, HALF_P2): rows and groups per tile, and the half padded to a power of two."""
    half_p2 = triton.next_power_of_2(group_size // 2)
    block_g = min(triton.next_power_of_2(d // group_size), max(1, 512 // half_p2))
    return max(1, TILE_PAIRS // (block_g * half_p2)), block_g, half_p2


def _launch_fwd(
    x2: torch.Tensor,
    c: torch.Tensor,
    s: torch.Tensor,
    idx: Optional[torch.Tensor],
    group_size: int,
    rows_per_index: int = 1,
) -> torch.Tensor:
    n_rows, d = x2.shape
    y = torch.empty_like(x2)
    block_r, block_g, half_p2 = _blocks(d, group_size)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(d // group_size, block_g))
    _rotate_fwd[grid](
        x2,
        c,
        s,
        idx if idx is not None else c,
        y,
        n_rows,
        d,
        rows_per_index,
        HALF=group_size // 2,
        HALF_P2=half_p2,
        HAS_IDX=idx is not None,
        BLOCK_R=block_r,
        BLOCK_G=block_g,
    )
    return y


per_row = False  # per-feature coefficients only (mixed batches read the tables through the index)


def handles(x: torch.Tensor, dim: int) -> bool:
    """CUDA tensors with the features on the last axis (torch.compile picks the traced backend before)."""
    return x.is_cuda and dim % x.dim() == x.dim() - 1


def prepare(c: torch.Tensor, s: torch.Tensor, group_size: int) -> None:
    """The kernels read (c, s) as they are: nothing to pack."""
    return None


def new_scratch() -> None:
    """The mixed-batch kernel reads the tables through the index: nothing to keep between calls."""
    return None


def forward(
    x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int, dim: int = -1, prepared: None = None
) -> torch.Tensor:
    """y = R x over the last axis with per-feature (c, s) of shape (d,); result in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return _launch_fwd(x2, c.float().contiguous(), s.float().contiguous(), None, group_size).view(x.shape)


def backward(
    gy: torch.Tensor,
    x: Optional[torch.Tensor],
    c: torch.Tensor,
    s: torch.Tensor,
    group_size: int,
    dim: int,
    need_gx: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx = R^T gy, dc, ds) in one pass over gy and x; dc and ds only when x is given."""
    gy2 = gy.reshape(-1, gy.shape[-1]).contiguous()
    x2 = x.reshape(-1, x.shape[-1]).contiguous() if x is not None else None
    c32, s32 = c.float().contiguous(), s.float().contiguous()
    n_rows, d = gy2.shape
    block_r, block_g, half_p2 = _blocks(d, group_size)
    n_row_progs = min(triton.cdiv(n_rows, block_r), MAX_ROW_PROGRAMS)
    gx = torch.empty_like(gy2) if need_gx else gy2
    dc = torch.empty(n_row_progs, d, device=gy.device, dtype=torch.float32) if x2 is not None else c32
    ds = torch.empty_like(dc) if x2 is not None else s32
    grid = (n_row_progs, triton.cdiv(d // group_size, block_g))
    _rotate_bwd[grid](
        gy2,
        x2 if x2 is not None else gy2,
        c32,
        s32,
        gx,
        dc,
        ds,
        n_rows,
        d,
        n_row_progs,
        HALF=group_size // 2,
        HALF_P2=half_p2,
        NEED_GX=need_gx,
        NEED_CS=x2 is not None,
        BLOCK_R=block_r,
        BLOCK_G=block_g,
    )
    if x2 is None:
        return (gx.view(gy.shape) if need_gx else None), None, None
    return (gx.view(gy.shape) if need_gx else None), dc.sum(0).to(c.dtype), ds.sum(0).to(s.dtype)


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
    """Mixed batches: row r of x (flattened leading axes) uses coefficient row index[r] of the tables.

    `index` covers a prefix of x's leading axes (per batch row) or all of them (per token). Each
    entry then serves the `rows_per_index` consecutive rows of flattened x that share it; the
    kernel maps rows to entries itself, so a call launches nothing but the kernel when x is
    contiguous, the tables are float32 and the index is int32 (as `RoadModel`'s routing makes it).
    """
    lead = x.shape[:-1]
    rows_per_index = math.prod(lead[index.dim() :])
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    idx = index.reshape(-1).to(torch.int32).contiguous()
    y = _launch_fwd(x2, c_table.float().contiguous(), s_table.float().contiguous(), idx, group_size, rows_per_index)
    return y.view(x.shape)


@triton.jit
def _rotate_slots_fwd(X, C, S, HALF, IDX, Y, n_rows, d, n_slots, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Row r uses table row IDX[r] (out of range: the identity row n_slots) with its own half size."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    f = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < n_rows
    entry = tl.load(IDX + rows, mask=rmask, other=0).to(tl.int64)
    entry = tl.where((entry < 0) | (entry > n_slots), n_slots, entry)
    half = tl.load(HALF + entry, mask=rmask, other=1).to(tl.int64)[:, None]
    first = (f[None, :] % (2 * half)) < half
    partner = tl.where(first, f[None, :] + half, f[None, :] - half)
    mask = rmask[:, None] & (f < d)[None, :]
    crow = entry[:, None] * d
    c = tl.load(C + crow + f[None, :], mask=mask, other=0.0)
    s = tl.load(S + crow + f[None, :], mask=mask, other=0.0)
    xrow = X + rows.to(tl.int64)[:, None] * d
    x = tl.load(xrow + f[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(xrow + partner, mask=mask, other=0.0).to(tl.float32)
    y = c * x + tl.where(first, -s, s) * xp
    tl.store(Y + rows.to(tl.int64)[:, None] * d + f[None, :], y.to(Y.dtype.element_ty), mask=mask)


def rotate_slot_rows(
    x: torch.Tensor, c_table: torch.Tensor, s_table: torch.Tensor, half_table: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Serving: row r of x (features last) is rotated by table row index[r] with that row's own group
    size 2 * half_table[index[r]], all group sizes in one pass. Tables are float32 (n_slots + 1, d)
    with the identity in the last row; indices outside [0, n_slots) select it, so a persistent index
    buffer with -1 for "no adapter" or stale entries past the live rows is read as is, with no host
    sync."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()  # the kernel addresses x and y as row-major (n_rows, d)
    n_rows, d = x2.shape
    y = torch.empty_like(x2)
    block_d = min(triton.next_power_of_2(d), 1024)
    block_r = max(1, 4096 // block_d)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(d, block_d))
    _rotate_slots_fwd[grid](
        x2, c_table, s_table, half_table, index, y, n_rows, d, c_table.shape[0] - 1, BLOCK_R=block_r, BLOCK_D=block_d
    )
    return y.view(x.shape)
