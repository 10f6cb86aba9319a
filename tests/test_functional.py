"""The RoAd math against a dense-matrix reference written straight from ROAD_SPEC.md."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from roadkit import functional as F
from roadkit import kernels

VARIANTS = ["road_1", "road_2", "road_4"]


def spec_coefficients(variant: str, g: int, theta: torch.Tensor, alpha: torch.Tensor, d: int):
    """(c, s) element by element, as the spec's table states them."""
    c, s = torch.empty(d, dtype=theta.dtype), torch.empty(d, dtype=theta.dtype)
    half = g // 2
    for k in range(d // g):
        for i in range(g):
            f = k * g + i
            if variant == "road_1":
                e = k * half + (i % half)
                c[f], s[f] = alpha[e] * math.cos(theta[e]), alpha[e] * math.sin(theta[e])
            elif variant == "road_2":
                c[f], s[f] = alpha[f] * math.cos(theta[f]), alpha[f] * math.sin(theta[f])
            else:
                c[f] = alpha[k * 2 * g + i] * math.cos(theta[k * 2 * g + i])
                s[f] = alpha[k * 2 * g + g + i] * math.sin(theta[k * 2 * g + g + i])
    return c, s


def dense(c: torch.Tensor, s: torch.Tensor, g: int) -> torch.Tensor:
    """The block-diagonal matrix R with blocks [[c_a, -s_a], [s_b, c_b]]."""
    d = c.numel()
    R = torch.zeros(d, d, dtype=c.dtype)
    for k in range(d // g):
        for j in range(g // 2):
            a, b = k * g + j, k * g + j + g // 2
            R[a, a], R[a, b], R[b, a], R[b, b] = c[a], -s[a], s[b], c[b]
    return R


def random_params(variant: str, d: int, seed: int = 0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    n = F.parameter_length(variant, d)
    theta = torch.randn(n, generator=gen, dtype=dtype)
    alpha = 1 + 0.5 * torch.randn(n, generator=gen, dtype=dtype)
    return theta, alpha


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("g", [2, 4, 8])
def test_coefficients_follow_spec(variant, g):
    d = 16
    theta, alpha = random_params(variant, d)
    c, s = F.coefficients(variant, g, theta, alpha)
    c_ref, s_ref = spec_coefficients(variant, g, theta, alpha, d)
    torch.testing.assert_close(c, c_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("g", [2, 8])
def test_rotate_equals_dense_matrix(variant, g):
    d = 16
    theta, alpha = random_params(variant, d)
    coeffs = F.coefficients(variant, g, theta, alpha)
    x = torch.randn(3, 5, d, dtype=torch.float64)
    torch.testing.assert_close(F.rotate(x, coeffs, g), x @ dense(*coeffs, g).T)


def test_rotate_along_other_dim_equals_dense_matrix():
    g, d = 4, 8
    coeffs = F.coefficients("road_2", g, *random_params("road_2", d))
    x = torch.randn(2, d, 3, 5, dtype=torch.float64)  # channels at dim 1, like a conv output
    expected = torch.einsum("ij,bjhw->bihw", dense(*coeffs, g), x)
    torch.testing.assert_close(F.rotate(x, coeffs, g, dim=1), expected)


def test_per_row_coefficients_rotate_each_row_with_its_own_matrix():
    g, d = 4, 8
    rows = [F.coefficients("road_4", g, *random_params("road_4", d, seed=i)) for i in range(3)]
    c = torch.stack([r[0] for r in rows])[:, None, :]
    s = torch.stack([r[1] for r in rows])[:, None, :]
    x = torch.randn(3, 2, d, dtype=torch.float64)
    y = F.rotate(x, (c, s), g)
    for i, (ci, si) in enumerate(rows):
        torch.testing.assert_close(y[i], x[i] @ dense(ci, si, g).T)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("g, d", [(2, 6), (4, 8), (8, 8), (64, 256)])  # (8, 8): one group
def test_shifted_layout_equals_dense_matrix(variant, g, d):
    coeffs = F.coefficients(variant, g, *random_params(variant, d))
    x = torch.randn(3, 5, d, dtype=torch.float64)
    y = F.rotate(x, coeffs, g, prepared=F.prepare(coeffs, g))
    torch.testing.assert_close(y, x @ dense(*coeffs, g).T)
    # and bit for bit what the half-by-half layout gives, in fp32 too
    c32, s32 = (t.float() for t in coeffs)
    x32 = x.float()
    shifted = F.prepare((c32, s32), g)
    assert torch.equal(F.rotate(x32, (c32, s32), g, prepared=shifted), F.rotate(x32, (c32, s32), g))


def test_a_routings_scratch_keeps_gathered_rows_from_their_second_use_and_within_its_budget(monkeypatch):
    """A routing's scratch: the first call gathers and keeps nothing, the second keeps the rows, later
    calls reuse them (same bits as gathering); past SCRATCH_BYTES rows are gathered on every call."""
    from roadkit.kernels import torch_ops

    g, d, B = 4, 8, 3
    rows = [F.coefficients("road_2", g, *random_params("road_2", d, seed=i, dtype=torch.float32)) for i in range(4)]
    tables = (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
    shifted = F.prepare(tables, g)
    index = torch.tensor([2, 0, 3], dtype=torch.int32)
    prefill, step = torch.randn(B, 5, d), torch.randn(B, 1, d)  # one index serves both (one row per batch row)
    scratch = F.new_scratch(index)
    want = [F.rotate_indexed(x, tables, index, g, prepared=shifted) for x in (prefill, step, step)]
    got = [F.rotate_indexed(prefill, tables, index, g, prepared=shifted, scratch=scratch)]
    assert list(scratch.entries.values()) == [None] and scratch.nbytes == 0
    got.append(F.rotate_indexed(step, tables, index, g, prepared=shifted, scratch=scratch))
    (kept,) = scratch.entries.values()
    assert scratch.nbytes == B * shifted.row_bytes
    got.append(F.rotate_indexed(step, tables, index, g, prepared=shifted, scratch=scratch))
    assert next(iter(scratch.entries.values())) is kept
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)

    monkeypatch.setattr(torch_ops, "SCRATCH_BYTES", B * shifted.row_bytes - 1)
    small = F.new_scratch(index)
    for _ in range(3):
        assert torch.equal(F.rotate_indexed(step, tables, index, g, prepared=shifted, scratch=small), want[1])
    assert list(small.entries.values()) == [None] and small.nbytes == 0


@pytest.mark.parametrize("index_shape", ["row", "token", "flat"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batches_gather_in_chunks_with_the_same_bits(index_shape, dtype, monkeypatch):
    """Per-token routing gathers a (3, d) row per token; past GATHER_BYTES it runs chunk by chunk."""
    from roadkit.kernels import torch_ops

    g, d, B, T = 4, 8, 3, 5
    rows = [F.coefficients("road_2", g, *random_params("road_2", d, seed=i, dtype=torch.float32)) for i in range(4)]
    tables = (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, T, d, generator=gen).to(dtype)
    index = {
        "row": torch.randint(0, 4, (B,), generator=gen),
        "token": torch.randint(0, 4, (B, T), generator=gen),
        "flat": torch.randint(0, 4, (B * T,), generator=gen),
    }[index_shape]
    if index_shape == "flat":
        x = x.view(B * T, d)
    shifted = F.prepare(tables, g)
    whole = F.rotate_indexed(x, tables, index, g, prepared=shifted)
    for budget in (1, 3 * d * 4 * 2):  # one entry per chunk; two tokens' rows per chunk
        monkeypatch.setattr(torch_ops, "GATHER_BYTES", budget)
        chunked = F.rotate_indexed(x, tables, index, g, prepared=shifted)
        assert chunked.dtype == dtype and chunked.shape == x.shape
        torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    per_token = index if index_shape != "row" else index[:, None].expand(B, T)
    for i, k in enumerate(per_token.reshape(-1).tolist()):
        expected = (x.reshape(-1, d)[i].float() @ dense(*rows[k], g).T).to(dtype)
        torch.testing.assert_close(whole.reshape(-1, d)[i], expected, rtol=1e-6, atol=1e-6)


def test_shifted_layout_with_per_row_tables_and_low_precision_input():
    g, d = 4, 8
    rows = [F.coefficients("road_4", g, *random_params("road_4", d, seed=i, dtype=torch.float32)) for i in range(3)]
    tables = (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]))
    index = torch.tensor([2, 0, 2, 1])
    x = torch.randn(4, 5, d).to(torch.bfloat16)
    y = F.rotate_indexed(x, tables, index, g, prepared=F.prepare(tables, g))
    assert y.dtype == torch.bfloat16
    for i, k in enumerate(index.tolist()):
        expected = (x[i].float() @ dense(*rows[k], g).T).to(torch.bfloat16)
        torch.testing.assert_close(y[i], expected, rtol=0, atol=0)  # fp32 math, one rounding
    torch.testing.assert_close(y, F.rotate_indexed(x, tables, index, g), rtol=0, atol=0)


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 1])  # 1: one group per chunk
def test_rotate_rows_is_left_multiplication_in_place(chunk_bytes):
    g, d = 8, 32
    coeffs = F.coefficients("road_1", g, *random_params("road_1", d))
    W = torch.randn(d, 5, dtype=torch.float64)
    out = kernels.rotate_rows_(W.clone(), *coeffs, g, chunk_bytes=chunk_bytes)
    torch.testing.assert_close(out, dense(*coeffs, g) @ W)
    b = torch.randn(d, dtype=torch.float64)
    torch.testing.assert_close(F.rotate_rows_(b.clone(), coeffs, g), dense(*coeffs, g) @ b)
    W3 = torch.randn(d, 3, 2, dtype=torch.float64)  # conv-shaped weight
    expected = torch.einsum("ij,jkl->ikl", dense(*coeffs, g), W3)
    torch.testing.assert_close(F.rotate_rows_(W3.clone(), coeffs, g), expected)


def test_rotate_rows_of_half_precision_weight_rounds_once():
    g, d = 4, 8
    coeffs = F.coefficients("road_2", g, *random_params("road_2", d, dtype=torch.float32))
    W = torch.randn(d, 6).to(torch.bfloat16)
    expected = (dense(*coeffs, g) @ W.float()).to(torch.bfloat16)
    torch.testing.assert_close(F.rotate_rows_(W.clone(), coeffs, g), expected, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["road_2", "road_4"])
def test_rotate_rows_of_general_blocks_rounds_fp32_weights_once(variant):
    # Blocks that are not scaled rotations can be ill-conditioned: their merge runs in float64 so
    # that unmerging amplifies one rounding only. fp32 math would differ here in many elements.
    g, d = 64, 256
    coeffs = F.coefficients(variant, g, *random_params(variant, d, dtype=torch.float64))
    W = torch.randn(d, 512)
    expected = (dense(*coeffs, g) @ W.double()).float()
    torch.testing.assert_close(F.rotate_rows_(W.clone(), coeffs, g), expected, rtol=0, atol=0)


def test_rotate_rows_of_scaled_rotations_runs_in_the_weight_dtype():
    # road_1 blocks are scaled rotations (condition number 1): fp32 math, within a couple of ulps.
    g, d = 64, 256
    coeffs = F.coefficients("road_1", g, *random_params("road_1", d, dtype=torch.float64))
    W = torch.randn(d, 512)
    expected = dense(*coeffs, g) @ W.double()
    out = F.rotate_rows_(W.clone(), coeffs, g)
    assert not torch.equal(out, expected.float())  # not the float64 path: some elements round differently
    ulp = torch.finfo(torch.float32).eps * expected.abs().max()
    assert (out.double() - expected).abs().max() <= 2 * ulp
    restored = F.rotate_rows_(out, F.inverse(coeffs, g), g)
    assert ((restored - W).abs().max() / W.abs().max()).item() <= 1e-6


@pytest.mark.parametrize("variant", VARIANTS)
def test_inverse_is_dense_inverse(variant):
    g, d = 4, 16
    coeffs = F.coefficients(variant, g, *random_params(variant, d))
    inv = F.inverse(coeffs, g)
    torch.testing.assert_close(dense(*inv, g), torch.linalg.inv(dense(*coeffs, g)))


def test_inverse_of_singular_rotation_raises():
    c, s = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="singular"):
        F.inverse((c, s), 4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_compose_is_matrix_product(variant):
    g, d = 4, 16
    first = F.coefficients(variant, g, *random_params(variant, d, seed=1))
    second = F.coefficients("road_2", g, *random_params("road_2", d, seed=2))
    both = F.compose(first, second, g)
    torch.testing.assert_close(dense(*both, g), dense(*second, g) @ dense(*first, g))


@pytest.mark.parametrize("variant", VARIANTS)
def test_identity_at_init(variant):
    d, g = 16, 8
    n = F.parameter_length(variant, d)
    c, s = F.coefficients(variant, g, torch.zeros(n), torch.ones(n))
    x = torch.randn(4, d)
    assert torch.equal(F.rotate(x, (c, s), g), x)


def test_parameter_lengths():
    assert [F.parameter_length(v, 64) for v in VARIANTS] == [32, 64, 128]
    assert F.parameter_length("2", 64) == 64


def test_check_group_size_names_module_and_numbers():
    with pytest.raises(ValueError, match=r"layer\.q: out_features=48 is not divisible by group_size=32"):
        F.check_group_size(48, 32, where="layer.q")


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_backward_passes_gradcheck(variant):
    g, d = 4, 8
    theta, alpha = random_params(variant, d)
    theta.requires_grad_(True)
    alpha.requires_grad_(True)
    x = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)

    def fn(x, theta, alpha):
        return F.rotate(x, F.coefficients(variant, g, theta, alpha), g)

    assert torch.autograd.gradcheck(fn, (x, theta, alpha))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dim", [-1, 1])
def test_fused_parameter_path_passes_gradcheck(variant, dim):
    g, d = 4, 8
    theta, alpha = (t.requires_grad_(True) for t in random_params(variant, d, seed=5))
    x = torch.randn(2, d, 3, dtype=torch.float64) if dim == 1 else torch.randn(2, 3, d, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, t, a: F.road(x, variant, g, t, a, dim), (x, theta, alpha))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_parameter_path_equals_rotation_by_coefficients(variant):
    g, d = 4, 8
    theta, alpha = random_params(variant, d, seed=6)
    x = torch.randn(5, d, dtype=torch.float64)
    torch.testing.assert_close(
        F.road(x, variant, g, theta, alpha), F.rotate(x, F.coefficients(variant, g, theta, alpha), g)
    )


def test_fused_backward_gradcheck_other_dim_and_per_row_coefficients():
    g, d = 4, 8
    x = torch.randn(2, d, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(d, dtype=torch.float64, requires_grad=True)
    s = torch.randn(d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c, s: F.rotate(x, (c, s), g, 1), (x, c, s))
    x2 = torch.randn(3, 2, d, dtype=torch.float64, requires_grad=True)
    c2 = torch.randn(3, 1, d, dtype=torch.float64, requires_grad=True)
    s2 = torch.randn(3, 1, d, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c, s: F.rotate(x, (c, s), g, -1), (x2, c2, s2))


@pytest.mark.parametrize("layout", ["last", "channels", "per_row"])
def test_traced_formulation_equals_dense_matrix_and_eager_backward(layout):
    """What runs under torch.compile (no in-place ops) against the dense reference and the eager backward."""
    g, d = 4, 8
    rows = [F.coefficients("road_4", g, *random_params("road_4", d, seed=i)) for i in range(3)]
    if layout == "per_row":
        c, s = (torch.stack([r[k] for r in rows])[:, None, :] for k in (0, 1))
        x, gy, dim = torch.randn(3, 2, d, dtype=torch.float64), torch.randn(3, 2, d, dtype=torch.float64), -1
        want = torch.stack([x[i] @ dense(*rows[i], g).T for i in range(3)])
    else:
        c, s = rows[0]
        shape, dim = ((2, d, 3), 1) if layout == "channels" else ((2, 3, d), -1)
        x, gy = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
        want = torch.einsum("ij,bj...->bi...", dense(c, s, g), x) if dim == 1 else x @ dense(c, s, g).T
    torch.testing.assert_close(kernels.traced_ops.forward(x, c, s, g, dim), want)
    eager = kernels.torch_ops.backward(gy, x, c, s, g, dim, need_gx=True)
    traced = kernels.traced_ops.backward(gy, x, c, s, g, dim, need_gx=True)
    for t, e in zip(traced, eager, strict=True):
        torch.testing.assert_close(t, e)


def test_half_precision_input_is_computed_in_fp32_and_returned_in_its_dtype():
    g, d = 8, 16
    coeffs = F.coefficients("road_2", g, *random_params("road_2", d, dtype=torch.float32))
    x = torch.randn(4, d).to(torch.bfloat16)
    y = F.rotate(x, coeffs, g)
    assert y.dtype == torch.bfloat16
    expected = (x.float() @ dense(*coeffs, g).T).to(torch.bfloat16)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


# ---- properties ----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    variant=st.sampled_from(VARIANTS),
    groups=st.integers(1, 3),
    half=st.integers(1, 4),
    d_in=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_merge_then_unmerge_restores_weights(variant, groups, half, d_in, seed):
    # Angles in [-0.5, 0.5] and scales in [0.75, 1.25] (where trained adapters live) keep every 2x2
    # block well conditioned; a near-singular block amplifies the fp32 rounding of the merged weights
    # by its condition number, which no merge implementation can avoid.
    g = 2 * half
    d = groups * g
    gen = torch.Generator().manual_seed(seed)
    n = F.parameter_length(variant, d)
    theta = torch.rand(n, generator=gen, dtype=torch.float64) - 0.5
    alpha = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5 + 0.75
    W = torch.randn(d, d_in, generator=gen)
    coeffs = F.coefficients(variant, g, theta, alpha)
    restored = F.rotate_rows_(F.rotate_rows_(W.clone(), coeffs, g), F.inverse(coeffs, g), g)
    torch.testing.assert_close(restored, W, rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(variant=st.sampled_from(VARIANTS), groups=st.integers(1, 3), half=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_identity_parameters_leave_any_input_unchanged(variant, groups, half, seed):
    g = 2 * half
    d = groups * g
    n = F.parameter_length(variant, d)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(F.rotate(x, F.coefficients(variant, g, torch.zeros(n), torch.ones(n)), g), x)
