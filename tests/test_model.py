"""RoadModel: adapter bookkeeping, trainability, disabling, unloading, targeting, dtypes and errors."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import types

import pytest
import torch
from conftest import tiny_llama, tiny_mlp, tiny_opt
from torch import nn

import roadkit
from roadkit import ModulesToSaveWrapper, RoadConfig, RoadLayer, RoadModel, get_peft_model
from roadkit.errors import InputError

QV = ["q_proj", "v_proj"]
# Trainable parameters per adapted layer, per variant (ROAD_SPEC.md): theta and alpha together.
TRAINABLE_PER_LAYER = {"road_1": lambda d: d, "road_2": lambda d: 2 * d, "road_4": lambda d: 4 * d}


def logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def differs(a, b, by=1e-3) -> bool:
    return (a - b).abs().max().item() > by


def road_params(rm: RoadModel, name: str) -> list[nn.Parameter]:
    out = []
    for _, layer in rm.road_layers():
        if name in layer.road_theta:
            out += [layer.road_theta[name], layer.road_alpha[name]]
    return out


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def well_conditioned_(rm: RoadModel, seed: int = 0) -> RoadModel:
    """Random but well-conditioned rotations (|alpha| near 1, small angles) for every adapter, so that
    merge / unmerge / undo-on-the-fly round trips are limited by fp32 rounding, not by the adapter's
    condition number (init_weights=False can draw alpha near 0: a nearly singular block)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rm.road_layers():
            for name in layer.road_theta:
                theta, alpha = layer.road_theta[name], layer.road_alpha[name]
                theta.copy_(0.4 * torch.randn(theta.shape, generator=g))
                alpha.copy_(1 + 0.4 * (torch.rand(alpha.shape, generator=g) - 0.5))
    return rm


def snapshot(model: nn.Module) -> dict:
    snap = {
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }
    if isinstance(model, RoadModel):
        snap["peft_config"] = {k: v.to_dict() for k, v in model.peft_config.items()}
        snap["active"] = model.active_adapters
        snap["layers"] = [
            (p, lyr.active_adapters, list(lyr.merged_adapters), lyr.routing) for p, lyr in model.road_layers()
        ]
    return snap


def assert_unchanged(before: dict, model: nn.Module) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
    for key in ("grad", "peft_config", "active", "layers"):
        assert after.get(key) == before.get(key), key


def no_road(model: nn.Module) -> bool:
    return not any(isinstance(m, (RoadLayer, ModulesToSaveWrapper)) for m in model.modules())


@pytest.fixture
def two(llama):
    """tiny Llama with two random adapters: "default" (road_2 on q/v) and "b" (road_4 on o_proj/v_proj)."""
    torch.manual_seed(1)
    rm = get_peft_model(llama, RoadConfig(variant="road_2", group_size=32, init_weights=False, target_modules=QV))
    rm.add_adapter(
        "b", RoadConfig(variant="road_4", group_size=64, init_weights=False, target_modules=["o_proj", "v_proj"])
    )
    return rm.eval()


# ---- parameter counts ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_trainable_parameter_counts(variant, llama, capsys):
    n_base = sum(p.numel() for p in llama.parameters())
    rm = get_peft_model(llama, RoadConfig(variant=variant, group_size=32, target_modules=QV))
    outs = [lyr.get_base_layer().out_features for _, lyr in rm.road_layers()]
    assert len(outs) == 2 * llama.config.num_hidden_layers
    want = sum(TRAINABLE_PER_LAYER[variant](d) for d in outs)

    trainable, total = rm.get_nb_trainable_parameters()
    assert trainable == want
    assert total == n_base + want
    assert trainable == sum(p.numel() for p in rm.parameters() if p.requires_grad)

    rm.print_trainable_parameters()
    text = capsys.readouterr().out
    m = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", text)
    assert m, text
    assert int(m.group(1).replace(",", "")) == trainable
    assert int(m.group(2).replace(",", "")) == total
    assert float(m.group(3)) == pytest.approx(100 * trainable / total, abs=1e-4)

    # Falls through to the transformers model, which now holds the adapters.
    assert rm.num_parameters(only_trainable=True) == trainable
    assert rm.num_parameters() == total


def test_base_parameters_frozen_only_active_adapter_trainable(two):
    assert trainable_names(two) == {n for n, _ in two.named_parameters() if ".default" in n}
    assert all(p.requires_grad for p in road_params(two, "default"))
    assert not any(p.requires_grad for p in road_params(two, "b"))
    base = [p for n, p in two.named_parameters() if "road_" not in n]
    assert base and not any(p.requires_grad for p in base)


