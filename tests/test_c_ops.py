"""The C backend (`kernels.c_ops`): vLLM's rotation on CPU, checked against dense d x d rotations.

Tolerances: float32 within 1e-5 of the float64 reference; bfloat16 and float16 at most one rounding
step (one unit in the last place) from the reference rounded to the dtype, since the kernel computes
in float32 and rounds once.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_vllm_slots import dense_rotation, dense_rows, random_cs

from roadkit import functional as F
from roadkit.kernels import c_ops

if not c_ops.handles_slots(torch.zeros(1, 2)):
    pytest.skip(f"the C backend is unavailable here: {c_ops._load()}", allow_module_level=True)

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def tables(d: int, groups: tuple[int, ...], seed: int = 0, table: torch.dtype = torch.float32):
    """k = c - 1, w (`table` dtype, (n + 1, d)), half (int32) for one slot per group size, the identity last;
    and the dense rotation of every row, from the coefficients as the tables hold them."""
    n = len(groups)
    k, w = torch.zeros(n + 1, d, dtype=table), torch.zeros(n + 1, d, dtype=table)
    half = torch.ones(n + 1, dtype=torch.int32)
    mats = []
    for row, g in enumerate(groups):
        c, s = random_cs(d, seed=seed + row)
        k[row] = c - 1
        w[row] = s.view(-1, 2, g // 2).mul(torch.tensor([-1.0, 1.0]).view(1, 2, 1)).flatten()
        held_s = w[row].float().view(-1, 2, g // 2).mul(torch.tensor([-1.0, 1.0]).view(1, 2, 1)).flatten()
        half[row] = g // 2
        mats.append(dense_rotation(1 + k[row].double(), held_s, g))
    mats.append(torch.eye(d, dtype=torch.float64))
    return k, w, half, mats


def check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:
        rounded = want.to(dtype).double()
        torch.testing.assert_close(got.double(), rounded, rtol=ULP[dtype], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "d, groups",
    [
        (64, (2, 4, 8, 16)),  # the unrolled short groups
        (192, (32, 64, 192)),  # halves of whole 16-feature vectors
        (96, (6, 24, 48, 96)),  # odd halves, and halves that are not multiples of 16
    ],
)
@pytest.mark.parametrize("n", [1, 7, 33])
@pytest.mark.parametrize("table", [torch.float32, torch.bfloat16])
def test_rotate_rows_matches_dense(dtype: torch.dtype, d: int, groups: tuple[int, ...], n: int, table: torch.dtype):
    k, w, half, mats = tables(d, groups, seed=d, table=table)
    identity = len(groups)
    index = torch.arange(n) % (identity + 1)
    x = torch.randn(n, d).to(dtype)
    got = c_ops.rotate_rows(x, k, w, half, index, identity)
    check(got, dense_rows(x.float(), mats, index.tolist()), dtype)


def test_bfloat16_tables_keep_small_deviations():
    """Holding c - 1 (not c) in bfloat16 keeps an adapter's deviations from the identity to bfloat16's relative
    precision: against float32 tables, each output moves by at most 2^-8 of |k x| + |w x_partner|, far below
    a bfloat16 output's own rounding of |x|."""
    d, g = 64, 8
    gen = torch.Generator().manual_seed(3)
    theta, alpha = 1e-3 * torch.randn(d, generator=gen), 1 + 1e-3 * torch.randn(d, generator=gen)
    c, s = alpha * theta.cos(), alpha * theta.sin()
    w = s.view(-1, 2, g // 2).mul(torch.tensor([-1.0, 1.0]).view(1, 2, 1)).flatten()
    half = torch.tensor([g // 2, 1], dtype=torch.int32)
    x = torch.randn(9, d)
    index = torch.zeros(9, dtype=torch.long)
    k32, w32 = torch.stack((c - 1, torch.zeros(d))), torch.stack((w, torch.zeros(d)))
    exact = c_ops.rotate_rows(x, k32, w32, half, index, 1)
    held = c_ops.rotate_rows(x, k32.bfloat16(), w32.bfloat16(), half, index, 1)
    partner = x.view(9, -1, 2, g // 2).flip(2).reshape(9, d)
    bound = 2.0**-8 * ((c - 1).abs() * x.abs() + w.abs() * partner.abs()) + 1e-7
    assert ((held - exact).abs() <= bound).all()
    assert ((exact - x).abs() > 100 * bound).any()  # the deviations themselves are kept


@pytest.mark.parametrize("variant, g", [("road_1", 8), ("road_2", 32), ("road_4", 64)])
def test_rotate_rows_with_variant_coefficients(variant: str, g: int):
    d = 128
    gen = torch.Generator().manual_seed(1)
    n = F.parameter_length(variant, d)
    c, s = F.coefficients(variant, g, 0.3 * torch.randn(n, generator=gen), 1 + 0.2 * torch.randn(n, generator=gen))
    w = s.view(-1, 2, g // 2).mul(torch.tensor([-1.0, 1.0]).view(1, 2, 1)).flatten()
    ct, wt = torch.stack((c - 1, torch.zeros(d))), torch.stack((w, torch.zeros(d)))
    half = torch.tensor([g // 2, 1], dtype=torch.int32)
    x = torch.randn(5, d)
    index = torch.tensor([0, 1, 0, 0, 1])
    mats = [dense_rotation(c, s, g), torch.eye(d, dtype=torch.float64)]
    check(c_ops.rotate_rows(x, ct, wt, half, index, 1), dense_rows(x, mats, index.tolist()), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_rows_are_copied_bit_for_bit(dtype: torch.dtype):
    """Tokens without an adapter keep their values exactly, inf and NaN included."""
    k, w, half, _ = tables(32, (4,))
    x = torch.randn(3, 32).to(dtype)
    x[1, 0], x[1, 5] = float("inf"), float("nan")
    got = c_ops.rotate_rows(x, k, w, half, torch.tensor([1, 1, 1]), 1)
    assert torch.equal(got[~x.isnan()], x[~x.isnan()]) and got[1, 5].isnan()


def test_rows_of_a_wider_tensor():
    """x a column slice of a wider tensor (rows not adjacent, as vLLM's q, k, v views are)."""
    k, w, half, mats = tables(64, (8, 32))
    wide = torch.randn(6, 100).bfloat16()
    x = wide[:, 20:84]
    assert not x.is_contiguous() and c_ops.handles_slots(x)
    index = torch.tensor([0, 1, 2, 1, 0, 2])
    check(c_ops.rotate_rows(x, k, w, half, index, 2), dense_rows(x.float(), mats, index.tolist()), torch.bfloat16)
    assert not c_ops.handles_slots(torch.randn(64, 6).t())  # features not contiguous: the torch path's


def test_bad_index_or_half_raises():
    k, w, half, _ = tables(32, (4, 8))
    x = torch.randn(3, 32)
    with pytest.raises(ValueError, match="outside the table"):
        c_ops.rotate_rows(x, k, w, half, torch.tensor([0, 3, 1]), 2)
    with pytest.raises(ValueError, match="outside the table"):
        c_ops.rotate_rows(x, k, w, half, torch.tensor([-1, 0, 1]), 2)
    bad = half.clone()
    bad[1] = 3  # 32 features are not whole groups of 6
    with pytest.raises(ValueError, match="whole groups"):
        c_ops.rotate_rows(x, k, w, bad, torch.tensor([0, 1, 2]), 2)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        c_ops.rotate_rows(x, k.double(), w.double(), half, torch.tensor([0, 1, 2]), 2)


def test_without_a_compiler_the_torch_path_serves(tmp_path):
    """No C compiler: `handles_slots` is False with the reason, and a SlotTable still rotates (torch path)."""
    code = (
        "import torch\n"
        "from roadkit.kernels import c_ops\n"
        "from roadkit.integrations.vllm.slots import SlotTable\n"
        "print(c_ops.handles_slots(torch.zeros(2, 4)), c_ops._load())\n"
        "t = SlotTable(1, 4)\n"
        "t.set(0, torch.zeros(4), torch.ones(4), 2)\n"
        "print(t.forward(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([0])).tolist())\n"
    )
    env = {**os.environ, "PATH": str(tmp_path), "CC": "", "ROADKIT_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].startswith("False no C compiler found")
    assert out.splitlines()[1] == "[[-2.0, 1.0, -4.0, 3.0]]"  # y_a = -x_b, y_b = x_a: a quarter turn


def test_a_failed_build_is_reported(tmp_path, monkeypatch):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: error: no such thing' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("ROADKIT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(c_ops.CKernelUnavailable, match="failed to compile c_ops.c: cc: error: no such thing"):
        c_ops._build(str(fake))
    assert not list((tmp_path / "cache" / "kernels").iterdir())  # nothing half-written left behind
