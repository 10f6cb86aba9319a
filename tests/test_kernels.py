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
@pytest.mark.parametrize("shape, g", [((3, 5, 16), 4), ((40, 24), 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_torch(shape, g, dtype, max_programs, monkeypatch):
    monkeypatch.setattr(triton_ops, "MAX_ROW_PROGRAMS", max_programs)
    x = torch.randn(shape).to(DEVICE, dtype)
    c, s = coeffs(shape[-1], seed=1)
    gy = torch.randn(shape).to(DEVICE, dtype)
    want = torch_ops.backward(gy, x, c, s, g, -1, need_gx=True)
    got = triton_ops.backward(gy, x, c, s, g, need_gx=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got[0].dtype == dtype
    for w, o in zip(want, got, strict=True):
        torch.testing.assert_close(o, w, rtol=tol, atol=tol)


def test_backward_without_x_gives_only_the_input_gradient():
    gy = torch.randn(4, 8).to(DEVICE)
    c, s = coeffs(8)
    gx, gc, gs = triton_ops.backward(gy, None, c, s, 4, need_gx=True)
    assert gc is None and gs is None
    torch.testing.assert_close(gx, torch_ops.backward(gy, None, c, s, 4, -1, need_gx=True)[0])
    x = torch.randn(4, 8).to(DEVICE)
    gx, gc, gs = triton_ops.backward(gy, x, c, s, 4, need_gx=False)
    assert gx is None
    torch.testing.assert_close(gc, torch_ops.backward(gy, x, c, s, 4, -1, need_gx=False)[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("index_shape", ["row", "token", "flat"])
def test_indexed_matches_torch_gather(index_shape):
    B, T, d, g = 3, 4, 16, 8
    x = torch.randn(B, T, d).to(DEVICE)
    c, s = coeffs(d, n=5)
    gen = torch.Generator().manual_seed(3)
    index = {"row": torch.randint(0, 5, (B,), generator=gen),
             "token": torch.randint(0, 5, (B, T), generator=gen)}.get(index_shape)
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
