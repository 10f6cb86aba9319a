"""Subspace adapters (RoadConfig.subspace) and adapter dtypes (autocast_adapter_dtype).

References are built independently of `roadkit.subspace` wherever the spec allows: the pairing of
ROAD_SPEC.md (feature a = k*g + j pairs with b = a + g/2; pair p = k*(g/2) + j), dense rotation
matrices assembled from `functional.coefficients`, brute-force maps from parameter entries to the
2x2 block they move, and PEFT (which ignores the roadkit-only `subspace` key) as the oracle for
saved directories.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from conftest import train_steps
from hypothesis import given, settings
from hypothesis import strategies as st
from test_model import assert_unchanged, snapshot
from torch import nn

import roadkit.functional as F
from roadkit import ModulesToSaveWrapper, RoadConfig, RoadLayer, RoadModel, get_peft_model
from roadkit.subspace import entries_of, features_of, normalize_spec, outside_count, pairs_of

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # PEFT calls a transformers helper deprecated in the installed transformers, and warns about the
    # roadkit-only `subspace` key (which it is meant to ignore).
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Unexpected keyword arguments:UserWarning"),
]

VARIANTS = ["road_1", "road_2", "road_4"]
PER_PAIR = {"road_1": 1, "road_2": 2, "road_4": 4}  # entries of theta (and of alpha) per pair
TARGETS = ["q_proj", "v_proj", "up_proj"]  # out_features 128, 128, 256 on the tiny Llama


# ---- references ------------------------------------------------------------------------------------


def spec_pairing(d_out: int, g: int) -> tuple[list[int], list[int]]:
    """Features (a[p], b[p]) of every pair p, straight from ROAD_SPEC.md."""
    a = [k * g + j for k in range(d_out // g) for j in range(g // 2)]
    return a, [x + g // 2 for x in a]


def dense(variant: str, g: int, theta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The d_out x d_out matrix R of y = R x: y_a = c_a x_a - s_a x_b, y_b = c_b x_b + s_b x_a."""
    c, s = F.coefficients(variant, g, theta.detach().double(), alpha.detach().double())
    a, b = spec_pairing(c.numel(), g)
    r = torch.diag(c)
    r[a, b] = -s[a]
    r[b, a] = s[b]
    return r


def block(r: torch.Tensor, g: int, p: int) -> torch.Tensor:
    a, b = spec_pairing(r.shape[0], g)
    idx = [a[p], b[p]]
    return r[idx][:, idx]


def ref_pairs(spec, n_pairs: int) -> set[int]:
    """Pairs a (normalised) spec selects; independent of `pairs_of` except for random fractions."""
    if spec is None:
        return set(range(n_pairs))
    if "shard" in spec:
        return {p for p in range(n_pairs) if p * spec["num_shards"] // n_pairs == spec["shard"]}
    if "pairs" in spec:
        return set(spec["pairs"])
    if "union" in spec:
        return set().union(*(ref_pairs(s, n_pairs) for s in spec["union"]))
    return set(pairs_of(spec, n_pairs).tolist())


def entry_owner_map(variant: str, g: int, d_out: int, seed: int = 0) -> dict[int, int]:
    """Brute force: perturb each parameter entry alone and see which pair's 2x2 block moves."""
    n = F.parameter_length(variant, d_out)
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, dtype=torch.float64, generator=gen)
    alpha = 1 + 0.3 * torch.randn(n, dtype=torch.float64, generator=gen)
    r0 = dense(variant, g, theta, alpha)
    a, b = spec_pairing(d_out, g)
    pair_of_feature = {f: p for p, f in enumerate(a)} | {f: p for p, f in enumerate(b)}
    owner = {}
    for e in range(n):
        t, al = theta.clone(), alpha.clone()
        t[e] += 0.37
        al[e] += 0.5
        changed = (dense(variant, g, t, al) != r0).nonzero().tolist()
        assert changed, f"entry {e} changes nothing"
        pairs = {pair_of_feature[i] for i, _ in changed} | {pair_of_feature[j] for _, j in changed}
        assert len(pairs) == 1, f"entry {e} of {variant} g={g} moves pairs {pairs}"
        (p,) = pairs
        assert all({i, j} <= {a[p], b[p]} for i, j in changed)  # only inside the pair's 2x2 block
        owner[e] = p
    return owner


