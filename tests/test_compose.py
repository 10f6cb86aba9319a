"""`roadkit.compose`: sequential, union and interpolate composition of RoAd adapters.

References: roadkit with several adapters active (`set_adapter([...])`), PEFT with the same adapters
active (loaded from roadkit's saved directories), merging the inputs one after the other, and the
closed forms of the spec (angles add and scales multiply for road_1 pairs; weighted angles and
log-scales for interpolation). No expected numbers are hard-coded.
"""

from __future__ import annotations

import copy
import math
import os
import re

import pytest
import torch
from conftest import train_steps
from test_model import assert_unchanged, snapshot
from torch import nn

from roadkit import RoadConfig, RoadModel, compose, get_peft_model
from roadkit import functional as F
from roadkit.subspace import entries_of, features_of, normalize_spec, pairs_of

peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Unexpected keyword arguments:UserWarning"),  # PEFT on `subspace`
]

QV = ["q_proj", "v_proj"]
# fp32 logits of the tiny Llama: one composed rotation vs. two in a row (or PEFT's), rounding only.
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture
def ids():
    return torch.randint(0, 96, (3, 8), generator=torch.Generator().manual_seed(11))


# ---- helpers ---------------------------------------------------------------------------------------


def build(base: nn.Module, adapters, seed: int = 0, positive: bool = False, **kwargs) -> RoadModel:
    """A roadkit model with random adapters (name, variant, group_size, targets[, subspace]); the first
    is active. `positive` makes every alpha positive (interpolation works on log-scales)."""
    torch.manual_seed(seed)
    rm = None
    for name, variant, g, targets, *rest in adapters:
        cfg = RoadConfig(
            variant=variant,
            group_size=g,
            init_weights=False,
            target_modules=copy.deepcopy(targets),
            subspace=rest[0] if rest else None,
        )
        if rm is None:
            rm = get_peft_model(copy.deepcopy(base), cfg, adapter_name=name, **kwargs)
        else:
            rm.add_adapter(name, cfg)
    if positive:
        with torch.no_grad():
            for _, layer in rm.road_layers():
                for alpha in layer.road_alpha.values():
                    alpha.copy_(alpha.abs() + 0.1)
    return rm.eval()


def logits(model, x, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, **kwargs).logits


def active_logits(rm: RoadModel, names, x) -> torch.Tensor:
    before = rm.active_adapters
    rm.set_adapter(names)
    try:
        return logits(rm, x)
    finally:
        rm.set_adapter(before)


def peft_active(base: nn.Module, rm: RoadModel, names: list[str], directory) -> nn.Module:
    """PEFT with roadkit's adapters `names` (saved, then loaded by PEFT), all active in this order."""
    directory = os.fspath(directory)
    rm.save_pretrained(directory, selected_adapters=sorted(set(names)))

    def where(n):
        return directory if n == "default" else os.path.join(directory, n)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), where(names[0]), adapter_name=names[0])
    for n in dict.fromkeys(names[1:]):
        pm.load_adapter(where(n), adapter_name=n)
    pm.base_model.set_adapter(list(names))
    return pm.eval()


def full_params(rm: RoadModel, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        path: tuple(t.detach().clone() for t in layer.parameters_of(name))
        for path, layer in rm.road_layers()
        if name in layer.road_theta
    }


def paths_of(rm: RoadModel, name: str) -> list[str]:
    return sorted(p for p, layer in rm.road_layers() if name in layer.road_theta)


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_new_adapter_is_added_inactive(rm: RoadModel, new: str, active_before: list[str], cfg: RoadConfig):
    assert rm.peft_config[new] is cfg
    assert rm.active_adapters == active_before
    for _, layer in rm.road_layers():
        if new in layer.road_theta:
            assert not layer.road_theta[new].requires_grad and not layer.road_alpha[new].requires_grad
            assert new not in layer.active_adapters


# ---- sequential ------------------------------------------------------------------------------------