# ---- identity, switching, deleting -----------------------------------------------------------


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_identity_at_init(variant, llama, input_ids):
    expected = logits(llama, input_ids)
    rm = get_peft_model(llama, RoadConfig(variant=variant, group_size=16, target_modules="all-linear"))
    assert len(list(rm.road_layers())) > 0
    close(logits(rm, input_ids), expected, atol=1e-6)


def test_add_set_delete_adapters(two, llama_base, input_ids):
    base = logits(llama_base, input_ids)
    assert two.active_adapters == ["default"]
    assert two.active_adapter == "default"
    assert list(two.peft_config) == ["default", "b"]
    out_default = logits(two, input_ids)
    assert differs(out_default, base)

    # A new adapter is not active and not trainable until set_adapter.
    assert not any(p.requires_grad for p in road_params(two, "b"))
    two.set_adapter("b")
    assert two.active_adapters == ["b"]
    assert all(p.requires_grad for p in road_params(two, "b"))
    assert not any(p.requires_grad for p in road_params(two, "default"))
    out_b = logits(two, input_ids)
    assert differs(out_b, base) and differs(out_b, out_default)
    for path, layer in two.road_layers():
        assert layer.active_adapters == ["b"], path

    two.set_adapter(["default", "b"])
    assert two.active_adapters == ["default", "b"]
    assert two.active_adapter == ["default", "b"]
    assert all(p.requires_grad for p in road_params(two, "default") + road_params(two, "b"))
    out_both = logits(two, input_ids)
    assert differs(out_both, out_default) and differs(out_both, out_b)

    two.delete_adapter("b")
    assert list(two.peft_config) == ["default"]
    assert two.active_adapters == ["default"]
    assert all("b" not in layer.road_theta for _, layer in two.road_layers())
    assert not any(n.endswith(".b") or ".b." in n for n, _ in two.named_parameters())
    close(logits(two, input_ids), out_default, atol=1e-6)


def test_delete_active_adapter_activates_a_remaining_one(two, input_ids):
    two.set_adapter("b")
    out_b = logits(two, input_ids)
    two.set_adapter("default")
    out_default = logits(two, input_ids)
    two.delete_adapter("default")
    assert list(two.peft_config) == ["b"]
    assert two.active_adapters == ["b"]
    assert all(p.requires_grad for p in road_params(two, "b"))
    close(logits(two, input_ids), out_b, atol=1e-6)
    assert differs(out_b, out_default)


def test_deleting_the_only_active_adapter_says_which_one_is_active_now(two):
    two.set_adapter("b")
    with pytest.warns(UserWarning, match="adapter 'b' was active and is deleted; 'default' is active now"):
        two.delete_adapter("b")
    assert two.active_adapters == ["default"]


def test_deleting_an_inactive_adapter_or_the_last_one_warns_nothing(two, recwarn):
    two.set_adapter(["default", "b"])
    two.delete_adapter("b")  # an active one, but another stays active
    assert two.active_adapters == ["default"]
    two.delete_adapter("default")  # the last: none is left to activate, the model runs as its base
    assert two.active_adapters == [] and not two.peft_config
    assert not [w for w in recwarn if "deleted" in str(w.message)]


def test_delete_adapter_with_modules_to_save(llama, input_ids):
    cfg = RoadConfig(group_size=32, init_weights=False, target_modules=QV, modules_to_save=["lm_head"])
    torch.manual_seed(0)
    rm = get_peft_model(llama, cfg).eval()
    rm.add_adapter("b", cfg)
    with torch.no_grad():
        rm.model.lm_head.modules_to_save["b"].weight.mul_(2)
    rm.set_adapter("b")
    out_b = logits(rm, input_ids)
    rm.delete_adapter("default")
    assert list(rm.model.lm_head.modules_to_save) == ["b"]
    assert rm.active_adapters == ["b"]
    close(logits(rm, input_ids), out_b, atol=1e-6)


def test_modules_to_save_wrapper_delete_adapter():
    wrapper = ModulesToSaveWrapper(nn.Linear(4, 4), "a")
    wrapper.add_adapter("b")
    wrapper.set_adapter("b")
    wrapper.delete_adapter("b")
    assert list(wrapper.modules_to_save) == ["a"]
    assert wrapper.active_module() is wrapper.original_module
    wrapper.delete_adapter("not-there")  # deleting an absent copy is a no-op, like for RoAd layers
    assert list(wrapper.modules_to_save) == ["a"]