def no_road(model: nn.Module) -> bool:
    return not any(isinstance(m, (RoadLayer, ModulesToSaveWrapper)) for m in model.modules())


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


# ---- spec normalisation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        (None, None),
        ("0/2", {"shard": 0, "num_shards": 2}),
        (" 3 / 4 ", {"shard": 3, "num_shards": 4}),
        ("0/1", {"shard": 0, "num_shards": 1}),
        ({"shard": 1, "num_shards": 3}, {"shard": 1, "num_shards": 3}),
        (0.25, {"fraction": 0.25, "seed": 0}),
        (1.0, {"fraction": 1.0, "seed": 0}),
        ({"fraction": 0.5}, {"fraction": 0.5, "seed": 0}),
        ({"fraction": 1, "seed": 7}, {"fraction": 1.0, "seed": 7}),
        ([5, 1, 5, 0], {"pairs": [0, 1, 5]}),
        ((2, 3), {"pairs": [2, 3]}),
        ({"pairs": [9, 4]}, {"pairs": [4, 9]}),
        (
            {"union": ["0/3", [7, 8], 0.5]},
            {"union": [{"shard": 0, "num_shards": 3}, {"pairs": [7, 8]}, {"fraction": 0.5, "seed": 0}]},
        ),
        ({"union": [{"union": ["1/2"]}]}, {"union": [{"union": [{"shard": 1, "num_shards": 2}]}]}),
    ],
)
def test_normalize_spec(spec, expected):
    out = normalize_spec(copy.deepcopy(spec))
    assert out == expected
    assert normalize_spec(out) == out  # idempotent
    assert json.loads(json.dumps(out)) == out  # storable in adapter_config.json
    assert RoadConfig(subspace=copy.deepcopy(spec)).subspace == expected


ALLOWED_FORMS = (
    r"allowed forms: \{\"shard\": k, \"num_shards\": n\}, \{\"fraction\": f, \"seed\": s\}, "
    r"\{\"pairs\": \[\.\.\.\]\}, \{\"union\": \[\.\.\.\]\}"
)


@pytest.mark.parametrize(
    "spec, error, patterns",
    [
        ("abc", ValueError, ["'abc'", r'shard "k/n"']),
        ("1/", ValueError, ["'1/'", r'"k/n"']),
        ("-1/2", ValueError, ["'-1/2'", r'"k/n"']),
        ("1/2/3", ValueError, ["'1/2/3'", r'"k/n"']),
        ("2/2", ValueError, ["'shard': 2", "'num_shards': 2", "0 <= shard < num_shards"]),
        ("0/0", ValueError, ["'num_shards': 0", "0 <= shard < num_shards"]),
        ({"shard": -1, "num_shards": 2}, ValueError, ["'shard': -1", "0 <= shard < num_shards"]),
        ({"shard": True, "num_shards": 2}, ValueError, ["'shard': True", "integers"]),
        ({"shard": 0.0, "num_shards": 2}, ValueError, ["'shard': 0.0", "integers"]),
        ({"shard": 0}, ValueError, ["{'shard': 0}", ALLOWED_FORMS]),
        ({"shard": 0, "num_shards": 2, "seed": 1}, ValueError, ["'seed': 1", ALLOWED_FORMS]),
        ({"fraction": 0.0}, ValueError, ["'fraction': 0.0", "0 < fraction <= 1"]),
        ({"fraction": 1.5}, ValueError, ["'fraction': 1.5", "0 < fraction <= 1"]),
        ({"fraction": -0.5}, ValueError, ["'fraction': -0.5", "0 < fraction <= 1"]),
        ({"fraction": float("nan")}, ValueError, ["'fraction': nan", "0 < fraction <= 1"]),
        ({"fraction": True}, ValueError, ["'fraction': True", "0 < fraction <= 1"]),
        ({"fraction": "0.5"}, ValueError, ["'fraction': '0.5'", "0 < fraction <= 1"]),
        ({"fraction": 0.5, "seed": 1.5}, ValueError, ["'seed': 1.5", "integer seed"]),
        (0.0, ValueError, ["'fraction': 0.0", "0 < fraction <= 1"]),
        (2.5, ValueError, ["'fraction': 2.5", "0 < fraction <= 1"]),
        ([], ValueError, ["'pairs': \\[\\]", "non-empty list of non-negative pair indices"]),
        ([1, -2], ValueError, ["-2", "non-negative pair indices"]),
        ([1, 2.0], ValueError, ["2.0", "non-negative pair indices"]),
        ([True], ValueError, ["True", "non-negative pair indices"]),
        ({"pairs": "0,1"}, ValueError, ["'0,1'", "non-empty list"]),
        ({"union": []}, ValueError, ["'union': \\[\\]", "non-empty list of subspaces"]),
        ({"union": "0/2"}, ValueError, ["'union': '0/2'", "non-empty list of subspaces"]),
        ({"union": ["0/2", "x"]}, ValueError, ["'x'", '"k/n"']),
        ({"union": [None]}, ValueError, ["None"]),
        ({}, ValueError, ["{}", ALLOWED_FORMS]),
        ({"layers": 3}, ValueError, ["'layers': 3", ALLOWED_FORMS]),
        (3, TypeError, ["int: 3", r'a dict, "k/n", a list of pair indices or a fraction']),
        (True, TypeError, ["bool: True", r'a dict, "k/n", a list of pair indices or a fraction']),
        ({1, 2}, TypeError, ["set", r'a dict, "k/n", a list of pair indices or a fraction']),
    ],
)
def test_normalize_spec_errors(spec, error, patterns):
    for build in (normalize_spec, lambda s: RoadConfig(subspace=s)):
        with pytest.raises(error) as info:
            build(copy.deepcopy(spec))
        for pattern in patterns:
            assert re.search(pattern, str(info.value)), (pattern, str(info.value))
        assert "subspace" in str(info.value)