SEQUENTIAL = {
    "r1+r1": [("a", "road_1", 8, QV), ("b", "road_1", 8, QV)],
    "r1+r1-subspaces": [("a", "road_1", 8, QV, "0/2"), ("b", "road_1", 8, ["q_proj", "up_proj"], 0.5)],
    "r1+r2": [("a", "road_1", 8, QV), ("b", "road_2", 8, ["v_proj", "o_proj"])],
    "r2+r4": [("a", "road_2", 64, ["q_proj", "k_proj", "v_proj"]), ("b", "road_4", 64, ["v_proj", "up_proj"])],
    "r4+r4": [("a", "road_4", 2, QV), ("b", "road_4", 2, QV, "1/2")],
    "three": [
        ("a", "road_1", 8, QV),
        ("b", "road_2", 8, ["v_proj", "o_proj", "up_proj"]),
        ("c", "road_4", 8, r".*\.(q_proj|o_proj|down_proj)"),
    ],
}


@pytest.mark.parametrize("case", list(SEQUENTIAL))
def test_sequential(llama_base, ids, tmp_path, case):
    adapters = SEQUENTIAL[case]
    names = [a[0] for a in adapters]
    rm = build(llama_base, adapters)
    variants = {a[1] for a in adapters}
    both = active_logits(rm, names, ids)
    assert not torch.allclose(both, active_logits(rm, names[:1], ids), atol=1e-3)  # the later ones matter

    cfg = compose(rm, names, "seq")
    assert_new_adapter_is_added_inactive(rm, "seq", names[:1], cfg)
    assert cfg.variant == ("road_1" if variants == {"road_1"} else "road_2")
    specs = [normalize_spec(a[4]) if len(a) > 4 else None for a in adapters]
    union = None if None in specs else normalize_spec({"union": specs})  # pairs no input owns stay identity
    assert cfg.group_size == adapters[0][2] and cfg.subspace == union and not cfg.modules_to_save
    assert paths_of(rm, "seq") == sorted(set().union(*(paths_of(rm, n) for n in names)))
    composed = active_logits(rm, "seq", ids)
    torch.testing.assert_close(composed, both, **TOL)

    # PEFT with the same adapters active in the same order
    pm = peft_active(llama_base, rm, names, tmp_path / "inputs")
    torch.testing.assert_close(logits(pm, ids), composed, **TOL)
    torch.testing.assert_close(logits(pm, ids), both, **TOL)

    # merging the composed adapter = merging the inputs one after the other
    merged_seq = copy.deepcopy(rm).merge_and_unload(adapter_names=names)
    merged_one = copy.deepcopy(rm).merge_and_unload(adapter_names=["seq"])
    s1, s2 = base_state(merged_seq), base_state(merged_one)
    assert s1.keys() == s2.keys()
    changed = 0
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
        changed += not torch.equal(s1[k], llama_base.state_dict()[k])
    assert changed >= len(paths_of(rm, "seq"))

    # the composed adapter saves in PEFT's format; PEFT and roadkit load it with the same logits
    rm.save_pretrained(tmp_path / "out", selected_adapters=["seq"])
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(llama_base), os.fspath(tmp_path / "out" / "seq")).eval()
    torch.testing.assert_close(logits(pm2, ids), composed, atol=1e-6, rtol=0)
    again = RoadModel.from_pretrained(copy.deepcopy(llama_base), tmp_path / "out" / "seq")
    assert again.peft_config["default"].variant == cfg.variant
    assert torch.equal(logits(again, ids), composed)


