"""The vLLM plugin's parts that need no vLLM: `SlotTable`, the slot kernels (torch and Triton), the
`roadkit::rotate_slots` custom op and `SlotRouting`.

Every result is checked against a dense d x d block-diagonal matrix built from (c, s, group_size)
as ROAD_SPEC.md defines it, one per slot, so no test compares a kernel only with itself.
"""

from __future__ import annotations

import pytest
import torch

from roadkit import functional as F
from roadkit import kernels
from roadkit.integrations.vllm.slots import SlotRouting, SlotTable
from roadkit.kernels import c_ops, custom_ops, torch_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)


# ---- the dense reference ------------------------------------------------------------------------


def dense_rotation(c: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """R (float64, d x d): in each group of g, pair (a = j, b = j + g/2) gives
    y_a = c_a x_a - s_a x_b and y_b = c_b x_b + s_b x_a."""
    d = c.shape[0]
    c, s = c.double().cpu(), s.double().cpu()
    r = torch.zeros(d, d, dtype=torch.float64)
    half = group_size // 2
    for start in range(0, d, group_size):
        for j in range(half):
            a, b = start + j, start + j + half
            r[a, a], r[a, b] = c[a], -s[a]
            r[b, b], r[b, a] = c[b], s[b]
    return r


def dense_rows(x: torch.Tensor, mats: list[torch.Tensor], index: list[int]) -> torch.Tensor:
    """Row r of the result is mats[index[r]] @ x[r] (float64)."""
    x64 = x.double().cpu()
    return torch.stack([mats[i] @ x64[r] for r, i in enumerate(index)])


def random_cs(d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=gen), torch.randn(d, generator=gen)


def spec_coefficients(variant: str, g: int, theta: torch.Tensor, alpha: torch.Tensor):
    """(c, s) per ROAD_SPEC.md's table, written out element by element (independent of roadkit)."""
    if variant == "road_2":
        return alpha * torch.cos(theta), alpha * torch.sin(theta)
    if variant == "road_1":
        d = 2 * theta.shape[0]
        c, s = torch.empty(d), torch.empty(d)
        for k in range(d // g):
            for j in range(g // 2):
                e = k * g // 2 + j
                for f in (k * g + j, k * g + j + g // 2):
                    c[f], s[f] = alpha[e] * torch.cos(theta[e]), alpha[e] * torch.sin(theta[e])
        return c, s
    t, a = theta.view(-1, 2, g), alpha.view(-1, 2, g)
    return (a[:, 0] * torch.cos(t[:, 0])).flatten(), (a[:, 1] * torch.sin(t[:, 1])).flatten()


def test_dense_reference_is_the_spec_pairing():
    """The reference itself, on one hand-checked group of 4: pairs (0, 2) and (1, 3)."""
    c, s = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5.0, 6.0, 7.0, 8.0])
    x = torch.tensor([1.0, 10.0, 100.0, 1000.0])
    y = dense_rotation(c, s, 4) @ x.double()
    want = [1 * 1 - 5 * 100, 2 * 10 - 6 * 1000, 3 * 100 + 7 * 1, 4 * 1000 + 8 * 10]
    assert y.tolist() == want


# ---- SlotTable ------------------------------------------------------------------------------------

D = 64
GROUPS = (4, 8, 32, 8)  # slots 0..3; two slots share group size 8


@pytest.fixture(params=["c", "torch"])
def slot_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a SlotTable test on the C kernel, then on the torch path it falls back to without a compiler."""
    if request.param == "torch":
        monkeypatch.setattr(c_ops, "handles_slots", lambda x: False)
    elif not c_ops.handles_slots(torch.zeros(1, 2)):
        pytest.skip(f"the C backend is unavailable here: {c_ops._load()}")
    return request.param


def filled_table() -> tuple[SlotTable, list[torch.Tensor]]:
    """A table of 5 slots: slots 0-3 hold rotations of GROUPS, slot 4 stays empty (identity)."""
    table = SlotTable(5, D)
    mats = []
    for slot, g in enumerate(GROUPS):
        c, s = random_cs(D, seed=slot)
        table.set(slot, c, s, g)
        mats.append(dense_rotation(c, s, g))
    eye = torch.eye(D, dtype=torch.float64)
    return table, mats + [eye, eye]  # slot 4 (never set) and row 5 (the identity row)


@pytest.mark.usefixtures("slot_kernel")
def test_slot_table_mixed_batch_matches_dense():
    table, mats = filled_table()
    assert table.active and table.halves == (2, 4, 16)
    index = [0, 5, 2, 1, 3, 4, 2, 0, 5, 1]
    x = torch.randn(len(index), D)
    got = table.forward(x, torch.tensor(index))
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), dense_rows(x, mats, index), **TOL)


@pytest.mark.usefixtures("slot_kernel")
def test_slot_table_starts_as_identity():
    table = SlotTable(3, D)
    assert not table.active
    x = torch.randn(4, D)
    torch.testing.assert_close(table.forward(x, torch.tensor([0, 1, 2, 3])), x, rtol=0, atol=0)


@pytest.mark.usefixtures("slot_kernel")
def test_slot_table_reset_makes_the_slot_identity():
    table, mats = filled_table()
    table.reset(2)  # the only slot of group size 32: its windows leave the packed layout
    mats[2] = torch.eye(D, dtype=torch.float64)
    assert table.halves == (2, 4)
    index = [2, 0, 1, 3, 2, 5]
    x = torch.randn(len(index), D)
    torch.testing.assert_close(table.forward(x, torch.tensor(index)).double(), dense_rows(x, mats, index), **TOL)
    for slot in range(4):
        table.reset(slot)
    assert not table.active and table.halves == ()
    torch.testing.assert_close(table.forward(x, torch.tensor(index)), x, rtol=0, atol=0)


@pytest.mark.usefixtures("slot_kernel")
def test_slot_table_overwrite_changes_group_size():
    """Setting a slot again replaces its rotation, including its group size."""
    table, mats = filled_table()
    c, s = random_cs(D, seed=99)
    table.set(0, c, s, 16)
    mats[0] = dense_rotation(c, s, 16)
    assert table.halves == (4, 8, 16)
    index = [0, 1, 2, 3, 4, 5]
    x = torch.randn(len(index), D)
    torch.testing.assert_close(table.forward(x, torch.tensor(index)).double(), dense_rows(x, mats, index), **TOL)


@pytest.mark.usefixtures("slot_kernel")
@pytest.mark.parametrize("variant, g", [("road_1", 4), ("road_1", 32), ("road_2", 8), ("road_4", 8), ("road_4", 32)])
def test_slot_table_with_variant_coefficients(variant: str, g: int):
    """Slots filled from random (theta, alpha) of each variant, whose coefficients match the spec's table."""
    gen = torch.Generator().manual_seed(7)
    n = F.parameter_length(variant, D)
    theta, alpha = 0.5 * torch.randn(n, generator=gen), 1 + 0.5 * torch.randn(n, generator=gen)
    c, s = F.coefficients(variant, g, theta, alpha)
    want_c, want_s = spec_coefficients(variant, g, theta, alpha)
    torch.testing.assert_close(c, want_c)
    torch.testing.assert_close(s, want_s)
    table = SlotTable(2, D)
    table.set(1, c, s, g)
    other_c, other_s = random_cs(D, seed=3)
    table.set(0, other_c, other_s, 2)
    mats = [dense_rotation(other_c, other_s, 2), dense_rotation(want_c, want_s, g), torch.eye(D, dtype=torch.float64)]
    index = [1, 2, 0, 1]
    x = torch.randn(len(index), D)
    torch.testing.assert_close(table.forward(x, torch.tensor(index)).double(), dense_rows(x, mats, index), **TOL)


@pytest.mark.usefixtures("slot_kernel")
def test_slot_table_bf16_input():
    table, mats = filled_table()
    index = torch.tensor([0, 1, 2, 3, 4, 5, 3, 0])
    x = torch.randn(len(index), D).bfloat16()
    got = table.forward(x, index)
    assert got.dtype == torch.bfloat16 and got.shape == x.shape
    want32 = table.forward(x.float(), index)
    torch.testing.assert_close(got.float(), want32, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(want32.double(), dense_rows(x.float(), mats, index.tolist()), **TOL)


def test_slot_table_rejects_bad_rows():
    table = SlotTable(2, D)
    c, s = random_cs(D, seed=0)
    with pytest.raises(ValueError):
        table.set(0, c[:32], s[:32], 4)
    with pytest.raises(ValueError):
        table.set(0, c, s, 6)  # 6 does not divide 64
    assert not table.active


# ---- torch_ops.rotate_slot_rows and the Triton kernel ----------------------------------------------


def half_tables(d: int, groups: tuple[int, ...], seed: int = 0):
    """c, s (float32, (n + 1, d)), half (int32) for slots of `groups`, the identity in the last row,
    and the dense matrices of every row."""
    n = len(groups)
    c, s = torch.ones(n + 1, d), torch.zeros(n + 1, d)
    half = torch.ones(n + 1, dtype=torch.int32)
    mats = []
    for slot, g in enumerate(groups):
        c[slot], s[slot] = random_cs(d, seed=seed + slot)
        half[slot] = g // 2
        mats.append(dense_rotation(c[slot], s[slot], g))
    mats.append(torch.eye(d, dtype=torch.float64))
    return c, s, half, mats


def test_torch_rotate_slot_rows_matches_dense():
    c, s, half, mats = half_tables(D, (4, 8, 32, 2))
    index = [0, 4, 2, 1, 3, 2, 0, -1]  # -1: the last row (identity)
    x = torch.randn(len(index), D)
    got = torch_ops.rotate_slot_rows(x, c, s, half, torch.tensor(index))
    assert got.dtype == torch.float32
    want_index = [i % len(mats) for i in index]
    torch.testing.assert_close(got.double(), dense_rows(x, mats, want_index), **TOL)
    xb = x.bfloat16()
    got_b = torch_ops.rotate_slot_rows(xb, c, s, half, torch.tensor(index))
    assert got_b.dtype == torch.bfloat16
    torch.testing.assert_close(
        got_b.float(), torch_ops.rotate_slot_rows(xb.float(), c, s, half, torch.tensor(index)), rtol=1e-2, atol=2e-2
    )


@pytest.mark.parametrize("d, groups", [(64, (4, 8, 32)), (96, (8, 32, 8))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rotate_slot_rows_matches_torch(d: int, groups: tuple[int, ...], dtype: torch.dtype):
    """Per-row group sizes; -1 and indices past the table select the identity row. 96 is no power of 2."""
    pytest.importorskip("triton")
    from roadkit.kernels import triton_ops

    c, s, half, mats = half_tables(d, groups, seed=11)
    n = len(groups)
    index = torch.tensor([0, 1, 2, -1, n, n + 1, 7 * n, 2, 0, 1, -5])
    x = torch.randn(len(index), d).to(dtype)
    dev = [t.to(DEVICE) for t in (x, c, s, half, index)]
    got = triton_ops.rotate_slot_rows(*dev).cpu()
    assert got.dtype == dtype and got.shape == x.shape
    safe = torch.where((index < 0) | (index > n), n, index)
    want = torch_ops.rotate_slot_rows(x, c, s, half, safe)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    identity_rows = (safe == n).nonzero().flatten()
    assert identity_rows.numel() == 5
    torch.testing.assert_close(got[identity_rows], x[identity_rows], rtol=0, atol=0)
    torch.testing.assert_close(got.double(), dense_rows(x.float(), mats, safe.tolist()), **tol)


def test_triton_rotate_slot_rows_non_contiguous_input():
    """A transposed (column-major) x: the result is still R x per row, returned row-major."""
    pytest.importorskip("triton")
    from roadkit.kernels import triton_ops

    c, s, half, mats = half_tables(32, (4, 8), seed=5)
    index = torch.tensor([0, 1, 2, -1, 1, 0])
    x = torch.randn(32, len(index)).t()
    assert not x.is_contiguous()
    got = triton_ops.rotate_slot_rows(*[t.to(DEVICE) for t in (x, c, s, half, index)]).cpu()
    torch.testing.assert_close(got.double(), dense_rows(x, mats, [0, 1, 2, 2, 1, 0]), **TOL)


# ---- the custom op ----------------------------------------------------------------------------------


def op_inputs(seed: int = 0):
    c, s, half, mats = half_tables(D, (4, 32, 8), seed=seed)
    index = torch.tensor([0, -1, 2, 1, 3, 9, 1, 0])
    x = torch.randn(len(index), D)
    return x, c, s, half, index, mats


def test_rotate_slots_op_matches_dense():
    x, c, s, half, index, mats = op_inputs()
    got = torch.ops.roadkit.rotate_slots(x, c, s, half, index)
    safe = [3 if i < 0 or i > 3 else i for i in index.tolist()]
    torch.testing.assert_close(got.double(), dense_rows(x, mats, safe), **TOL)


def test_rotate_slots_op_compiles_without_graph_breaks():
    x, c, s, half, index, _ = op_inputs(seed=1)

    def fn(x, c, s, half, index):
        return torch.ops.roadkit.rotate_slots(x * 2, c, s, half, index) + 1

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, c, s, half, index), fn(x, c, s, half, index), rtol=0, atol=0)
    index2 = torch.tensor([1, 1, 0, 3, -1, 2, 2, 0])  # new routing, same shapes: same graph
    torch.testing.assert_close(compiled(x, c, s, half, index2), fn(x, c, s, half, index2), rtol=0, atol=0)


def test_rotate_slots_opcheck():
    x, c, s, half, index, _ = op_inputs(seed=2)
    torch.library.opcheck(torch.ops.roadkit.rotate_slots.default, (x, c, s, half, index))
    # The fake implementation's output layout matches the real one's, also for a transposed x.
    torch.library.opcheck(torch.ops.roadkit.rotate_slots.default, (x.t().contiguous().t(), c, s, half, index))
    torch.library.opcheck(torch.ops.roadkit.rotate_slots.default, (x.bfloat16(), c, s, half, index))


def test_slot_table_through_the_custom_op_matches_dense_and_compiles():
    """The backend engines' compiled graphs use: the SlotTable's tables read inside one captured op."""
    table, mats = filled_table()
    index = torch.tensor([0, 3, 5, 2, 1, 0, 5, 4])
    x = torch.randn(len(index), D)
    want = dense_rows(x, [*mats, torch.eye(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)], index.tolist())
    torch.testing.assert_close(custom_ops.forward_slots(x, table, index).double(), want, **TOL)
    compiled = torch.compile(
        lambda x, i: custom_ops.forward_slots(x, table, i) * 1, fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(compiled(x, index).double(), want, **TOL)


def test_slot_backend_by_device(monkeypatch: pytest.MonkeyPatch):
    x = torch.zeros(3, D)
    expected = c_ops if c_ops.handles_slots(x) else torch_ops
    assert kernels.slot_backend(x) is expected
    monkeypatch.setattr(c_ops, "handles_slots", lambda x: False)  # no compiler: the torch path
    assert kernels.slot_backend(x) is torch_ops
    assert kernels.slot_backend(x.to("meta")) is custom_ops  # off the CPU: the op compiled graphs capture
    table, _ = filled_table()
    out = kernels.forward_slots(x.to("meta"), table, torch.zeros(3, dtype=torch.long, device="meta"))
    assert out.shape == (3, D) and out.device.type == "meta"


# ---- SlotRouting -------------------------------------------------------------------------------------


def test_slot_routing_maps_no_adapter_and_fills_the_tail():
    routing = SlotRouting(max_tokens=8, n_slots=3, device="cpu")
    buffer = routing.index
    assert routing.index.tolist() == [3] * 8
    routing.update(torch.tensor([0, -1, 2, -1, 1, 0]))
    assert routing.index.tolist() == [0, 3, 2, 3, 1, 0, 3, 3]
    routing.update(torch.tensor([1, -1]))
    assert routing.index.tolist() == [1, 3, 3, 3, 3, 3, 3, 3]
    routing.update(torch.tensor([2, 2, 2, 2, 2, 2, 2, 2]))
    assert routing.index.tolist() == [2] * 8
    assert routing.index is buffer and routing.index.dtype == torch.long  # persistent: graphs read it in place


def test_slot_routing_keeps_slots_in_use_and_long_runs():
    routing = SlotRouting(max_tokens=64, n_slots=3, device="cpu")
    routing.update(torch.tensor([0, -1, 2, -1, 1, 0]))  # decode-like: short runs, gathered per token
    assert routing.slots_in_use == {0, 1, 2, 3} and routing.runs is None
    routing.update(torch.tensor([2] * 10 + [-1] * 9 + [0] * 12))  # prefill-like: three long runs
    assert routing.slots_in_use == {0, 2, 3}
    assert routing.runs == [(2, 0, 10), (3, 10, 19), (0, 19, 31)]


def test_slot_table_runs_equal_per_token_gather():
    """Rotating run by run (prefill) gives the per-token gather's result, identity runs included."""
    table, mats = filled_table()
    index = [2] * 9 + [5] * 8 + [0] * 11 + [4] * 3 + [3] * 9
    runs, start = [], 0
    for slot in dict.fromkeys(index):
        end = start + index.count(slot)
        runs.append((slot, start, end))
        start = end
    x = torch.randn(len(index), D)
    got = table.forward(x, torch.tensor(index), runs)
    torch.testing.assert_close(got, table.forward(x, torch.tensor(index)), rtol=0, atol=0)
    torch.testing.assert_close(got.double(), dense_rows(x, mats, index), **TOL)