def test_config_dict_round_trip_keeps_subspace():
    cfg = RoadConfig(subspace={"union": ["1/4", [3, 9]]})
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["subspace"] == {"union": [{"shard": 1, "num_shards": 4}, {"pairs": [3, 9]}]}
    assert RoadConfig.from_dict(data).subspace == cfg.subspace
    assert "subspace" not in RoadConfig().to_dict()  # a roadkit key: written only when set


# ---- pairs of a layer ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_pairs", [1, 2, 7, 16, 64, 100, 129])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 5, 8])
def test_shards_partition_the_pairs(n_pairs, num_shards):
    shards = [pairs_of(normalize_spec(f"{k}/{num_shards}"), n_pairs) for k in range(num_shards)]
    flat = torch.cat(shards).tolist()
    assert sorted(flat) == list(range(n_pairs))  # covering and disjoint
    sizes = [len(s) for s in shards]
    if num_shards <= n_pairs:
        assert max(sizes) - min(sizes) <= 1  # balanced
    for k, s in enumerate(shards):
        lst = s.tolist()
        assert lst == sorted(lst) and s.dtype == torch.int64
        assert lst == list(range(lst[0], lst[0] + len(lst))) if lst else True  # contiguous
        assert set(lst) == ref_pairs({"shard": k, "num_shards": num_shards}, n_pairs)
        if k and lst and shards[k - 1].numel():
            assert lst[0] == shards[k - 1][-1] + 1  # in order


@settings(max_examples=60, deadline=None)
@given(n_pairs=st.integers(1, 300), num_shards=st.integers(1, 40))
def test_shards_partition_property(n_pairs, num_shards):
    owners = {}
    for k in range(num_shards):
        for p in pairs_of({"shard": k, "num_shards": num_shards}, n_pairs).tolist():
            assert p not in owners
            owners[p] = k
    assert sorted(owners) == list(range(n_pairs))
    assert [owners[p] for p in range(n_pairs)] == sorted(owners.values())  # contiguous, in shard order


@settings(max_examples=60, deadline=None)
@given(n_pairs=st.integers(1, 300), fraction=st.floats(1e-3, 1.0), seed=st.integers(0, 2**31 - 1))
def test_fraction_count_and_determinism(n_pairs, fraction, seed):
    spec = normalize_spec({"fraction": fraction, "seed": seed})
    got = pairs_of(spec, n_pairs)
    assert got.numel() == max(1, round(fraction * n_pairs))
    lst = got.tolist()
    assert lst == sorted(set(lst)) and 0 <= lst[0] and lst[-1] < n_pairs
    assert torch.equal(pairs_of(copy.deepcopy(spec), n_pairs), got)  # same seed, same pairs


