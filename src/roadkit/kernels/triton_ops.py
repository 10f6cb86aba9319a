"""The RoAd rotation as Triton kernels, for CUDA tensors with the features on the last axis.

Each program handles a tile of rows x pairs. A pair (a, b) = (k*g + j, k*g + j + g/2) is loaded
once from x and once from each coefficient vector; nothing but the output is written. For mixed
batches the kernel reads each row's coefficients from a table through its adapter index, so no
per-row coefficient tensor is ever materialised.

On machines without a GPU these kernels run under `TRITON_INTERPRET=1` (the tests do this).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _pair_offsets(pid_p, half, n_pairs, BLOCK_P: tl.constexpr):
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    fa = (p // half) * (2 * half) + p % half
    return fa, fa + half, p < n_pairs


@triton.jit
def _rotate_fwd(X, C, S, IDX, Y, n_rows, d, half, rows_per_index, HAS_IDX: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    fa, fb, pmask = _pair_offsets(tl.program_id(1), half, d // 2, BLOCK_P)
    rmask = rows < n_rows
    mask = rmask[:, None] & pmask[None, :]
    if HAS_IDX:
        crow = tl.load(IDX + rows // rows_per_index, mask=rmask, other=0).to(tl.int64)[:, None] * d
        cmask = mask
    else:
        crow = tl.zeros((BLOCK_R, 1), dtype=tl.int64)
        cmask = pmask[None, :]
    ca = tl.load(C + crow + fa[None, :], mask=cmask, other=0.0)
    cb = tl.load(C + crow + fb[None, :], mask=cmask, other=0.0)
    sa = tl.load(S + crow + fa[None, :], mask=cmask, other=0.0)
    sb = tl.load(S + crow + fb[None, :], mask=cmask, other=0.0)
    xrow = rows.to(tl.int64)[:, None] * d
    xa = tl.load(X + xrow + fa[None, :], mask=mask, other=0.0).to(tl.float32)
    xb = tl.load(X + xrow + fb[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + xrow + fa[None, :], (ca * xa - sa * xb).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + xrow + fb[None, :], (cb * xb + sb * xa).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_bwd(GY, X, C, S, GX, DC, DS, n_rows, d, half, n_row_progs,
                NEED_GX: tl.constexpr, NEED_CS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """dx = R^T gy, and per-program partial sums of dc = sum gy*x, ds = sum gy*rot(x)."""
    pid_r = tl.program_id(0)
    fa, fb, pmask = _pair_offsets(tl.program_id(1), half, d // 2, BLOCK_P)
    ca = tl.load(C + fa, mask=pmask, other=0.0)[None, :]
    cb = tl.load(C + fb, mask=pmask, other=0.0)[None, :]
    sa = tl.load(S + fa, mask=pmask, other=0.0)[None, :]
    sb = tl.load(S + fb, mask=pmask, other=0.0)[None, :]
    acc_ca = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc_cb = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc_sa = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc_sb = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for start in range(pid_r * BLOCK_R, n_rows, n_row_progs * BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < n_rows)[:, None] & pmask[None, :]
        row = rows.to(tl.int64)[:, None] * d
        ga = tl.load(GY + row + fa[None, :], mask=mask, other=0.0).to(tl.float32)
        gb = tl.load(GY + row + fb[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_GX:
            tl.store(GX + row + fa[None, :], (ca * ga + sb * gb).to(GX.dtype.element_ty), mask=mask)
            tl.store(GX + row + fb[None, :], (cb * gb - sa * ga).to(GX.dtype.element_ty), mask=mask)
        if NEED_CS:
            xa = tl.load(X + row + fa[None, :], mask=mask, other=0.0).to(tl.float32)
            xb = tl.load(X + row + fb[None, :], mask=mask, other=0.0).to(tl.float32)
            acc_ca += tl.sum(ga * xa, axis=0)
            acc_cb += tl.sum(gb * xb, axis=0)
            acc_sa -= tl.sum(ga * xb, axis=0)
            acc_sb += tl.sum(gb * xa, axis=0)
    if NEED_CS:
        out = pid_r.to(tl.int64) * d
        tl.store(DC + out + fa, acc_ca, mask=pmask)
        tl.store(DC + out + fb, acc_cb, mask=pmask)
        tl.store(DS + out + fa, acc_sa, mask=pmask)
        tl.store(DS + out + fb, acc_sb, mask=pmask)


MAX_ROW_PROGRAMS = 128  # backward: programs along the rows, each looping over row blocks


def _blocks(d: int) -> tuple[int, int]:
    block_p = min(512, triton.next_power_of_2(max(d // 2, 1)))
    return max(1, 2048 // block_p), block_p


def _launch_fwd(x2: torch.Tensor, c: torch.Tensor, s: torch.Tensor, idx: Optional[torch.Tensor],
                group_size: int, rows_per_index: int = 1) -> torch.Tensor:
    n_rows, d = x2.shape
    y = torch.empty_like(x2)
    block_r, block_p = _blocks(d)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(d // 2, block_p))
    _rotate_fwd[grid](x2, c, s, idx if idx is not None else c, y, n_rows, d, group_size // 2, rows_per_index,
                      HAS_IDX=idx is not None, BLOCK_R=block_r, BLOCK_P=block_p)
    return y


def forward(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """y = R x over the last axis with per-feature (c, s) of shape (d,); result in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return _launch_fwd(x2, c.float().contiguous(), s.float().contiguous(), None, group_size).view(x.shape)