def test_sequential_road_1_is_exact(llama_base, ids):
    """road_1 + road_1 stays road_1: per pair, angles add and scales multiply (correctly rounded)."""
    rm = build(llama_base, SEQUENTIAL["r1+r1-subspaces"])
    cfg = compose(rm, ["a", "b"], "ab")
    assert cfg.variant == "road_1"
    pa, pb, pab = full_params(rm, "a"), full_params(rm, "b"), full_params(rm, "ab")
    assert sorted(pab) == sorted(set(pa) | set(pb))
    for path, (theta, alpha) in pab.items():
        ta, aa = pa.get(path, (torch.zeros_like(theta), torch.ones_like(alpha)))
        tb, ab = pb.get(path, (torch.zeros_like(theta), torch.ones_like(alpha)))
        assert torch.equal(theta, ta + tb), path
        assert torch.equal(alpha, aa * ab), path
    torch.testing.assert_close(active_logits(rm, "ab", ids), active_logits(rm, ["a", "b"], ids), **TOL)


@pytest.mark.parametrize("case", ["r1+r2", "r2+r4"])
def test_sequential_respects_order(llama_base, ids, case):
    rm = build(llama_base, SEQUENTIAL[case])
    compose(rm, ["a", "b"], "ab")
    compose(rm, ["b", "a"], "ba")
    ab, ba = active_logits(rm, "ab", ids), active_logits(rm, "ba", ids)
    torch.testing.assert_close(ab, active_logits(rm, ["a", "b"], ids), **TOL)
    torch.testing.assert_close(ba, active_logits(rm, ["b", "a"], ids), **TOL)
    assert not torch.allclose(ab, ba, atol=1e-4)  # the blocks do not commute


def test_sequential_same_adapter_twice(llama_base, ids):
    rm = build(llama_base, SEQUENTIAL["r2+r4"])
    compose(rm, ["b", "b"], "bb")
    torch.testing.assert_close(active_logits(rm, "bb", ids), active_logits(rm, ["b", "b"], ids), **TOL)


def test_composed_adapter_in_mixed_batch(llama_base):
    rm = build(llama_base, SEQUENTIAL["three"])
    compose(rm, ["a", "b", "c"], "abc")
    rows = ["abc", "a", "__base__", "abc"]
    x = torch.randint(0, 96, (len(rows), 6), generator=torch.Generator().manual_seed(4))
    mixed = logits(rm, x, adapter_names=rows)
    for name, ref in (("abc", active_logits(rm, ["a", "b", "c"], x)), ("a", active_logits(rm, "a", x))):
        idx = [i for i, n in enumerate(rows) if n == name]
        torch.testing.assert_close(mixed[idx], ref[idx], **TOL)
    with rm.disable_adapter():
        torch.testing.assert_close(mixed[[2]], logits(rm, x)[[2]], atol=1e-6, rtol=0)


def test_compose_bf16_adapters(llama_base, ids):
    rm = build(copy.deepcopy(llama_base).to(torch.bfloat16), SEQUENTIAL["r1+r2"], autocast_adapter_dtype=False)
    cfg = compose(rm, ["a", "b"], "ab")
    assert cfg.variant == "road_2"
    assert {p.dtype for n, p in rm.named_parameters() if ".road_" in n} == {torch.bfloat16}
    composed, both = active_logits(rm, "ab", ids), active_logits(rm, ["a", "b"], ids)
    assert composed.dtype == torch.bfloat16
    torch.testing.assert_close(composed, both, atol=3e-2, rtol=3e-2)
    assert (composed - active_logits(rm, "a", ids)).abs().max() > 0.1


# ---- union -----------------------------------------------------------------------------------------


