"""RoAd layers on their own: forward, merging, caching and routing against dense references."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from test_functional import dense
from torch import nn

from roadkit import Linear
from roadkit import functional as F
from roadkit.cache import CACHE_ENTRIES
from roadkit.layers import Routing


def make_layer(variant="road_2", g=4, d_in=6, d_out=8, bias=True, seed=0, init_weights=False):
    torch.manual_seed(seed)
    return Linear(nn.Linear(d_in, d_out, bias=bias), "a", variant, g, init_weights=init_weights)


def R_of(layer: Linear, name: str) -> torch.Tensor:
    with torch.no_grad():
        return dense(
            *F.coefficients(
                layer.variant[name], layer.group_size[name], layer.road_theta[name], layer.road_alpha[name]
            ),
            layer.group_size[name],
        )


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_forward_is_rotated_linear(variant):
    layer = make_layer(variant)
    h = torch.randn(5, 6)
    base = layer.base_layer
    expected = (h @ base.weight.T + base.bias) @ R_of(layer, "a").T
    torch.testing.assert_close(layer(h), expected, rtol=1e-6, atol=1e-6)


def test_parameters_are_fp32_on_half_base_and_output_keeps_base_dtype():
    layer = Linear(nn.Linear(6, 8).to(torch.bfloat16), "a", "road_1", 4, init_weights=False)
    assert layer.road_theta["a"].dtype == torch.float32
    y = layer(torch.randn(3, 6, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_active_adapters_apply_in_activation_order():
    layer = make_layer()
    layer.update_layer("b", "road_4", 4, init_weights=False)
    h = torch.randn(3, 6)
    x = layer.base_layer(h)
    for order in (["a", "b"], ["b", "a"]):
        layer.set_adapter(order)
        first, second = (R_of(layer, n) for n in order)
        torch.testing.assert_close(layer(h), x @ (second @ first).T, rtol=1e-6, atol=1e-6)


def test_only_active_adapters_train():
    layer = make_layer()
    layer.update_layer("b", "road_1", 4)
    assert layer.road_theta["a"].requires_grad and not layer.road_theta["b"].requires_grad
    layer.set_adapter("b")
    assert not layer.road_alpha["a"].requires_grad and layer.road_alpha["b"].requires_grad


def test_merge_rotates_weight_and_bias_and_unmerge_restores():
    layer = make_layer(bias=True)
    W0, b0 = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    h = torch.randn(4, 6)
    with torch.no_grad():
        unmerged = layer(h)
        layer.merge()
        R = R_of(layer, "a")
        torch.testing.assert_close(layer.base_layer.weight, R @ W0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.base_layer.bias, R @ b0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer(h), unmerged, rtol=1e-6, atol=1e-6)  # merged: no double rotation
        layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, W0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.base_layer.bias, b0, rtol=1e-6, atol=1e-6)


def test_unmerge_with_nothing_merged_warns():
    with pytest.warns(UserWarning, match="no adapter is merged"):
        make_layer().unmerge()


def test_safe_merge_rejects_nan_and_changes_nothing():
    layer = make_layer()
    with torch.no_grad():
        layer.road_alpha["a"][0] = float("nan")
    W0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, W0) and not layer.merged


def test_disabled_layer_gives_base_output_even_when_merged():
    layer = make_layer()
    h = torch.randn(3, 6)
    with torch.no_grad():
        base = layer.base_layer(h)
        layer.merge()
        W_merged = layer.base_layer.weight.clone()
        layer.disable_adapters = True
        torch.testing.assert_close(layer(h), base, rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.base_layer.weight, W_merged)  # undone on the fly, weights untouched


def test_group_size_must_divide_out_features():
    with pytest.raises(ValueError, match="out_features=10 is not divisible by group_size=4"):
        Linear(nn.Linear(3, 10), "a", "road_1", 4)


@pytest.mark.parametrize("fused", [False, True])  # fused steps leave version counters alone
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("then", ["grads kept", "zero_grad", "zero_grad on a deep copy"])
def test_inference_cache_follows_optimizer_steps_and_loads(fused, mode, then):
    """Cache filled, a training step, then inference must see the stepped parameters: with the gradients still
    there, or after `zero_grad()` (none left to see; a fused step bumps no version counter), also on a deep
    copy (its parameters are new objects, without hooks); then a `load_state_dict`."""
    layer = make_layer().train(mode == "train")
    if then == "zero_grad on a deep copy":
        with torch.no_grad():
            layer(torch.randn(2, 6))
        layer = copy.deepcopy(layer)
    h = torch.randn(2, 6)
    opt = torch.optim.AdamW([layer.road_theta["a"], layer.road_alpha["a"]], lr=0.5, fused=fused)
    with torch.no_grad():
        before = layer(h)
    layer(h).pow(2).sum().backward()
    opt.step()
    if then != "grads kept":
        opt.zero_grad()
    with torch.no_grad():
        after = layer(h)
        expected = layer.base_layer(h) @ R_of(layer, "a").T
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-6)
    layer.load_state_dict({k: torch.zeros_like(v) if "theta" in k else v for k, v in layer.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(layer(h), layer.base_layer(h) @ R_of(layer, "a").T, rtol=1e-6, atol=1e-6)


def test_gradients_reach_theta_and_alpha_and_match_autograd_of_dense_reference():
    layer = make_layer("road_4")
    h = torch.randn(5, 6)
    layer(h).sin().sum().backward()
    theta = layer.road_theta["a"].detach().clone().requires_grad_(True)
    alpha = layer.road_alpha["a"].detach().clone().requires_grad_(True)
    c, s = F.coefficients("road_4", 4, theta, alpha)
    R = torch.diag(c)
    for k in range(2):
        for j in range(2):
            a, b = 4 * k + j, 4 * k + j + 2
            R = R + torch.zeros_like(R).index_put((torch.tensor([a]), torch.tensor([b])), -s[a : a + 1])
            R = R + torch.zeros_like(R).index_put((torch.tensor([b]), torch.tensor([a])), s[b : b + 1])
    (layer.base_layer(h).detach() @ R.T).sin().sum().backward()
    torch.testing.assert_close(layer.road_theta["a"].grad, theta.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.road_alpha["a"].grad, alpha.grad, rtol=1e-5, atol=1e-6)


def test_per_token_routing_uses_each_tokens_adapter():
    layer = make_layer("road_2")
    layer.update_layer("b", "road_1", 4, init_weights=False)
    layer.update_layer("c", "road_4", 2, init_weights=False)  # another group size: its own pass
    h = torch.randn(2, 3, 6)
    names = ("a", "b", "__base__", "c")
    index = torch.tensor([[0, 1, 2], [3, 0, 1]])
    with torch.no_grad():
        layer.routing = Routing(names, index)
        y = layer(h)
        layer.routing = None
        x = layer.base_layer(h)
        for i in range(2):
            for t in range(3):
                name = names[index[i, t]]
                want = x[i, t] if name == "__base__" else R_of(layer, name) @ x[i, t]
                torch.testing.assert_close(y[i, t], want, rtol=1e-6, atol=1e-6)


def test_routing_shape_mismatch_is_a_clear_error():
    layer = make_layer()
    layer.routing = Routing(("a",), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match the leading dimensions"):
        layer(torch.randn(3, 6))


def test_inference_cache_follows_dtype_moves_and_replaced_parameters():
    layer = make_layer()
    h = torch.randn(2, 6)
    with torch.no_grad():
        layer(h)  # fill the cache in fp32
        layer.double()
        y = layer(h.double())
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, layer.base_layer(h.double()) @ R_of(layer, "a").T.double())
        layer.road_alpha["a"] = nn.Parameter(torch.full_like(layer.road_alpha["a"], 2.0))
        torch.testing.assert_close(layer(h.double()), layer.base_layer(h.double()) @ R_of(layer, "a").T.double())


def test_serving_path_follows_adapter_switches_merges_and_deletions():
    # eval + no_grad takes the cached serving path; every change of state must reach it
    layer = make_layer().eval()
    layer.update_layer("b", "road_1", 4, init_weights=False)
    h = torch.randn(3, 6)
    with torch.no_grad():
        x = layer.base_layer(h)
        torch.testing.assert_close(layer(h), x @ R_of(layer, "a").T)
        layer.set_adapter(["a", "b"])
        torch.testing.assert_close(layer(h), x @ (R_of(layer, "b") @ R_of(layer, "a")).T)
        layer.merge(adapter_names=["a"])  # a now lives in the weights; only b is applied on top
        merged_x = layer.base_layer(h)
        torch.testing.assert_close(merged_x, x @ R_of(layer, "a").T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(h), merged_x @ R_of(layer, "b").T)
        layer.unmerge()
        layer.set_adapter("b")
        layer.delete_adapter("a")
        torch.testing.assert_close(layer(h), layer.base_layer(h) @ R_of(layer, "b").T)


def test_mixed_batch_tables_follow_updates_assign_loads_and_moves():
    layer = make_layer().eval()
    layer.update_layer("b", "road_1", 4, init_weights=False)
    h = torch.randn(2, 6)

    def check():
        with torch.no_grad():
            layer.routing = Routing(("a", "b"), torch.tensor([0, 1]))
            y = layer(h)
            layer.routing = None
            x = layer.base_layer(h)
        torch.testing.assert_close(y[0], R_of(layer, "a").to(x.dtype) @ x[0])
        torch.testing.assert_close(y[1], R_of(layer, "b").to(x.dtype) @ x[1])

    check()
    with torch.no_grad():
        layer.road_theta["b"].add_(0.3)  # in place: version counter
    check()
    state = {k: v + 0.1 if "road_alpha" in k else v for k, v in layer.state_dict().items()}
    layer.load_state_dict(state, assign=True)  # replaces the Parameter objects
    check()
    layer.double()  # a move: new storage, same objects, no version bump
    h = h.double()
    check()


def test_mixed_batch_tables_are_bounded_for_ever_changing_adapter_lists():
    # continuous batching: a new combination of adapters on most calls must not grow memory
    layer = make_layer().eval()
    for i in range(6):
        layer.update_layer(f"b{i}", "road_1", 4, init_weights=False)
    names = ["a"] + [f"b{i}" for i in range(6)]
    h = torch.randn(3, 6)
    with torch.no_grad():
        for combo in itertools.permutations(names, 3):
            layer.routing = Routing(combo, torch.tensor([0, 1, 2]))
            y = layer(h)
        layer.routing = None
        x = layer.base_layer(h)
    assert len(layer._cache) <= CACHE_ENTRIES
    for row, name in enumerate(combo):  # the last call is still right
        torch.testing.assert_close(y[row], R_of(layer, name) @ x[row])