def backward(gy: torch.Tensor, x: Optional[torch.Tensor], c: torch.Tensor, s: torch.Tensor, group_size: int,
             need_gx: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(dx = R^T gy, dc, ds) in one pass over gy and x; dc and ds only when x is given."""
    gy2 = gy.reshape(-1, gy.shape[-1]).contiguous()
    x2 = x.reshape(-1, x.shape[-1]).contiguous() if x is not None else None
    c32, s32 = c.float().contiguous(), s.float().contiguous()
    n_rows, d = gy2.shape
    block_r, block_p = _blocks(d)
    n_row_progs = min(triton.cdiv(n_rows, block_r), MAX_ROW_PROGRAMS)
    gx = torch.empty_like(gy2) if need_gx else gy2
    dc = torch.empty(n_row_progs, d, device=gy.device, dtype=torch.float32) if x2 is not None else c32
    ds = torch.empty_like(dc) if x2 is not None else s32
    grid = (n_row_progs, triton.cdiv(d // 2, block_p))
    _rotate_bwd[grid](gy2, x2 if x2 is not None else gy2, c32, s32, gx, dc, ds, n_rows, d, group_size // 2,
                      n_row_progs, NEED_GX=need_gx, NEED_CS=x2 is not None, BLOCK_R=block_r, BLOCK_P=block_p)
    if x2 is None:
        return (gx.view(gy.shape) if need_gx else None), None, None
    return (gx.view(gy.shape) if need_gx else None), dc.sum(0).to(c.dtype), ds.sum(0).to(s.dtype)


def forward_indexed(x: torch.Tensor, c_table: torch.Tensor, s_table: torch.Tensor, index: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """Mixed batches: row r of x (flattened leading axes) uses coefficient row index[r] of the tables.

    `index` covers a prefix of x's leading axes (per batch row) or all of them (per token). Each
    entry then serves the `rows_per_index` consecutive rows of flattened x that share it; the
    kernel maps rows to entries itself, so a call launches nothing but the kernel when x is
    contiguous, the tables are float32 and the index is int32 (as `RoadModel`'s routing makes it).
    """
    lead = x.shape[:-1]
    rows_per_index = math.prod(lead[index.dim():])
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    idx = index.reshape(-1).to(torch.int32).contiguous()
    y = _launch_fwd(x2, c_table.float().contiguous(), s_table.float().contiguous(), idx, group_size,
                    rows_per_index)
    return y.view(x.shape)