def owned_pairs(spec, n_pairs: int) -> set[int]:
    if spec is None:
        return set(range(n_pairs))
    if "shard" in spec:  # ROAD subspace docstring: floor(p * n / P) == k
        return {p for p in range(n_pairs) if p * spec["num_shards"] // n_pairs == spec["shard"]}
    if "pairs" in spec:
        return set(spec["pairs"])
    if "union" in spec:
        return set().union(*(owned_pairs(s, n_pairs) for s in spec["union"]))
    return set(pairs_of(spec, n_pairs).tolist())


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_union_of_shards_equals_both_active_exactly(llama_base, ids, tmp_path, variant):
    adapters = [("a", variant, 8, QV, "0/2"), ("b", variant, 8, ["v_proj", "up_proj"], "1/2")]
    rm = build(llama_base, adapters)
    cfg = compose(rm, ["a", "b"], "u", mode="union")
    assert_new_adapter_is_added_inactive(rm, "u", ["a"], cfg)
    assert cfg.variant == variant
    assert cfg.subspace == normalize_spec({"union": ["0/2", "1/2"]})
    assert paths_of(rm, "u") == sorted(set(paths_of(rm, "a")) | set(paths_of(rm, "b")))
    composed = active_logits(rm, "u", ids)
    # disjoint pairs commute, and an adapter is exactly the identity outside its subspace
    assert torch.equal(composed, active_logits(rm, ["a", "b"], ids))
    assert torch.equal(composed, active_logits(rm, ["b", "a"], ids))
    torch.testing.assert_close(
        logits(peft_active(llama_base, rm, ["a", "b"], tmp_path), ids), composed, atol=1e-6, rtol=0
    )
    # each pair's entries come from its owner
    pa, pb, pu = full_params(rm, "a"), full_params(rm, "b"), full_params(rm, "u")
    for path, (theta, alpha) in pu.items():
        n_pairs = rm.model.get_submodule(path).out_features // 2
        for name, params, spec in (("a", pa, "0/2"), ("b", pb, "1/2")):
            idx = entries_of(variant, 8, torch.tensor(sorted(owned_pairs(normalize_spec(spec), n_pairs))))
            ref_t, ref_a = params.get(path, (torch.zeros_like(theta), torch.ones_like(alpha)))
            assert torch.equal(theta[idx], ref_t[idx]) and torch.equal(alpha[idx], ref_a[idx]), (path, name)


def test_union_mixed_variants(llama_base, ids, tmp_path):
    adapters = [
        ("a", "road_1", 8, QV, "0/3"),
        ("b", "road_4", 8, ["v_proj", "o_proj"], "1/3"),
        ("c", "road_2", 8, ["q_proj", "o_proj"], {"pairs": [60, 61, 63]}),
    ]
    rm = build(llama_base, adapters)
    cfg = compose(rm, ["a", "b", "c"], "u", mode="union")
    assert cfg.variant == "road_2"
    assert cfg.subspace == normalize_spec({"union": ["0/3", "1/3", [60, 61, 63]]})
    composed = active_logits(rm, "u", ids)
    torch.testing.assert_close(composed, active_logits(rm, ["a", "b", "c"], ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(composed, active_logits(rm, ["c", "a", "b"], ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        logits(peft_active(llama_base, rm, ["a", "b", "c"], tmp_path / "p"), ids), composed, atol=1e-6, rtol=0
    )
    assert not torch.allclose(composed, active_logits(rm, ["a", "b"], ids), atol=1e-4)  # c matters
    # pairs nobody owns stay exactly the identity
    for path, (theta, alpha) in full_params(rm, "u").items():
        n_pairs = rm.model.get_submodule(path).out_features // 2
        free = owned_pairs(cfg.subspace, n_pairs)
        outside = torch.tensor(sorted(set(range(n_pairs)) - free))
        idx = entries_of("road_2", 8, outside)
        assert (theta[idx] == 0).all() and (alpha[idx] == 1).all(), path
    rm.save_pretrained(tmp_path / "u", selected_adapters=["u"])
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(llama_base), os.fspath(tmp_path / "u" / "u")).eval()
    torch.testing.assert_close(logits(pm, ids), composed, atol=1e-6, rtol=0)


def test_union_of_full_adapters_on_disjoint_layers(llama_base, ids):
    rm = build(llama_base, [("a", "road_2", 8, ["q_proj"]), ("b", "road_4", 8, ["v_proj"])])
    cfg = compose(rm, ["a", "b"], "u", mode="union")
    assert cfg.subspace is None and cfg.variant == "road_2"
    torch.testing.assert_close(active_logits(rm, "u", ids), active_logits(rm, ["a", "b"], ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "second, clash",
    [
        ({"pairs": [3, 5, 40]}, [3, 5]),  # shard 0/2 of 64 pairs is 0..31
        (None, list(range(32))),  # a full adapter overlaps every pair
    ],
)
def test_union_overlap_error_lists_layers_and_pairs(llama_base, second, clash):
    rm = build(llama_base, [("a", "road_2", 8, QV, "0/2"), ("b", "road_2", 8, ["v_proj", "up_proj"], second)])
    before = snapshot(rm)
    with pytest.raises(ValueError, match="union needs adapters in disjoint subspaces") as info:
        compose(rm, ["a", "b"], "u", mode="union")
    msg = str(info.value)
    lines = {line.split(":")[0].strip(): line for line in msg.splitlines()[1:]}
    assert sorted(lines) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]  # only shared
    shown = ", ".join(map(str, clash[:8]))
    for line in lines.values():
        assert "'a' and 'b'" in line
        assert f"share pairs {shown}" in line
        if len(clash) > 8:
            assert f"({len(clash)} pairs)" in line
        else:
            assert "40" not in line
    assert_unchanged(before, rm)
    assert "u" not in rm.peft_config


def test_union_overlap_with_itself(llama_base):
    rm = build(llama_base, [("a", "road_1", 8, QV, "1/2")])
    before = snapshot(rm)
    with pytest.raises(ValueError, match=r"'a' and 'a' share pairs 32, 33"):
        compose(rm, ["a", "a"], "u", mode="union")
    assert_unchanged(before, rm)


def test_union_then_training_keeps_unowned_pairs_identity(llama_base, tmp_path):
    rm = build(llama_base, [("a", "road_2", 8, QV, "0/3"), ("b", "road_2", 8, QV, "1/3")])
    cfg = compose(rm, ["a", "b"], "u", mode="union")
    rm.save_pretrained(tmp_path, selected_adapters=["u"])
    tm = RoadModel.from_pretrained(copy.deepcopy(llama_base), tmp_path / "u", adapter_name="u", is_trainable=True)
    assert tm.peft_config["u"].subspace == cfg.subspace
    shard2 = torch.tensor(sorted(owned_pairs(normalize_spec("2/3"), 64)))
    owned = torch.tensor(sorted(owned_pairs(cfg.subspace, 64)))
    assert len(owned) + len(shard2) == 64
    assert tm.get_nb_trainable_parameters()[0] == 4 * 2 * len(owned) * 2  # 4 layers, theta+alpha, 2 per pair
    before = full_params(tm, "u")
    tm.eval()
    losses = train_steps(
        tm, torch.randint(0, 96, (4, 10), generator=torch.Generator().manual_seed(0)), 5, weight_decay=0.1
    )
    assert losses[-1] < losses[0]
    idx_out, idx_in = entries_of("road_2", 8, shard2), entries_of("road_2", 8, owned)
    feats_out = features_of(shard2, 8)
    for path, (theta, alpha) in full_params(tm, "u").items():
        assert (theta[idx_out] == 0).all() and (alpha[idx_out] == 1).all(), path
        assert ((theta[idx_in] != before[path][0][idx_in]) | (alpha[idx_in] != before[path][1][idx_in])).all()
        layer = tm.model.get_submodule(path)
        h = torch.randn(2, layer.in_features, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(layer(h)[:, feats_out], layer.base_layer(h)[:, feats_out])


# ---- interpolate ---------------------------------------------------------------------------------


def test_interpolate_endpoint_equals_first(llama_base, ids):
    rm = build(llama_base, [("a", "road_2", 8, QV, "0/2"), ("b", "road_4", 8, ["v_proj", "up_proj"])], positive=True)
    cfg = compose(rm, ["a", "b"], "i", mode="interpolate", weights=[1, 0])
    assert_new_adapter_is_added_inactive(rm, "i", ["a"], cfg)
    assert cfg.variant == "road_4" and cfg.subspace is None
    torch.testing.assert_close(active_logits(rm, "i", ids), active_logits(rm, "a", ids), **TOL)
    compose(rm, ["a", "b"], "j", mode="interpolate", weights=[0.0, 1.0])
    torch.testing.assert_close(active_logits(rm, "j", ids), active_logits(rm, "b", ids), **TOL)
    assert not torch.allclose(active_logits(rm, "i", ids), active_logits(rm, "j", ids), atol=1e-3)


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_interpolate_half_of_one_adapter(llama_base, ids, variant):
    rm = build(llama_base, [("a", variant, 8, QV, "1/2")], positive=True)
    cfg = compose(rm, ["a"], "halved", mode="interpolate", weights=[0.5])
    assert cfg.variant == variant
    for n_pairs in (64, 128):  # the same pairs as the input's subspace
        assert owned_pairs(cfg.subspace, n_pairs) == owned_pairs(normalize_spec("1/2"), n_pairs)
    pa, ph = full_params(rm, "a"), full_params(rm, "halved")
    assert sorted(pa) == sorted(ph)
    for path in pa:
        torch.testing.assert_close(ph[path][0], 0.5 * pa[path][0], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(ph[path][1], pa[path][1].sqrt(), atol=1e-7, rtol=1e-6)
    assert not torch.allclose(active_logits(rm, "halved", ids), active_logits(rm, "a", ids), atol=1e-3)
    if variant == "road_1":  # road_1 blocks are scaled rotations: the half one, twice, is the whole one
        torch.testing.assert_close(active_logits(rm, ["halved", "halved"], ids), active_logits(rm, "a", ids), **TOL)
        compose(rm, ["halved", "halved"], "twice")
        torch.testing.assert_close(active_logits(rm, "twice", ids), active_logits(rm, "a", ids), **TOL)


def test_interpolate_weighted_angles_and_log_scales(llama_base):
    rm = build(
        llama_base, [("a", "road_1", 8, QV, "0/2"), ("b", "road_2", 8, ["v_proj", "up_proj"], "0/2")], positive=True
    )
    w = [0.3, -0.45]
    cfg = compose(rm, ["a", "b"], "i", mode="interpolate", weights=w)
    assert cfg.variant == "road_2"
    assert cfg.subspace == normalize_spec("0/2")  # one spec shared by both inputs stays that spec
    pa, pb, pi = full_params(rm, "a"), full_params(rm, "b"), full_params(rm, "i")
    assert sorted(pi) == sorted(set(pa) | set(pb))
    for path, (theta, alpha) in pi.items():
        n = theta.numel()
        ta, aa = pa.get(path, (torch.zeros(n // 2), torch.ones(n // 2)))
        g = 8  # road_1 -> road_2 by the spec: entry j of group k serves features k*g + j and k*g + j + g/2
        t1 = ta.unflatten(0, (-1, 1, g // 2)).expand(-1, 2, -1).flatten()
        a1 = aa.unflatten(0, (-1, 1, g // 2)).expand(-1, 2, -1).flatten()
        tb, ab = pb.get(path, (torch.zeros(n), torch.ones(n)))
        ref_t = w[0] * t1.double() + w[1] * tb.double()
        ref_a = torch.exp(w[0] * a1.double().log() + w[1] * ab.double().log())
        torch.testing.assert_close(theta.double(), ref_t, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(alpha.double(), ref_a, atol=1e-6, rtol=1e-6)


def test_interpolate_default_weights_are_uniform(llama_base):
    rm = build(
        llama_base, [("a", "road_4", 8, QV), ("b", "road_4", 8, QV), ("c", "road_4", 8, ["q_proj"])], positive=True
    )
    compose(rm, ["a", "b", "c"], "default_w", mode="interpolate")
    compose(rm, ["a", "b", "c"], "explicit", mode="interpolate", weights=[1 / 3, 1 / 3, 1 / 3])
    d, e = full_params(rm, "default_w"), full_params(rm, "explicit")
    for path in d:
        assert torch.equal(d[path][0], e[path][0]) and torch.equal(d[path][1], e[path][1])


def test_interpolate_same_adapter_twice(llama_base, ids):
    """Weights of a repeated adapter add up: 0.25 a + 0.75 a is a."""
    rm = build(llama_base, [("a", "road_2", 8, QV)], positive=True)
    compose(rm, ["a", "a"], "aa", mode="interpolate", weights=[0.25, 0.75])
    pa, paa = full_params(rm, "a"), full_params(rm, "aa")
    for path in pa:
        torch.testing.assert_close(paa[path][0], pa[path][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(paa[path][1], pa[path][1], atol=1e-6, rtol=1e-6)


def test_interpolate_refuses_weights_that_overflow(llama_base):
    """1e300 is a finite weight, but the scales it gives (alpha ** 1e300) are not."""
    rm = build(llama_base, [("a", "road_2", 8, QV), ("b", "road_2", 8, QV)], positive=True)
    before = snapshot(rm)
    with pytest.raises(ValueError, match=r"interpolating with weights \[1e\+300, 1\.0\] overflows in model\."):
        compose(rm, ["a", "b"], "i", mode="interpolate", weights=[1e300, 1.0])
    assert_unchanged(before, rm)


def test_interpolate_zero_alpha_error(llama_base):
    rm = build(llama_base, [("a", "road_2", 8, QV), ("b", "road_1", 8, ["v_proj"])], positive=True)
    layer = rm.model.get_submodule("model.layers.1.self_attn.v_proj")
    with torch.no_grad():
        layer.road_alpha["b"][3] = 0.0
    before = snapshot(rm)
    with pytest.raises(
        ValueError,
        match=r"adapter 'b' has alpha = 0 in model\.layers\.1\.self_attn\.v_proj \(1 entries there\)",
    ):
        compose(rm, ["a", "b"], "i", mode="interpolate", weights=[0.5, 0.5])
    assert_unchanged(before, rm)
    assert "i" not in rm.peft_config


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_interpolate_negative_scales_are_magnitudes_turned_by_pi(llama_base, ids, variant):
    """An adapter with negative scales (road_4 training makes them) interpolates: with weight 1 it is itself, and
    0 * a + 1 * b is b, as coefficients (c, s) and as model outputs."""
    rm = build(llama_base, [("a", variant, 8, QV), ("b", variant, 8, QV)], positive=True)
    with torch.no_grad():
        for _, layer in rm.road_layers():
            for name in ("a", "b"):
                alpha = layer.road_alpha[name]
                alpha[::3] = -alpha[::3]
    compose(rm, ["a"], "a1", mode="interpolate", weights=[1.0])
    compose(rm, ["a", "b"], "only_b", mode="interpolate", weights=[0.0, 1.0])
    for composed, original in (("a1", "a"), ("only_b", "b")):
        want, got = full_params(rm, original), full_params(rm, composed)
        for path in want:
            c_want = F.coefficients(variant, 8, *(t.double() for t in want[path]))
            c_got = F.coefficients(variant, 8, *(t.double() for t in got[path]))
            for x, y in zip(c_got, c_want, strict=True):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
        rm.set_adapter(composed)
        out = logits(rm, ids)
        rm.set_adapter(original)
        torch.testing.assert_close(out, logits(rm, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "weights",
    [
        [1.0],
        [0.2, 0.3, 0.5],
        [],
        [float("nan"), 1.0],
        [math.inf, 0.0],
        [0.5, -math.inf],
        [True, 0.0],
        ["0.5", 0.5],
        [None, 1.0],
    ],
)
def test_interpolate_bad_weights(llama_base, weights):
    rm = build(llama_base, [("a", "road_2", 8, QV), ("b", "road_2", 8, QV)])
    before = snapshot(rm)
    with pytest.raises(
        ValueError, match=re.escape(f"interpolate needs one finite number per adapter (2), got weights={weights!r}")
    ):
        compose(rm, ["a", "b"], "i", mode="interpolate", weights=weights)
    assert_unchanged(before, rm)


@pytest.mark.parametrize("mode", ["sequential", "union"])
def test_weights_only_for_interpolate(llama_base, mode):
    rm = build(llama_base, [("a", "road_2", 8, QV, "0/2"), ("b", "road_2", 8, QV, "1/2")])
    before = snapshot(rm)
    with pytest.raises(ValueError, match=f"weights apply only to mode='interpolate', not mode='{mode}'"):
        compose(rm, ["a", "b"], "x", mode=mode, weights=[0.5, 0.5])
    assert_unchanged(before, rm)


# ---- other errors ------------------------------------------------------------------------------------


@pytest.fixture
def four(llama_base):
    rm = build(llama_base, [("a", "road_2", 8, QV), ("b", "road_1", 8, ["v_proj"]), ("g16", "road_1", 16, QV)])
    rm.add_adapter("saving", RoadConfig(variant="road_1", group_size=8, target_modules=QV, modules_to_save=["lm_head"]))
    return rm


@pytest.mark.parametrize(
    "args, kwargs, error, pattern",
    [
        (
            (["a", "zz", "yy"], "n"),
            {},
            ValueError,
            r"unknown adapter\(s\) \['yy', 'zz'\]; available: \['a', 'b', 'g16', 'saving'\]",
        ),
        ((["a", "b"], "b"), {}, ValueError, r"an adapter named 'b' already exists"),
        ((["a", "b"], "a"), {"mode": "union"}, ValueError, r"an adapter named 'a' already exists"),
        ((["a", "b"], "__base__"), {}, ValueError, r"'__base__' is reserved"),
        ((["a", "b"], "x.y"), {}, ValueError, r"non-empty string without '\.', got 'x\.y'"),
        ((["a", "b"], ""), {}, ValueError, r"non-empty string without '\.', got ''"),
        ((["a", "g16"], "n"), {}, ValueError, r"one group_size .*\{'a': 8, 'g16': 16\}"),
        ((["a", "saving"], "n"), {}, ValueError, r"adapters \['saving'\] train whole modules \(modules_to_save\)"),
        (
            (["a", "b"], "n"),
            {"mode": "concat"},
            ValueError,
            r"compose mode='concat' is not supported; allowed: sequential, union, interpolate",
        ),
        (([], "n"), {}, ValueError, r"at least one adapter"),
    ],
)
def test_compose_errors_leave_model_unchanged(four, args, kwargs, error, pattern):
    before = snapshot(four)
    with pytest.raises(error, match=pattern):
        compose(four, *args, **kwargs)
    assert_unchanged(before, four)


def test_compose_needs_a_road_model(llama_base):
    plain = copy.deepcopy(llama_base)
    with pytest.raises(TypeError, match="compose needs a roadkit RoadModel, got LlamaForCausalLM"):
        compose(plain, ["a"], "n")


def test_compose_single_name_string(llama_base, ids):
    rm = build(llama_base, [("a", "road_1", 8, QV)])
    compose(rm, "a", "same")
    assert torch.equal(active_logits(rm, "same", ids), active_logits(rm, "a", ids))


@pytest.mark.parametrize("name", ["copy", "half"])
def test_new_name_that_is_a_module_attribute(llama_base, ids, name):
    """Adapter names live in nn.ParameterDicts, where "copy" or "half" collide with methods. Either the
    name works, or it is refused with a ValueError before any change; the model must stay usable."""
    rm = build(llama_base, [("a", "road_1", 8, QV)])
    before = snapshot(rm)
    try:
        compose(rm, ["a"], name)
    except ValueError as err:
        assert repr(name) in str(err)
        assert_unchanged(before, rm)
        assert all(name not in layer.road_theta for _, layer in rm.road_layers())
    else:
        assert torch.equal(active_logits(rm, name, ids), active_logits(rm, "a", ids))
    rm.set_adapter("a")
    assert torch.equal(logits(rm, ids), active_logits(rm, "a", ids))