def test_add_adapter_on_new_targets_stays_inactive(llama, input_ids):
    """The new adapter wraps layers the first one did not touch; they must still run only the active one."""
    torch.manual_seed(0)
    rm = get_peft_model(llama, RoadConfig(group_size=32, init_weights=False, target_modules=["q_proj"]))
    rm.eval()
    before = logits(rm, input_ids)
    rm.add_adapter("mlp", RoadConfig(group_size=32, init_weights=False, target_modules=["down_proj"]))
    assert rm.active_adapters == ["default"]
    close(logits(rm, input_ids), before, atol=1e-6)
    assert not any(p.requires_grad for p in road_params(rm, "mlp"))
    for path, layer in rm.road_layers():
        if path.endswith("down_proj"):
            assert layer.active_adapters == ["default"]


# ---- disable_adapter -------------------------------------------------------------------------


def test_disable_adapter(two, llama_base, input_ids):
    base = logits(llama_base, input_ids)
    two.set_adapter(["default", "b"])
    adapted = logits(two, input_ids)
    assert differs(adapted, base)
    weights = {k: v.clone() for k, v in two.state_dict().items()}
    with two.disable_adapter():
        close(logits(two, input_ids), base, atol=1e-6)
        for k, v in two.state_dict().items():
            assert torch.equal(v, weights[k]), k
    close(logits(two, input_ids), adapted, atol=1e-6)
    assert two.active_adapters == ["default", "b"]


def test_disable_adapter_with_merged_adapter(two, llama_base, input_ids):
    well_conditioned_(two)
    base = logits(llama_base, input_ids)
    two.set_adapter(["default", "b"])
    adapted = logits(two, input_ids)
    two.merge_adapter()
    assert all(lyr.merged for _, lyr in two.road_layers())
    close(logits(two, input_ids), adapted)
    merged_weights = {k: v.clone() for k, v in two.state_dict().items()}
    merged_q = two.model.model.layers[0].self_attn.q_proj.get_base_layer().weight
    assert differs(merged_q, llama_base.model.layers[0].self_attn.q_proj.weight)
    with two.disable_adapter():
        close(logits(two, input_ids), base)
        for k, v in two.state_dict().items():
            assert torch.equal(v, merged_weights[k]), k
    for k, v in two.state_dict().items():
        assert torch.equal(v, merged_weights[k]), k
    assert all(lyr.merged for _, lyr in two.road_layers())
    close(logits(two, input_ids), adapted)


def test_disable_adapter_restores_flags_after_exception(two, llama_base, input_ids):
    adapted = logits(two, input_ids)
    with pytest.raises(RuntimeError, match="inside"):
        with two.disable_adapter():
            raise RuntimeError("inside")
    close(logits(two, input_ids), adapted, atol=1e-6)


# ---- modules_to_save -------------------------------------------------------------------------


def test_modules_to_save_switch_with_adapter(llama, input_ids):
    original = llama.lm_head.weight.detach().clone()
    base = logits(llama, input_ids)
    cfg = RoadConfig(group_size=32, target_modules=QV, modules_to_save=["lm_head"])  # identity rotations
    rm = get_peft_model(llama, cfg)
    rm.add_adapter("b", cfg)
    wrapper = rm.model.lm_head
    assert isinstance(wrapper, ModulesToSaveWrapper)
    assert set(wrapper.modules_to_save) == {"default", "b"}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in ("default", "b"):
            wrapper.modules_to_save[name].weight.add_(0.1 * torch.randn(original.shape, generator=g))

    assert not wrapper.original_module.weight.requires_grad
    assert wrapper.modules_to_save["default"].weight.requires_grad
    assert not wrapper.modules_to_save["b"].weight.requires_grad
    out_default = logits(rm, input_ids)
    rm.set_adapter("b")
    assert wrapper.modules_to_save["b"].weight.requires_grad
    assert not wrapper.modules_to_save["default"].weight.requires_grad
    assert not wrapper.original_module.weight.requires_grad
    out_b = logits(rm, input_ids)
    assert differs(out_default, base) and differs(out_b, base) and differs(out_b, out_default)
    with rm.disable_adapter():
        close(logits(rm, input_ids), base, atol=1e-6)

    # Training touches only the active copy.
    rm.train()
    loss = rm(input_ids=input_ids).logits.square().mean()
    loss.backward()
    assert wrapper.original_module.weight.grad is None
    assert wrapper.modules_to_save["default"].weight.grad is None
    assert wrapper.modules_to_save["b"].weight.grad is not None
    assert torch.equal(wrapper.original_module.weight, original)

    # Mixed batch: each row uses its adapter's head.
    rm.eval()
    names = ["b", "default", "__base__", "b"]
    mixed = logits(rm, input_ids, adapter_names=names)
    ref = {"default": out_default, "b": out_b, "__base__": base}
    for i, n in enumerate(names):
        close(mixed[i], ref[n][i], atol=1e-6)