def test_fraction_seed_changes_the_pairs():
    a = pairs_of(normalize_spec({"fraction": 0.5, "seed": 0}), 64)
    b = pairs_of(normalize_spec({"fraction": 0.5, "seed": 1}), 64)
    assert a.numel() == b.numel() == 32 and not torch.equal(a, b)
    assert pairs_of(normalize_spec(1.0), 10).tolist() == list(range(10))
    assert pairs_of(normalize_spec(0.01), 10).numel() == 1  # at least one pair


def test_pairs_and_union_of_a_layer():
    assert pairs_of(normalize_spec([9, 2]), 10).tolist() == [2, 9]
    spec = normalize_spec({"union": ["0/4", [1, 30], "3/4"]})
    assert pairs_of(spec, 32).tolist() == sorted(ref_pairs(spec, 32)) == [*range(8), *range(24, 32)]
    with pytest.raises(ValueError, match=r"my\.layer: subspace pair 10 is out of range; this layer has 10 pairs"):
        pairs_of(normalize_spec([1, 10]), 10, where="my.layer")
    with pytest.raises(ValueError, match="pair 12 is out of range"):
        pairs_of(normalize_spec({"union": ["0/2", [12]]}), 10)


# ---- entries of a pair: brute force against the spec's pairing -----------------------------------


def test_dense_reference_matches_rotate():
    """The dense reference is what the library applies (keeps the brute-force checks honest)."""
    gen = torch.Generator().manual_seed(3)
    for variant in VARIANTS:
        for g in (2, 8):
            n = F.parameter_length(variant, 16)
            theta, alpha = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
            x = torch.randn(5, 16, dtype=torch.float64, generator=gen)
            coeffs = F.coefficients(variant, g, theta.double(), alpha.double())
            torch.testing.assert_close(F.rotate(x, coeffs, g), x @ dense(variant, g, theta, alpha).T)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("g", [2, 4, 8, 16])
def test_entries_of_against_brute_force(variant, g):
    d_out = 32
    n_pairs = d_out // 2
    owner = entry_owner_map(variant, g, d_out)
    by_pair = {p: sorted(e for e, q in owner.items() if q == p) for p in range(n_pairs)}
    a, b = spec_pairing(d_out, g)
    for p in range(n_pairs):
        got = entries_of(variant, g, torch.tensor([p])).tolist()
        assert got == by_pair[p], f"pair {p}"
        assert len(got) == PER_PAIR[variant]
        assert features_of(torch.tensor([p]), g).tolist() == sorted([a[p], b[p]])
    # Several pairs: the sorted union; perturbing exactly those entries moves exactly those blocks.
    gen = torch.Generator().manual_seed(1)
    n = F.parameter_length(variant, d_out)
    theta, alpha = torch.randn(n, dtype=torch.float64, generator=gen), torch.rand(n, dtype=torch.float64) + 0.5
    for trial in range(4):
        pairs = torch.randperm(n_pairs, generator=gen)[: 1 + trial * 3].sort().values
        idx = entries_of(variant, g, pairs)
        assert idx.tolist() == sorted(e for p in pairs.tolist() for e in by_pair[p])
        assert features_of(pairs, g).tolist() == sorted([a[p] for p in pairs.tolist()] + [b[p] for p in pairs.tolist()])
        t, al = theta.clone(), alpha.clone()
        t[idx] += 0.25
        al[idx] *= 1.7
        r0, r1 = dense(variant, g, theta, alpha), dense(variant, g, t, al)
        for p in range(n_pairs):
            moved = not torch.equal(block(r0, g, p), block(r1, g, p))
            assert moved == (p in pairs.tolist()), f"pair {p}"
        owned = set(features_of(pairs, g).tolist())
        outside = [i for i in range(d_out) if i not in owned]
        assert torch.equal(r0[outside], r1[outside]) and torch.equal(r0[:, outside], r1[:, outside])


