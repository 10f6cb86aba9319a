"""Triton kernels against the torch kernels (run in Triton's interpreter when there is no GPU)."""

from __future__ import annotations

import pytest
import torch

from roadkit.kernels import torch_ops

triton_ops = pytest.importorskip("roadkit.kernels.triton_ops")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def coeffs(d: int, n: int = 0, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, d) if n else (d,)
    return (torch.randn(shape, generator=gen).to(DEVICE), torch.randn(shape, generator=gen).to(DEVICE))


@pytest.mark.parametrize("shape, g", [((3, 5, 16), 4), ((7, 24), 8), ((2, 3, 8), 2), ((1, 130), 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_torch(shape, g, dtype):
    x = torch.randn(shape).to(DEVICE, dtype)
    c, s = coeffs(shape[-1])
    expected = torch_ops.forward(x, c, s, g)
    got = triton_ops.forward(x, c, s, g)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("max_programs", [128, 2])  # 2: each program loops over several row blocks
@pytest.mark.parametrize("shape, g", [((3, 5, 16), 4), ((40, 24), 8), ((9, 48), 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_torch(shape, g, dtype, max_programs, monkeypatch):
    monkeypatch.setattr(triton_ops, "MAX_ROW_PROGRAMS", max_programs)
    x = torch.randn(shape).to(DEVICE, dtype)
    c, s = coeffs(shape[-1], seed=1)
    gy = torch.randn(shape).to(DEVICE, dtype)
    want = torch_ops.backward(gy, x, c, s, g, -1, need_gx=True)
    got = triton_ops.backward(gy, x, c, s, g, -1, need_gx=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got[0].dtype == dtype
    for w, o in zip(want, got, strict=True):
        torch.testing.assert_close(o, w, rtol=tol, atol=tol)


def test_backward_without_x_gives_only_the_input_gradient():
    gy = torch.randn(4, 8).to(DEVICE)
    c, s = coeffs(8)
    gx, gc, gs = triton_ops.backward(gy, None, c, s, 4, -1, need_gx=True)
    assert gc is None and gs is None
    torch.testing.assert_close(gx, torch_ops.backward(gy, None, c, s, 4, -1, need_gx=True)[0])
    x = torch.randn(4, 8).to(DEVICE)
    gx, gc, gs = triton_ops.backward(gy, x, c, s, 4, -1, need_gx=False)
    assert gx is None
    torch.testing.assert_close(gc, torch_ops.backward(gy, x, c, s, 4, -1, need_gx=False)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index_shape", ["row", "token", "flat"])
def test_indexed_matches_torch_gather(index_shape):
    B, T, d, g = 3, 4, 16, 8
    x = torch.randn(B, T, d).to(DEVICE)
    c, s = coeffs(d, n=5)
    gen = torch.Generator().manual_seed(3)
    index = {"row": torch.randint(0, 5, (B,), generator=gen), "token": torch.randint(0, 5, (B, T), generator=gen)}.get(
        index_shape
    )
    if index is None:
        index = torch.randint(0, 5, (B * T,), generator=gen)
        x = x.view(B * T, d)
    index = index.to(DEVICE)
    expected = torch_ops.forward_indexed(x, c, s, index, g)
    torch.testing.assert_close(triton_ops.forward_indexed(x, c, s, index, g), expected, rtol=1e-6, atol=1e-6)


def test_implementation_names_the_kernels_that_run():
    from roadkit import kernels

    assert kernels.implementation(torch.randn(2, 8)) == "torch"  # CPU tensors: the torch path
    if torch.cuda.is_available():
        x = torch.randn(2, 8, device="cuda")
        assert kernels.implementation(x) == "triton"
        assert kernels.implementation(x.unsqueeze(-1), dim=1) == "torch"  # features not last: torch


GROUP_SIZES_COMPILED = [8, 16, 24, 64, 128]

# Run in a fresh interpreter: the tests' process may hold the kernels as Triton-interpreter
# functions (TRITON_INTERPRET=1), which cannot be compiled.
_COMPILE_PTX = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from roadkit.kernels import triton_ops as T

FWD = {"X": "*bf16", "C": "*fp32", "S": "*fp32", "IDX": "*i32", "Y": "*bf16", "n_rows": "i32", "d": "i32",
       "rows_per_index": "i32", "HALF": "constexpr", "HALF_P2": "constexpr", "HAS_IDX": "constexpr",
       "BLOCK_R": "constexpr", "BLOCK_G": "constexpr"}
BWD = {"GY": "*bf16", "X": "*bf16", "C": "*fp32", "S": "*fp32", "GX": "*bf16", "DC": "*fp32", "DS": "*fp32",
       "n_rows": "i32", "d": "i32", "n_row_progs": "i32", "HALF": "constexpr", "HALF_P2": "constexpr",
       "NEED_GX": "constexpr", "NEED_CS": "constexpr", "BLOCK_R": "constexpr", "BLOCK_G": "constexpr"}

def memory_ops(kernel, signature, constexprs):
    # specialized as a launch specializes: pointers 16-byte aligned, d divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
             if kind.startswith("*") or name == "d"}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    return sorted(set(re.findall(r"\b(?:ld|st)\.global(?:\.\w+)*", ptx)))

out = {}
for g in json.loads(sys.argv[1]):
    block_r, block_g, half_p2 = T._blocks(4096, g)
    tile = {"HALF": g // 2, "HALF_P2": half_p2, "BLOCK_R": block_r, "BLOCK_G": block_g}
    out[g] = {"forward": memory_ops(T._rotate_fwd, FWD, {**tile, "HAS_IDX": False}),
              "mixed forward": memory_ops(T._rotate_fwd, FWD, {**tile, "HAS_IDX": True}),
              "backward": memory_ops(T._rotate_bwd, BWD, {**tile, "NEED_GX": True, "NEED_CS": True})}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled_memory_ops() -> dict:
    """Global loads and stores in each kernel's PTX for an H100/H200 (sm_90), compiled ahead of
    time (no GPU needed), per group size."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_PTX, json.dumps(GROUP_SIZES_COMPILED)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return {int(g): ops for g, ops in json.loads(run.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize("group_size", GROUP_SIZES_COMPILED)
def test_compiled_kernels_move_bf16_features_in_vectors(compiled_memory_ops, group_size):
    """Each pair's halves are runs of group_size/2 contiguous features; the compiled kernels must
    load and store them several at a time (one 2-byte element per instruction starves the memory
    system): no scalar 16-bit global load or store anywhere, and vector ones present."""
    for name, ops in compiled_memory_ops[group_size].items():
        assert ops, name
        assert not [op for op in ops if op.endswith(".b16")], (name, ops)
        assert any(".v2." in op or ".v4." in op for op in ops), (name, ops)