# ---- unload / merge_and_unload ---------------------------------------------------------------


def test_unload_returns_original_model(two, llama_base, input_ids):
    well_conditioned_(two)
    two.set_adapter(["default", "b"])
    two.merge_adapter()  # unload must undo merges too
    plain = two.unload()
    assert no_road(plain)
    assert type(plain) is type(llama_base)
    ref = llama_base.state_dict()
    state = plain.state_dict()
    assert state.keys() == ref.keys()
    for k, v in ref.items():
        torch.testing.assert_close(state[k], v, atol=1e-6, rtol=1e-6)
    close(logits(plain, input_ids), logits(llama_base, input_ids))


def test_unload_without_merge_is_exact(two, llama_base):
    plain = two.unload()
    assert no_road(plain)
    for k, v in llama_base.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k


@pytest.mark.parametrize("with_head", [False, True])
def test_merge_and_unload(with_head, llama, llama_base, input_ids):
    torch.manual_seed(2)
    cfg = RoadConfig(
        variant="road_4",
        group_size=32,
        init_weights=False,
        target_modules="all-linear",
        modules_to_save=["lm_head"] if with_head else None,
    )
    rm = well_conditioned_(get_peft_model(llama, cfg).eval())
    if with_head:
        with torch.no_grad():
            rm.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    adapted = logits(rm, input_ids)
    assert differs(adapted, logits(llama_base, input_ids))
    plain = rm.merge_and_unload()
    assert no_road(plain)
    assert type(plain) is type(llama_base)
    assert plain.state_dict().keys() == llama_base.state_dict().keys()
    close(logits(plain, input_ids), adapted)


# ---- config errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["road_3", 3, "road_8", "rotary", ""])
def test_invalid_variant(variant):
    with pytest.raises(ValueError) as info:
        RoadConfig(variant=variant)
    msg = str(info.value)
    assert repr(variant) in msg
    for allowed in ("road_1", "road_2", "road_4"):
        assert allowed in msg


@pytest.mark.parametrize("group_size", [3, 0, -2, -64, 2.0, 64.5, "64", None, True])
def test_invalid_group_size(group_size):
    with pytest.raises(ValueError) as info:
        RoadConfig(group_size=group_size)
    msg = str(info.value)
    assert "group_size" in msg
    assert repr(group_size) in msg
    assert "even" in msg and "positive" in msg


@pytest.mark.parametrize("variant, canonical", [("road_1", "road_1"), (2, "road_2"), ("4", "road_4")])
def test_variant_aliases(variant, canonical):
    assert RoadConfig(variant=variant).variant == canonical


# ---- adapter name errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda rm: rm.set_adapter("nope"),
        lambda rm: rm.set_adapter(["default", "nope"]),
        lambda rm: rm.delete_adapter("nope"),
    ],
    ids=["set_one", "set_list", "delete"],
)
def test_unknown_adapter(call, two):
    two.set_adapter("b")
    before = snapshot(two)
    with pytest.raises(InputError, match=r"unknown adapter.*'nope'.*available.*'b'.*'default'"):
        call(two)
    assert_unchanged(before, two)


def test_duplicate_adapter_name(two):
    before = snapshot(two)
    with pytest.raises(InputError, match="'b'.*already exists"):
        two.add_adapter("b", RoadConfig(group_size=32, init_weights=False, target_modules=["k_proj"]))
    assert_unchanged(before, two)


def test_reserved_adapter_name(two, llama):
    before = snapshot(two)
    with pytest.raises(ValueError, match="__base__.*reserved"):
        two.add_adapter("__base__", RoadConfig(group_size=32, target_modules=["k_proj"]))
    assert_unchanged(before, two)

    plain = tiny_llama()
    before = snapshot(plain)
    with pytest.raises(ValueError, match="__base__.*reserved"):
        get_peft_model(plain, RoadConfig(group_size=32, target_modules=QV), adapter_name="__base__")
    assert_unchanged(before, plain)
    assert no_road(plain)