def test_outside_count():
    spec = normalize_spec([1])  # pair 1 of a road_2 layer with 8 features in groups of 4: features 1 and 3
    free = entries_of("road_2", 4, torch.tensor([1]))
    theta, alpha = torch.zeros(8), torch.ones(8)
    theta[free], alpha[free] = 0.3, 2.0
    assert outside_count(spec, "road_2", 4, 8, theta, alpha) == 0
    assert outside_count(None, "road_2", 4, 8, theta, alpha) == 0
    theta[0], alpha[5] = 1e-30, 0.5
    assert outside_count(spec, "road_2", 4, 8, theta, alpha) == 2


# ---- adapters on a model ---------------------------------------------------------------------------


def subspace_model(base, variant, g, spec, init_weights=False, targets=TARGETS, name="default", seed=0):
    torch.manual_seed(seed)
    cfg = RoadConfig(
        variant=variant, group_size=g, init_weights=init_weights, target_modules=list(targets), subspace=spec
    )
    return get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)


def assert_identity_outside(rm: RoadModel, name: str, expect_moved: bool = True) -> int:
    """Every layer: full-length parameters exactly (0, 1) outside the subspace, the dense rotation exactly
    the identity on non-owned pairs (and not on owned ones), and the layer's output equal to the base
    output on every non-owned feature (in both the inference and the training path)."""
    spec = rm.peft_config[name].subspace
    checked = 0
    for path, layer in rm.road_layers():
        if name not in layer.road_theta:
            continue
        variant, g, d = layer.variant[name], layer.group_size[name], layer.out_features
        owned = ref_pairs(spec, d // 2)
        theta, alpha = (t.detach() for t in layer.parameters_of(name))
        saved = rm.adapter_state_dict(name)
        assert torch.equal(saved[f"base_model.model.{path}.road_theta"], theta)
        assert torch.equal(saved[f"base_model.model.{path}.road_alpha"], alpha)
        inside = entries_of(variant, g, torch.tensor(sorted(owned), dtype=torch.int64)).tolist()
        outside = [e for e in range(theta.numel()) if e not in set(inside)]
        assert (theta[outside] == 0).all() and (alpha[outside] == 1).all(), path
        assert layer.road_theta[name].numel() == len(owned) * PER_PAIR[variant]
        assert torch.equal(layer.road_theta[name].detach(), theta[inside])
        r = dense(variant, g, theta, alpha)
        eye = torch.eye(2, dtype=r.dtype)
        for p in range(d // 2):
            if p not in owned:
                assert torch.equal(block(r, g, p), eye), f"{path} pair {p}"
            elif expect_moved:
                assert not torch.equal(block(r, g, p), eye), f"{path} owned pair {p} is the identity"
        keep = [i for i in range(d) if i not in set(features_of(torch.tensor(sorted(owned)), g).tolist())]
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(5))
        x = x.to(layer.base_layer.weight.dtype)
        with torch.no_grad():
            base_out = layer.base_layer(x)
            assert torch.equal(layer(x)[..., keep], base_out[..., keep]), path
        if layer.road_theta[name].requires_grad:
            with torch.enable_grad():
                assert torch.equal(layer(x)[..., keep].detach(), base_out[..., keep]), path
        checked += 1
    assert checked
    return checked


def pairs_of_model(rm: RoadModel, name: str) -> int:
    spec = rm.peft_config[name].subspace
    return sum(
        len(ref_pairs(spec, layer.out_features // 2)) * PER_PAIR[layer.variant[name]]
        for _, layer in rm.road_layers()
        if name in layer.road_theta
    )


TRAIN_CASES = [
    ("road_1", True, "1/3", 8),
    ("road_1", False, [1, 2, 3, 40], 16),
    ("road_2", True, "2/3", 2),
    ("road_2", False, {"fraction": 0.3, "seed": 5}, 8),
    ("road_4", True, {"pairs": [0, 5, 17, 63]}, 64),
    ("road_4", False, {"union": ["0/4", [40, 41]]}, 8),
]


@pytest.mark.parametrize(
    "variant, init_weights, spec, g", TRAIN_CASES, ids=[f"{v}-init{i}-g{g}" for v, i, _, g in TRAIN_CASES]
)
def test_training_keeps_outside_pairs_identity(llama_base, variant, init_weights, spec, g):
    rm = subspace_model(llama_base, variant, g, spec, init_weights=init_weights)
    expected = pairs_of_model(rm, "default")
    # Only the owned entries are parameters: the trainable count, and the optimiser's view.
    assert rm.get_nb_trainable_parameters()[0] == 2 * expected
    full = subspace_model(llama_base, variant, g, None, init_weights=init_weights)
    owned_fraction = expected / (full.get_nb_trainable_parameters()[0] / 2)
    assert 0 < owned_fraction < 1
    before = {
        p: (layer.parameters_of("default")[0].detach().clone(), layer.parameters_of("default")[1].detach().clone())
        for p, layer in rm.road_layers()
    }
    if not init_weights:
        assert_identity_outside(rm, "default")

    params = [p for p in rm.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == 2 * expected
    rm.eval()  # eval afterwards too: the checks below read the inference path
    losses = train_steps(
        rm, torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(0)), 6, weight_decay=0.1
    )  # weight decay must not move anything outside the subspace
    assert losses[-1] < losses[0], losses

    assert_identity_outside(rm, "default")
    for path, layer in rm.road_layers():  # every owned pair moved
        theta, alpha = (t.detach() for t in layer.parameters_of("default"))
        for p in sorted(ref_pairs(rm.peft_config["default"].subspace, layer.out_features // 2)):
            idx = entries_of(variant, g, torch.tensor([p]))
            moved = (theta[idx] != before[path][0][idx]) | (alpha[idx] != before[path][1][idx])
            assert moved.any(), f"{path}: owned pair {p} did not move"


@pytest.mark.parametrize("variant", VARIANTS)
def test_subspace_gradients_equal_full_adapter_gradients(llama_base, variant):
    """A subspace adapter behaves as the full adapter with the identity outside: same logits, and its
    gradients are the full adapter's gradients at the owned entries."""
    sub = subspace_model(llama_base, variant, 8, "1/2")
    full = subspace_model(llama_base, variant, 8, None)
    free = {}
    with torch.no_grad():
        for (path, ls), (_, lf) in zip(sub.road_layers(), full.road_layers(), strict=True):
            theta, alpha = ls.parameters_of("default")
            lf.road_theta["default"].copy_(theta)
            lf.road_alpha["default"].copy_(alpha)
            free[path] = entries_of(
                variant, 8, torch.tensor(sorted(ref_pairs(sub.peft_config["default"].subspace, ls.out_features // 2)))
            )
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    for m in (sub, full):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(logits(sub.eval(), ids), logits(full.eval(), ids), atol=1e-6, rtol=0)
    for (path, ls), (_, lf) in zip(sub.road_layers(), full.road_layers(), strict=True):
        for store in ("road_theta", "road_alpha"):
            g_sub = getattr(ls, store)["default"].grad
            g_full = getattr(lf, store)["default"].grad
            assert g_sub is not None and g_sub.abs().sum() > 0
            torch.testing.assert_close(g_sub, g_full[free[path]], atol=1e-6, rtol=1e-5)


def test_subspace_init_weights_true_is_identity(llama_base, input_ids):
    rm = subspace_model(llama_base, "road_2", 8, "0/2", init_weights=True)
    assert torch.equal(logits(rm.eval(), input_ids), logits(llama_base, input_ids))


# ---- pairs out of range ------------------------------------------------------------------------------


def test_pairs_out_of_range_names_layer_before_any_change(llama_base):
    # pair 100 exists in up_proj (128 pairs) but not in q_proj / v_proj (64 pairs)
    plain = copy.deepcopy(llama_base)
    before = snapshot(plain)
    cfg = RoadConfig(variant="road_1", group_size=8, target_modules=["up_proj", "q_proj"], subspace=[3, 100])
    with pytest.raises(
        ValueError,
        match=r"target module 'model\.layers\.\d\.self_attn\.q_proj'.*pair 100 is out of "
        r"range; this layer has 64 pairs",
    ):
        get_peft_model(plain, cfg)
    assert_unchanged(before, plain)
    assert no_road(plain)

    rm = subspace_model(llama_base, "road_2", 8, "0/2")
    before = snapshot(rm)
    with pytest.raises(ValueError, match=r"q_proj.*pair 100 is out of range"):
        rm.add_adapter("b", cfg)
    assert_unchanged(before, rm)
    assert "b" not in rm.peft_config
    # the same pairs are fine where every layer has them
    rm.add_adapter("c", RoadConfig(variant="road_1", group_size=8, target_modules=["up_proj"], subspace=[3, 100]))
    assert all(layer.road_theta["c"].numel() == 2 for _, layer in rm.road_layers() if "c" in layer.road_theta)


# ---- save / load ---------------------------------------------------------------------------------------


def test_save_load_round_trip_and_peft_loads_it(llama_base, input_ids, tmp_path):
    spec = {"union": ["1/4", [0, 2]]}
    rm = subspace_model(llama_base, "road_4", 8, spec).eval()
    rm.add_adapter(
        "other",
        RoadConfig(variant="road_1", group_size=16, init_weights=False, target_modules=["v_proj"], subspace="0/2"),
    )
    expected = logits(rm, input_ids)
    assert not torch.allclose(expected, logits(llama_base, input_ids), atol=1e-3)
    rm.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["subspace"] == normalize_spec(spec)
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["subspace"] == {
        "shard": 0,
        "num_shards": 2,
    }

    loaded = RoadModel.from_pretrained(copy.deepcopy(llama_base), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    for name in ("default", "other"):
        assert loaded.peft_config[name].subspace == rm.peft_config[name].subspace
        for (p1, l1), (p2, l2) in zip(rm.road_layers(), loaded.road_layers(), strict=True):
            assert p1 == p2
            if name in l1.road_theta:
                assert torch.equal(l1.road_theta[name], l2.road_theta[name])  # only owned entries
                assert torch.equal(l1.free[name], l2.free[name])
    assert torch.equal(logits(loaded, input_ids), expected)
    assert_identity_outside(loaded, "default")
    loaded.set_adapter("other")
    rm.set_adapter("other")
    assert torch.equal(logits(loaded, input_ids), logits(rm, input_ids))

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(llama_base), os.fspath(tmp_path)).eval()
    torch.testing.assert_close(logits(pm, input_ids), expected, atol=1e-6, rtol=0)
    state = rm.adapter_state_dict("default")
    for key, p in pm.named_parameters():
        if ".road_" in key:
            path = key.replace(".default", "")
            assert torch.equal(p.detach(), state[path]), key

    trainable = RoadModel.from_pretrained(copy.deepcopy(llama_base), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * pairs_of_model(trainable, "default")


@pytest.mark.parametrize("what", ["theta", "alpha"])
def test_tampered_file_is_refused_before_any_change(llama_base, input_ids, tmp_path, what):
    from safetensors.torch import load_file, save_file

    rm = subspace_model(llama_base, "road_2", 8, "1/2")
    rm.save_pretrained(tmp_path / "good")
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    layer_path = "model.layers.1.self_attn.v_proj"
    key = f"base_model.model.{layer_path}.road_{what}"
    outside = next(
        i for i in range(128) if i not in set(entries_of("road_2", 8, pairs_of(normalize_spec("1/2"), 64)).tolist())
    )
    tensors[key][outside] += 0.5
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, bad / "adapter_model.safetensors")
    (bad / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())

    plain = copy.deepcopy(llama_base)
    before = snapshot(plain)
    pattern = rf"subspace=.*not the identity outside it in: {layer_path} \(1 entries\)"
    with pytest.raises(ValueError, match=pattern):
        RoadModel.from_pretrained(plain, bad)
    assert_unchanged(before, plain)
    assert no_road(plain)

    before = snapshot(rm)
    with pytest.raises(ValueError, match=pattern):
        rm.load_adapter(bad, "bad")
    with pytest.raises(ValueError, match=rf"not the identity outside it in: {layer_path}"):
        rm.add_adapter("bad", RoadConfig.from_pretrained(bad), state_dict=tensors)
    assert_unchanged(before, rm)
    assert "bad" not in rm.peft_config

    # Values inside the subspace are the adapter's own: accepted and honoured.
    tensors[key][outside] -= 0.5
    inside = entries_of("road_2", 8, torch.tensor([40])).tolist()[0]
    tensors[key][inside] = 0.75
    rm.add_adapter("ok", RoadConfig.from_pretrained(bad), state_dict=tensors)
    layer = rm.model.get_submodule(layer_path)
    assert layer.parameters_of("ok")[0 if what == "theta" else 1][inside] == 0.75
    # ... and behave as a full adapter holding the same tensors
    full_cfg = RoadConfig(variant="road_2", group_size=8, target_modules=TARGETS)
    rm.add_adapter("full", full_cfg, state_dict=tensors)
    rm.set_adapter("ok")
    ok = logits(rm, input_ids)
    rm.set_adapter("full")
    assert torch.equal(ok, logits(rm, input_ids))
    rm.set_adapter("default")
    assert not torch.allclose(ok, logits(rm, input_ids), atol=1e-4)


# ---- adapter dtypes -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_bf16(llama_base):
    return copy.deepcopy(llama_base).to(torch.bfloat16)


def road_dtypes(rm: RoadModel) -> set[torch.dtype]:
    return {p.dtype for n, p in rm.named_parameters() if ".road_" in n}


@pytest.mark.parametrize("spec", [None, "0/2"])
def test_autocast_adapter_dtype_default_fp32(llama_bf16, spec):
    rm = get_peft_model(
        copy.deepcopy(llama_bf16),
        RoadConfig(variant="road_2", group_size=8, init_weights=False, target_modules=TARGETS, subspace=spec),
    )
    assert road_dtypes(rm) == {torch.float32}
    rm.train()
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    out = rm(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in rm.named_parameters() if ".road_" in n]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in rm.named_parameters() if ".road_" not in n)


def _train_step(rm, ids):
    params = [p for p in rm.parameters() if p.requires_grad]
    assert params
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    rm.train()
    loss = rm(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype for p in params)
    opt.step()
    rm.eval()
    assert torch.isfinite(loss)
    assert all(not torch.equal(b, p) for b, p in zip(before, params, strict=True))
    return params


def test_autocast_adapter_dtype_false_bf16(llama_bf16, tmp_path):
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    rm = get_peft_model(
        copy.deepcopy(llama_bf16),
        RoadConfig(variant="road_4", group_size=8, init_weights=False, target_modules=TARGETS, subspace="1/2"),
        autocast_adapter_dtype=False,
    )
    assert road_dtypes(rm) == {torch.bfloat16}
    params = _train_step(rm, ids)
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert_identity_outside(rm, "default")

    rm.save_pretrained(tmp_path)
    kept = RoadModel.from_pretrained(
        copy.deepcopy(llama_bf16), tmp_path, is_trainable=True, autocast_adapter_dtype=False
    )
    assert road_dtypes(kept) == {torch.bfloat16}
    assert torch.equal(logits(kept, ids), logits(rm, ids))
    _train_step(kept, ids)
    kept.load_adapter(tmp_path, "again")  # a model's later adapters follow its setting
    assert road_dtypes(kept) == {torch.bfloat16}

    cast = RoadModel.from_pretrained(copy.deepcopy(llama_bf16), tmp_path)
    assert road_dtypes(cast) == {torch.float32}
    cast.load_adapter(tmp_path, "again")
    assert road_dtypes(cast) == {torch.float32}


def test_mixed_batch_bf16_adapters(llama_bf16):
    rm = get_peft_model(
        copy.deepcopy(llama_bf16),
        RoadConfig(variant="road_2", group_size=8, init_weights=False, target_modules=TARGETS, subspace="0/2"),
        adapter_name="a",
        autocast_adapter_dtype=False,
    )
    rm.add_adapter(
        "b", RoadConfig(variant="road_1", group_size=16, init_weights=False, target_modules=["v_proj", "o_proj"])
    )
    rm.eval()
    assert road_dtypes(rm) == {torch.bfloat16}
    rows = ["a", "__base__", "b", "a", "b"]
    ids = torch.randint(0, 96, (len(rows), 7), generator=torch.Generator().manual_seed(2))
    mixed = logits(rm, ids, adapter_names=rows)
    assert mixed.dtype == torch.bfloat16
    tol = dict(atol=2e-2, rtol=2e-2)
    with rm.disable_adapter():
        base = logits(rm, ids)
    for name in ("a", "b", "__base__"):
        idx = [i for i, n in enumerate(rows) if n == name]
        if name == "__base__":
            single = base
        else:
            rm.set_adapter(name)
            single = logits(rm, ids)
            assert (single[idx] - base[idx]).abs().max() > 0.1  # the adapter matters beyond the tolerance
        torch.testing.assert_close(mixed[idx], single[idx], **tol)