# ---- targeting errors (model untouched) ------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, patterns",
    [
        (
            dict(target_modules=["does_not_exist"]),
            [r"matched no adaptable module", r"does_not_exist", r"model\.layers\.0\.self_attn\.q_proj"],
        ),
        (dict(target_modules=r".*\.nothing"), [r"matched no adaptable module", r"q_proj"]),
        (dict(target_modules=QV, layers_to_transform=[7]), [r"matched no adaptable module"]),
        (dict(target_modules=["input_layernorm"]), [r"input_layernorm", r"LlamaRMSNorm", r"cannot wrap", r"Linear"]),
        (dict(target_modules=["rotary_emb"]), [r"rotary_emb", r"LlamaRotaryEmbedding", r"cannot wrap"]),
        (
            dict(target_modules=["up_proj", "down_proj"], group_size=256),
            [r"model\.layers\.0\.mlp\.down_proj", r"out_features=128", r"group_size=256"],
        ),
        (dict(target_modules=QV, group_size=48), [r"q_proj", r"out_features=128", r"group_size=48"]),
    ],
    ids=["no_match_list", "no_match_regex", "no_such_layer", "layernorm", "rotary", "divisible_late", "divisible"],
)
def test_targeting_errors_leave_model_untouched(cfg, patterns, llama):
    llama.train()
    before = snapshot(llama)
    with pytest.raises(ValueError) as info:
        get_peft_model(llama, RoadConfig(init_weights=False, **{"group_size": 32, **cfg}))
    for p in patterns:
        assert re.search(p, str(info.value)), (p, str(info.value))
    assert_unchanged(before, llama)
    assert no_road(llama)
    assert all(p.requires_grad for p in llama.parameters())


@pytest.mark.parametrize(
    "cfg, pattern",
    [
        (dict(target_modules=["does_not_exist"]), r"matched no adaptable module"),
        (dict(target_modules=["post_attention_layernorm"]), r"cannot wrap"),
        (dict(target_modules=["up_proj", "down_proj"], group_size=256), r"down_proj.*out_features=128.*group_size=256"),
        (dict(target_modules=["o_proj"], modules_to_save=["lm_head"], group_size=48), r"group_size=48"),
    ],
)
def test_add_adapter_errors_leave_model_unchanged(cfg, pattern, two):
    before = snapshot(two)
    with pytest.raises(ValueError, match=pattern):
        two.add_adapter("new", RoadConfig(init_weights=False, **{"group_size": 32, **cfg}))
    assert_unchanged(before, two)
    assert "new" not in two.peft_config


def test_no_default_targets_for_plain_module():
    mlp = tiny_mlp()
    before = snapshot(mlp)
    with pytest.raises(ValueError, match=r"model_type=None.*target_modules"):
        get_peft_model(mlp, RoadConfig(group_size=16))
    assert_unchanged(before, mlp)
    assert no_road(mlp)


def test_no_default_targets_for_unknown_model_type():
    mlp = tiny_mlp()
    mlp.config = types.SimpleNamespace(model_type="my_new_arch")
    with pytest.raises(ValueError, match=r"'my_new_arch'.*target_modules"):
        get_peft_model(mlp, RoadConfig(group_size=16))
    assert no_road(mlp)


def test_plain_module_with_explicit_targets():
    mlp = tiny_mlp()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = mlp(x)
    rm = get_peft_model(mlp, RoadConfig(group_size=16, init_weights=False, target_modules=["lin1", "lin2"]))
    assert sorted(p for p, _ in rm.road_layers()) == ["lin1", "lin2"]
    with torch.no_grad():
        assert differs(rm(x), base)


# ---- default targets and selection -----------------------------------------------------------


@pytest.mark.parametrize("builder", [tiny_llama, tiny_opt], ids=["llama", "opt"])
def test_default_target_modules(builder):
    model = builder()
    want = sorted(n for n, _ in model.named_modules() if n.endswith(("q_proj", "v_proj")))
    assert len(want) == 2 * model.config.num_hidden_layers
    rm = get_peft_model(model, RoadConfig(group_size=32))
    assert sorted(p for p, _ in rm.road_layers()) == want


def _paths(rm):
    return sorted(p for p, _ in rm.road_layers())


def test_layers_to_transform(llama):
    cfg = RoadConfig(group_size=32, target_modules=QV, layers_to_transform=[1])
    rm = get_peft_model(copy.deepcopy(llama), cfg)
    assert _paths(rm) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    cfg = RoadConfig(group_size=32, target_modules=QV, layers_to_transform=0, layers_pattern="layers")
    rm = get_peft_model(copy.deepcopy(llama), cfg)
    assert _paths(rm) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_exclude_modules(llama):
    rm = get_peft_model(
        copy.deepcopy(llama),
        RoadConfig(group_size=32, target_modules=QV, exclude_modules=["model.layers.0.self_attn.q_proj"]),
    )
    assert _paths(rm) == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    rm = get_peft_model(
        copy.deepcopy(llama), RoadConfig(group_size=32, target_modules=QV, exclude_modules=r".*\.1\..*")
    )
    assert _paths(rm) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]


def test_all_linear_skips_output_head_and_respects_exclude(llama):
    linear = sorted(n for n, m in llama.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    rm = get_peft_model(copy.deepcopy(llama), RoadConfig(group_size=32, target_modules="all-linear"))
    assert _paths(rm) == linear
    rm = get_peft_model(
        copy.deepcopy(llama),
        RoadConfig(group_size=32, target_modules="all-linear", exclude_modules=["v_proj", "mlp.up_proj"]),
    )
    assert _paths(rm) == [n for n in linear if not n.endswith(("v_proj", "up_proj"))]


# ---- mixed batch errors ----------------------------------------------------------------------


@pytest.fixture
def counted(two):
    """`two` with a pre-hook counting calls into the wrapped model's first submodule."""
    calls = []
    first = next(two.model.children())
    first.register_forward_pre_hook(lambda *a: calls.append(1))
    return two, calls


@pytest.mark.parametrize(
    "names, setup, error, pattern",
    [
        (["default", "x", "b", "y"], None, ValueError, r"unknown adapter.*'x'.*'y'.*available"),
        (["default", "b", "__base__"], None, ValueError, r"3 entries.*4 rows"),
        (["default"] * 5, None, ValueError, r"5 entries.*4 rows"),
        (["default", "b", "default", "b"], "merge", ValueError, r"merged.*unmerge"),
        (["default", "b", "default", "b"], "train", ValueError, r"eval"),
        ("default", None, TypeError, r"adapter_names must be a list"),
    ],
    ids=["unknown", "too_short", "too_long", "merged", "training", "not_a_list"],
)
def test_mixed_batch_errors_before_compute(names, setup, error, pattern, counted, input_ids):
    rm, calls = counted
    if setup == "merge":
        rm.merge_adapter()
    elif setup == "train":
        rm.train()
    before = snapshot(rm)
    with pytest.raises(error, match=pattern):
        rm(input_ids=input_ids, adapter_names=names)
    assert calls == []
    assert_unchanged(before, rm)
    assert all(lyr.routing is None for _, lyr in rm.road_layers())


def test_mixed_batch_reaches_layers_wrapped_after_an_earlier_mixed_call(llama_base, input_ids):
    """The model remembers its adapter modules between calls; wrapping more must be seen."""
    rm = get_peft_model(copy.deepcopy(llama_base), RoadConfig(target_modules=["q_proj"], init_weights=False))
    logits(rm, input_ids, adapter_names=["default"] * len(input_ids))
    rm.add_adapter("b", RoadConfig(target_modules=["v_proj"], init_weights=False))
    outs = {"__base__": logits(llama_base, input_ids)}
    for name in ("default", "b"):
        rm.set_adapter(name)
        outs[name] = logits(rm, input_ids)
    assert differs(outs["b"], outs["__base__"])
    names = ["b", "default", "__base__", "b"]
    mixed = logits(rm, input_ids, adapter_names=names)
    for i, n in enumerate(names):
        close(mixed[i], outs[n][i], atol=1e-6)


def test_mixed_batches_keep_the_adapter_module_list_across_forwards(llama_base, input_ids):
    """transformers slices its ModuleList of decoder layers on every forward, registering each layer
    into a new list; that must not make every mixed-batch call walk the whole model again."""
    rm = get_peft_model(copy.deepcopy(llama_base), RoadConfig(target_modules=["q_proj"], init_weights=False))
    names = ["default", "__base__"] * (len(input_ids) // 2) + ["default"] * (len(input_ids) % 2)
    for _ in range(2):  # the first forward registers the deep-copied layers for the first time
        logits(rm, input_ids, adapter_names=names)
    listed = rm.__dict__["_adapter_modules_memo"]
    logits(rm, input_ids, adapter_names=names)
    logits(rm, input_ids)
    assert rm.__dict__["_adapter_modules_memo"] is listed


def test_mixed_generate_gathers_coefficients_in_its_first_two_forwards_only(two, input_ids):
    """The decode steps of one mixed-batch `generate` reuse the per-row coefficients the routing
    kept (torch path): packed-table gathers happen in the prefill and the first decode step, none
    after, and the tokens are those of a generate that gathers on every step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from roadkit.kernels import torch_ops

    class Count(TorchDispatchMode):  # packed (n, 3, d) tables gathered, per forward of the base model
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.index_select.default and args[0].dim() == 3 and args[0].shape[1] == 3:
                per_forward[-1] += 1
            return func(*args, **(kwargs or {}))

    per_forward: list[int] = []
    hook = two.get_base_model().register_forward_pre_hook(lambda *_: per_forward.append(0))
    names = ["b", "__base__", "default", "b"]
    kwargs = dict(attention_mask=torch.ones_like(input_ids), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad(), Count():
        tokens = two.generate(input_ids, adapter_names=names, **kwargs)
    hook.remove()
    layers = sum(len(lyr._group_sizes(("b", "default"))) for _, lyr in two.road_layers())
    assert per_forward == [layers, layers, 0, 0, 0]
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_ops, "SCRATCH_BYTES", 0)
        assert torch.equal(two.generate(input_ids, adapter_names=names, **kwargs), tokens)


def test_mixed_batch_positive_control(counted, llama_base, input_ids):
    rm, calls = counted
    outs = {"__base__": logits(llama_base, input_ids)}
    for name in ("default", "b"):
        rm.set_adapter(name)
        outs[name] = logits(rm, input_ids)
    calls.clear()
    names = ["b", "__base__", "default", "b"]
    mixed = logits(rm, input_ids, adapter_names=names)
    assert len(calls) == 1
    for i, n in enumerate(names):
        close(mixed[i], outs[n][i], atol=1e-6)
    assert all(lyr.routing is None for _, lyr in rm.road_layers())


# ---- half precision bases --------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_base(dtype, atol, llama, input_ids):
    half = llama.to(dtype)
    ref_base = copy.deepcopy(half).float()  # the same (dtype-rounded) weights, in fp32
    torch.manual_seed(4)
    cfg = RoadConfig(variant="road_2", group_size=32, init_weights=False, target_modules=QV + ["down_proj"])
    rm = well_conditioned_(get_peft_model(half, cfg).eval())
    for p in road_params(rm, "default"):
        assert p.dtype == torch.float32
    for n, p in rm.named_parameters():
        if "road_" not in n:
            assert p.dtype == dtype, n
    out = logits(rm, input_ids)
    assert out.dtype == dtype

    # Reference: the same adapter on the fp32 copy of the base.
    base_out = logits(ref_base, input_ids)
    ref = get_peft_model(ref_base, cfg).eval()
    with torch.no_grad():
        for (path, layer), (rpath, rlayer) in zip(rm.road_layers(), ref.road_layers(), strict=True):
            assert path == rpath
            rlayer.road_theta["default"].copy_(layer.road_theta["default"])
            rlayer.road_alpha["default"].copy_(layer.road_alpha["default"])
    expected = logits(ref, input_ids)
    assert differs(expected, base_out, by=5 * atol)  # the adapter matters at this tolerance
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=0)

    # Mixed batches on the half-precision base, float32 adapters (PEFT 0.21.2's RoAd raises here).
    with rm.disable_adapter():
        half_base = logits(rm, input_ids)
    names = ["default", "__base__", "default", "__base__"]
    mixed = logits(rm, input_ids, adapter_names=names)
    assert mixed.dtype == dtype
    for i, n in enumerate(names):
        torch.testing.assert_close(mixed[i], (out if n == "default" else half_base)[i], atol=0, rtol=0)

    # Merging keeps the base dtype and the result.
    rm.merge_adapter()
    for n, p in rm.named_parameters():
        if "road_" not in n:
            assert p.dtype == dtype, n
    merged = logits(rm, input_ids)
    assert merged.dtype == dtype
    torch.testing.assert_close(merged.float(), expected, atol=atol, rtol=0)


# ---- per-token routing -----------------------------------------------------------------------


def test_per_token_indices_equal_per_row_names(two, input_ids):
    names = ["default", "__base__", "b", "default"]
    per_row = logits(two, input_ids, adapter_names=names)
    vocab = ["default", "b", "__base__"]
    rows = torch.tensor([vocab.index(n) for n in names])
    per_token = rows[:, None].expand(input_ids.shape)
    close(logits(two, input_ids, adapter_names=vocab, adapter_indices=per_token), per_row, atol=1e-6)
    close(logits(two, input_ids, adapter_names=vocab, adapter_indices=per_token.flatten()), per_row, atol=1e-6)
    close(logits(two, input_ids, adapter_names=vocab, adapter_indices=rows), per_row, atol=1e-6)


def test_per_token_indices_switch_adapter_inside_a_row(two, input_ids):
    """A token's adapter changes that token's (causal) future only: earlier positions are unaffected."""
    T = input_ids.shape[1]
    idx = torch.zeros(input_ids.shape, dtype=torch.long)
    idx[:, T // 2 :] = 1
    out = logits(two, input_ids, adapter_names=["default", "b"], adapter_indices=idx)
    two.set_adapter("default")
    only_default = logits(two, input_ids)
    close(out[:, : T // 2], only_default[:, : T // 2], atol=1e-6)
    assert differs(out[:, T // 2 :], only_default[:, T // 2 :])


@pytest.mark.parametrize(
    "indices, error, pattern",
    [
        (torch.tensor([0, 1, 2, 0]), ValueError, r"adapter_indices must lie in \[0, 2\)"),
        (torch.tensor([0.0, 1.0, 0.0, 1.0]), TypeError, "integer tensor"),
        (torch.zeros(3, dtype=torch.long), ValueError, r"shape \(3,\).*\[batch\], \[batch, seq\] or flat \[tokens\]"),
    ],
)
def test_per_token_index_errors(two, input_ids, indices, error, pattern):
    with pytest.raises(error, match=pattern):
        logits(two, input_ids, adapter_names=["default", "b"], adapter_indices=indices)


def test_adapter_indices_need_names(two, input_ids):
    with pytest.raises(ValueError, match="adapter_indices needs adapter_names"):
        logits(two, input_ids, adapter_indices=torch.zeros(4, dtype=torch.long))


# ---- tensor parallelism ------------------------------------------------------------------------


def test_check_tensor_parallel_lists_layers_that_do_not_split(llama):
    from roadkit import check_tensor_parallel

    rm = get_peft_model(llama, RoadConfig(group_size=64, target_modules=["q_proj", "gate_proj"]))
    assert check_tensor_parallel(rm, 1) == [] and check_tensor_parallel(rm, 2) == []
    issues = check_tensor_parallel(rm, 4)  # q_proj: 128 / 4 = 32 features per rank, not a multiple of 64
    assert sorted(i.module.rsplit(".", 1)[-1] for i in issues) == ["q_proj"] * llama.config.num_hidden_layers
    assert "out_features=128 / tp_size=4 is not a multiple of group_size=64" in str(issues[0])
    assert {i.module.rsplit(".", 1)[-1] for i in check_tensor_parallel(rm, 3)} == {"q_proj", "gate_proj"}
    with pytest.raises(ValueError, match="tp_size must be a positive integer, got 0"):
        check_tensor_parallel(rm, 0)


def test_importing_roadkit_leaves_torch_global_hooks_alone():
    """No process-wide hooks: every global hook registry of torch.nn and torch.optim is as it was."""
    code = """
import torch, torch.nn.modules.module as M, torch.optim.optimizer as O
def registries():
    return {(mod.__name__, n): len(getattr(mod, n)) for mod in (M, O) for n in dir(mod)
            if n.startswith("_global_") and hasattr(getattr(mod, n), "__len__")}
before = registries()
import roadkit, roadkit.model, roadkit.layers, roadkit.integrations.trainer, roadkit.app.training
after = registries()
assert before == after, (before, after)
print(len(before))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) >= 4  # the registries were found


def test_a_routing_made_once_serves_every_call_of_a_serving_loop(two, input_ids):
    """`route` checks once and builds the tables; reusing the routing gives what adapter_names gives,
    with no per-call table work, and leaves no routing behind on the layers."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names = ["b", "__base__", "default", "b"]
    with torch.no_grad():
        want = logits(two, input_ids, adapter_names=names)
        routing = two.route(names, batch_shape=tuple(input_ids.shape))
        assert isinstance(routing, roadkit.Routing) and routing.names == ("b", "__base__", "default")

        class Count(TorchDispatchMode):  # coefficient tables stacked per call
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                stacks[0] += func is torch.ops.aten.stack.default
                return func(*args, **(kwargs or {}))

        stacks = [0]
        with Count():
            for _ in range(3):
                close(two(input_ids, routing=routing).logits, want, atol=1e-6)
        assert stacks[0] == 0
    assert all(lyr.routing is None for _, lyr in two.road_layers())


def test_routing_misuse_is_a_clear_error(two, input_ids):
    routing = two.route(["b", "default", "b", "default"])
    with pytest.raises(ValueError, match="either routing="):
        two(input_ids, routing=routing, adapter_names=["b"] * len(input_ids))
    with pytest.raises(TypeError, match="made by model.route"):
        two(input_ids, routing=["b"])
    two.train()
    with pytest.raises(ValueError, match="for inference"):
        two(input_ids, routing=routing)
    with pytest.raises(ValueError, match="for inference"):
        two.route(["b"])
