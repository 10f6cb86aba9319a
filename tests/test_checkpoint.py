"""Adapter directories: PEFT interop both ways, on-disk layout, round trips, load errors, atomic writes."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat

import pytest
import torch
from conftest import tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import roadkit.checkpoint
from roadkit import ModulesToSaveWrapper, RoadConfig, RoadLayer, RoadModel, get_peft_model

peft = pytest.importorskip("peft")

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
# Length of road_theta / road_alpha per variant, from ROAD_SPEC.md (a function of out_features).
LENGTH = {"road_1": lambda d: d // 2, "road_2": lambda d: d, "road_4": lambda d: 2 * d}


def tiny_llama_cls(seed: int = 0, num_labels: int = 3):
    """A sequence-classification Llama (its head is `score`)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(cfg).eval()


# Two adapters per setup, with different variants, group sizes and targets, each with a head to save.
SETUPS = {
    "seq_cls": dict(
        builder=tiny_llama_cls,
        head="score",
        adapters={
            "default": dict(task_type="SEQ_CLS", variant="road_2", group_size=32, target_modules=["q_proj", "v_proj"]),
            "other": dict(task_type="SEQ_CLS", variant="road_4", group_size=64, target_modules=["o_proj", "down_proj"]),
        },
    ),
    "causal_lm": dict(
        builder=tiny_llama,
        head="lm_head",
        adapters={
            "default": dict(
                variant="road_1",
                group_size=64,
                target_modules=r".*\.(q_proj|k_proj|up_proj)",
                modules_to_save=["lm_head"],
            ),
            "other": dict(
                variant="road_2", group_size=16, target_modules=["v_proj", "gate_proj"], modules_to_save=["lm_head"]
            ),
        },
    ),
}


def logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    """fp32 logits: equal up to 1e-6 of their scale (a few ulps; PEFT and roadkit round differently)."""
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a, b, atol=1e-6 * scale, rtol=0)


def same_logits(reference, model, ids: torch.Tensor) -> None:
    """Identical semantics: close in fp32, and equal to 1e-9 when both run in float64 (no rounding noise)."""
    close(logits(model, ids), logits(reference, ids))
    reference.double()
    model.double()
    try:
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-9, rtol=1e-9)
    finally:
        reference.float()
        model.float()


def adapter_logits(model, ids: torch.Tensor, base_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of "default" and "other", checked to differ from the base and from each other."""
    out = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        out[name] = logits(model, ids)
    assert (out["default"] - base_logits).abs().max() > 1e-2
    assert (out["other"] - out["default"]).abs().max() > 1e-2
    return out


def perturb_(module: torch.nn.Module, seed: int) -> None:
    """Move a saved module's weights away from the base so a head copy is distinguishable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))


def build_roadkit(setup: str, seed: int = 1) -> RoadModel:
    spec = SETUPS[setup]
    base = spec["builder"]()
    torch.manual_seed(seed)
    rm = None
    for i, (name, kw) in enumerate(spec["adapters"].items()):
        cfg = RoadConfig(init_weights=False, **kw)
        if rm is None:
            rm = get_peft_model(base, cfg, adapter_name=name)
        else:
            rm.add_adapter(name, cfg)
        perturb_(getattr(rm.model, spec["head"]).modules_to_save[name], seed=100 + i)
    return rm.eval()


def build_peft(setup: str, seed: int = 1):
    spec = SETUPS[setup]
    base = spec["builder"]()
    torch.manual_seed(seed)
    pm = None
    for i, (name, kw) in enumerate(spec["adapters"].items()):
        cfg = peft.RoadConfig(init_weights=False, **kw)
        if pm is None:
            pm = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
        perturb_(getattr(pm.base_model.model, spec["head"]).modules_to_save[name], seed=100 + i)
    return pm.eval()


def files_bytes(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def temp_leftovers(root: str) -> list[str]:
    return [os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files if n.startswith(".tmp-")]


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a failed load must leave alone."""
    snap = {
        "modules": [(n, type(m)) for n, m in model.named_modules()],
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [(n, m.training) for n, m in model.named_modules()],
    }
    if isinstance(model, RoadModel):
        snap["peft_config"] = {k: v.to_dict() for k, v in model.peft_config.items()}
        snap["active"] = model.active_adapters
        snap["layers"] = [
            (p, lyr.active_adapters, list(lyr.merged_adapters), sorted(lyr.road_theta))
            for p, lyr in model.road_layers()
        ]
    return snap


def assert_unchanged(before: dict, model: torch.nn.Module) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
    for key in ("grad", "training", "peft_config", "active", "layers"):
        assert after.get(key) == before.get(key), key


# ---- interop ---------------------------------------------------------------------------------


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_peft_directory_loads_in_roadkit(setup, tmp_path, input_ids):
    pm = build_peft(setup)
    with pm.disable_adapter():
        base_logits = logits(pm, input_ids)
    expected = adapter_logits(pm, input_ids, base_logits)
    pm.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "other" / WEIGHTS)

    rm = RoadModel.from_pretrained(SETUPS[setup]["builder"](), tmp_path)
    rm.load_adapter(tmp_path / "other", "other")
    assert sorted(rm.peft_config) == ["default", "other"]
    assert rm.active_adapters == ["default"]
    close(logits(rm, input_ids), expected["default"])
    rm.set_adapter("other")
    close(logits(rm, input_ids), expected["other"])
    for name in ("default", "other"):
        pm.set_adapter(name)
        rm.set_adapter(name)
        same_logits(pm, rm, input_ids)
    with rm.disable_adapter():
        close(logits(rm, input_ids), base_logits)

    # Mixed batch over the loaded adapters matches PEFT's per-adapter outputs row by row.
    names = ["other", "__base__", "default", "other"]
    mixed = logits(rm, input_ids, adapter_names=names)
    ref = {"__base__": base_logits, **expected}
    for i, n in enumerate(names):
        close(mixed[i], ref[n][i])


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_roadkit_directory_loads_in_peft(setup, tmp_path, input_ids):
    rm = build_roadkit(setup)
    expected = adapter_logits(rm, input_ids, logits(SETUPS[setup]["builder"](), input_ids))
    rm.save_pretrained(tmp_path)

    pm = peft.PeftModel.from_pretrained(SETUPS[setup]["builder"](), tmp_path)
    pm.load_adapter(tmp_path / "other", "other")
    pm.eval()
    pm.set_adapter("default")
    close(logits(pm, input_ids), expected["default"])
    pm.set_adapter("other")
    close(logits(pm, input_ids), expected["other"])
    for name in ("default", "other"):
        pm.set_adapter(name)
        rm.set_adapter(name)
        same_logits(rm, pm, input_ids)
    # PEFT's own subfolder convention finds the same adapter.
    pm2 = peft.PeftModel.from_pretrained(SETUPS[setup]["builder"](), tmp_path, subfolder="other", adapter_name="other")
    close(logits(pm2.eval(), input_ids), expected["other"])


@pytest.mark.parametrize(
    "selection, adapted",
    [
        (dict(layers_to_transform=[1]), ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
        (
            dict(exclude_modules=["model.layers.0.self_attn.q_proj"]),
            ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"],
        ),
    ],
    ids=["layers_to_transform", "exclude_modules"],
)
def test_roadkit_directory_with_restricted_targets_loads_in_peft(selection, adapted, tmp_path, llama, input_ids):
    """An adapter trained in roadkit must run in PEFT with the same numbers, whatever selected its layers.

    PEFT's RoadConfig has no `layers_to_transform` / `exclude_modules` (it ignores those keys on
    load), so the saved `target_modules` alone must select exactly the adapted modules.
    """
    torch.manual_seed(3)
    cfg = RoadConfig(group_size=32, init_weights=False, target_modules=["q_proj", "v_proj"], **selection)
    rm = get_peft_model(llama, cfg).eval()
    assert sorted(p for p, _ in rm.road_layers()) == adapted
    expected = logits(rm, input_ids)
    rm.save_pretrained(tmp_path)

    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    peft_adapted = sorted(
        n.removeprefix("base_model.model.")
        for n, m in pm.named_modules()
        if isinstance(m, peft.tuners.road.layer.RoadLayer)
    )
    assert peft_adapted == adapted
    close(logits(pm, input_ids), expected)
    same_logits(rm, pm, input_ids)


def test_subfolder_argument(tmp_path, input_ids):
    rm = build_roadkit("causal_lm")
    rm.set_adapter("other")
    expected = logits(rm, input_ids)
    rm.save_pretrained(tmp_path)
    loaded = RoadModel.from_pretrained(tiny_llama(), tmp_path, subfolder="other", adapter_name="other")
    assert list(loaded.peft_config) == ["other"]
    close(logits(loaded, input_ids), expected)


# ---- layout ----------------------------------------------------------------------------------


def test_directory_layout(tmp_path):
    rm = build_roadkit("causal_lm")
    rm.model.config._name_or_path = "someone/tiny-llama"
    rm.add_adapter("third", RoadConfig(variant="road_4", group_size=32, target_modules=["o_proj"]))
    rm.save_pretrained(tmp_path)

    assert set(os.listdir(tmp_path)) - {"README.md"} == {CONFIG, WEIGHTS, "other", "third"}
    for sub in ("other", "third"):
        assert set(os.listdir(tmp_path / sub)) == {CONFIG, WEIGHTS}
    assert not temp_leftovers(str(tmp_path))

    for name, where in (("default", tmp_path), ("other", tmp_path / "other"), ("third", tmp_path / "third")):
        cfg = rm.peft_config[name]
        data = json.loads((where / CONFIG).read_text())
        required = {
            "peft_type",
            "variant",
            "group_size",
            "init_weights",
            "target_modules",
            "modules_to_save",
            "task_type",
            "base_model_name_or_path",
            "revision",
            "inference_mode",
            "auto_mapping",
            "peft_version",
        }
        assert required <= set(data)
        assert data["peft_type"] == "ROAD"
        assert data["variant"] == cfg.variant
        assert data["group_size"] == cfg.group_size
        assert data["target_modules"] == cfg.target_modules
        assert data["modules_to_save"] == cfg.modules_to_save
        assert data["init_weights"] == cfg.init_weights
        assert data["inference_mode"] is True
        assert data["base_model_name_or_path"] == "someone/tiny-llama"
        assert data["task_type"] is None

        with safe_open(str(where / WEIGHTS), "pt") as fh:
            metadata = fh.metadata()
            assert metadata["format"] == "pt" and set(metadata) <= {"format", "roadkit.base_fingerprint"}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        expected_keys = set()
        for path, layer in rm.road_layers():
            if name not in layer.road_theta:
                continue
            for pname in ("road_theta", "road_alpha"):
                key = f"base_model.model.{path}.{pname}"
                expected_keys.add(key)
                assert tensors[key].dtype == torch.float32
                assert tensors[key].shape == (LENGTH[cfg.variant](layer.out_features),)
                assert torch.equal(tensors[key], getattr(layer, pname)[name].detach())
        if cfg.modules_to_save:
            head = rm.model.lm_head.modules_to_save[name]
            expected_keys.add("base_model.model.lm_head.weight")
            assert torch.equal(tensors["base_model.model.lm_head.weight"], head.weight.detach())
            assert tensors["base_model.model.lm_head.weight"].dtype == torch.float32
        assert set(tensors) == expected_keys
        assert not any(f".{n}." in k or k.endswith(f".{n}") for k in tensors for n in rm.peft_config)
    # Each directory holds only its own adapter's layers.
    default_keys = set(load_file(str(tmp_path / WEIGHTS)))
    assert not any("o_proj" in k for k in default_keys)
    assert all("o_proj" in k for k in load_file(str(tmp_path / "third" / WEIGHTS)))


def test_regex_target_modules_saved_as_string(tmp_path):
    rm = build_roadkit("causal_lm")
    rm.save_pretrained(tmp_path, selected_adapters=["default"])
    data = json.loads((tmp_path / CONFIG).read_text())
    assert data["target_modules"] == SETUPS["causal_lm"]["adapters"]["default"]["target_modules"]


def test_selected_adapters(tmp_path):
    rm = build_roadkit("causal_lm")
    only_other = tmp_path / "only_other"
    rm.save_pretrained(only_other, selected_adapters=["other"])
    assert os.listdir(only_other) == ["other"]
    assert set(os.listdir(only_other / "other")) == {CONFIG, WEIGHTS}

    only_default = tmp_path / "only_default"
    rm.save_pretrained(only_default, selected_adapters=["default"])
    assert set(os.listdir(only_default)) - {"README.md"} == {CONFIG, WEIGHTS}

    bad = tmp_path / "bad"
    with pytest.raises(ValueError, match="nope"):
        rm.save_pretrained(bad, selected_adapters=["default", "nope"])
    assert not bad.exists() or not any(bad.iterdir())


# ---- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("is_trainable", [False, True])
def test_roundtrip(is_trainable, tmp_path, input_ids):
    rm = build_roadkit("seq_cls")
    expected = {}
    for name in ("default", "other"):
        rm.set_adapter(name)
        expected[name] = logits(rm, input_ids)
    rm.save_pretrained(tmp_path)

    base = tiny_llama_cls()
    base.train()  # from_pretrained decides the mode
    loaded = RoadModel.from_pretrained(base, tmp_path, is_trainable=is_trainable)
    if not is_trainable:
        assert not any(m.training for m in loaded.modules())
    loaded.load_adapter(tmp_path / "other", "other", is_trainable=is_trainable)
    assert loaded.active_adapters == ["default"]

    # Exact tensor round trip.
    orig = dict(rm.road_layers())
    for path, layer in loaded.road_layers():
        for name in layer.road_theta:
            assert torch.equal(layer.road_theta[name], orig[path].road_theta[name])
            assert torch.equal(layer.road_alpha[name], orig[path].road_alpha[name])
    for name in ("default", "other"):
        assert torch.equal(loaded.model.score.modules_to_save[name].weight, rm.model.score.modules_to_save[name].weight)

    for name in ("default", "other"):
        loaded.set_adapter(name)
        close(logits(loaded, input_ids), expected[name])
        trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
        if is_trainable:
            road = {n for n, _ in loaded.named_parameters() if f"road_theta.{name}" in n or f"road_alpha.{name}" in n}
            head = {n for n, _ in loaded.named_parameters() if f"modules_to_save.{name}." in n}
            assert road and head
            assert trainable == road | head
        else:
            assert trainable == set()


def test_load_adapter_not_trainable_leaves_every_module_in_eval_mode(tmp_path):
    """PEFT's load_adapter(is_trainable=False) ends in eval mode; layers injected by the load must not
    be the only modules left in training mode."""
    rm = build_roadkit("causal_lm")
    rm.save_pretrained(tmp_path)
    loaded = RoadModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any(m.training for m in loaded.modules())
    loaded.load_adapter(tmp_path / "other", "other")  # targets v_proj / gate_proj: new wrappers
    assert [n for n, m in loaded.named_modules() if m.training] == []


def test_is_trainable_false_adapter_can_be_trained_by_a_second_load(tmp_path):
    rm = build_roadkit("causal_lm")
    rm.save_pretrained(tmp_path)
    loaded = RoadModel.from_pretrained(tiny_llama(), tmp_path)  # frozen
    loaded.load_adapter(tmp_path / "other", "other", is_trainable=True)
    loaded.set_adapter("other")
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".other" in n for n in trainable)
    loaded.set_adapter("default")
    assert not any(p.requires_grad for p in loaded.parameters())


# ---- load errors -----------------------------------------------------------------------------

Q1 = "base_model.model.model.layers.1.self_attn.q_proj.road_theta"
K0 = "base_model.model.model.layers.0.self_attn.k_proj.road_theta"
HEAD = "base_model.model.lm_head.weight"


def _edit_config(d, **changes):
    data = json.loads((d / CONFIG).read_text())
    data.update(changes)
    (d / CONFIG).write_text(json.dumps(data))


def _edit_tensors(d, fn):
    tensors = load_file(str(d / WEIGHTS))
    fn(tensors)
    save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})


def _set(key, value):
    def fn(t):
        t[key] = value(t) if callable(value) else value

    return fn


# name -> (corrupt(dir) returning the path to load, exception type, message regexes)
BAD = {
    "missing_directory": (lambda d: d / "does-not-exist", FileNotFoundError, [r"does not exist"]),
    "no_config": (lambda d: (os.remove(d / CONFIG), d)[1], FileNotFoundError, [r"no adapter_config\.json"]),
    "no_weights": (lambda d: (os.remove(d / WEIGHTS), d)[1], FileNotFoundError, [r"adapter_model\.safetensors"]),
    "bad_json": (lambda d: ((d / CONFIG).write_text("{not json"), d)[1], ValueError, [r"not valid JSON"]),
    "lora": (lambda d: (_edit_config(d, peft_type="LORA"), d)[1], ValueError, [r"peft_type='LORA'", r"ROAD"]),
    "missing_key": (lambda d: (_edit_tensors(d, lambda t: t.pop(Q1)), d)[1], ValueError, [r"missing keys", Q1]),
    "extra_key": (lambda d: (_edit_tensors(d, _set(K0, torch.zeros(64))), d)[1], ValueError, [r"unexpected keys", K0]),
    "wrong_shape": (
        lambda d: (_edit_tensors(d, _set(Q1, torch.zeros(66))), d)[1],
        ValueError,
        [r"shape mismatch", Q1, r"66"],
    ),
    "wrong_head_shape": (
        lambda d: (_edit_tensors(d, _set(HEAD, torch.zeros(95, 128))), d)[1],
        ValueError,
        [r"shape mismatch", HEAD],
    ),
    "variant_mismatch": (lambda d: (_edit_config(d, variant="road_4"), d)[1], ValueError, [r"shape mismatch"]),
    "group_size": (
        lambda d: (_edit_config(d, group_size=48), d)[1],
        ValueError,
        [r"out_features=128", r"group_size=48", r"q_proj"],
    ),
}


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A valid roadkit adapter for tiny_llama: road_1, q_proj/v_proj, lm_head saved."""
    d = tmp_path_factory.mktemp("valid")
    torch.manual_seed(7)
    cfg = RoadConfig(
        group_size=64, init_weights=False, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
    )
    rm = get_peft_model(tiny_llama(), cfg)
    rm.save_pretrained(d)
    return d


def _prepare(case, saved_adapter, tmp_path):
    d = tmp_path / "adapter"
    shutil.copytree(saved_adapter, d)
    corrupt, exc, patterns = BAD[case]
    return corrupt(d), exc, patterns


def _raises(exc, patterns, fn):
    with pytest.raises(exc) as info:
        fn()
    for p in patterns:
        assert re.search(p, str(info.value)), f"{p!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("case", sorted(BAD))
def test_load_adapter_error_leaves_model_unchanged(case, saved_adapter, tmp_path, llama):
    path, exc, patterns = _prepare(case, saved_adapter, tmp_path)
    torch.manual_seed(0)
    rm = get_peft_model(
        llama, RoadConfig(group_size=32, init_weights=False, target_modules=["o_proj"], modules_to_save=["lm_head"])
    )
    before = snapshot(rm)
    _raises(exc, patterns, lambda: rm.load_adapter(path, "new"))
    assert_unchanged(before, rm)


@pytest.mark.parametrize("case", sorted(BAD))
def test_from_pretrained_error_leaves_plain_model_untouched(case, saved_adapter, tmp_path, llama):
    path, exc, patterns = _prepare(case, saved_adapter, tmp_path)
    llama.train()  # a failed load must not even switch the mode
    before = snapshot(llama)
    _raises(exc, patterns, lambda: RoadModel.from_pretrained(llama, path))
    assert_unchanged(before, llama)
    assert not any(isinstance(m, (RoadLayer, ModulesToSaveWrapper)) for m in llama.modules())


def test_load_under_existing_name_leaves_model_unchanged(saved_adapter, llama):
    rm = RoadModel.from_pretrained(llama, saved_adapter)
    before = snapshot(rm)
    with pytest.raises(ValueError, match="'default'.*already exists"):
        rm.load_adapter(saved_adapter, "default")
    assert_unchanged(before, rm)


def test_from_pretrained_reserved_name_leaves_plain_model_untouched(saved_adapter, llama):
    before = snapshot(llama)
    with pytest.raises(ValueError, match="__base__.*reserved"):
        RoadModel.from_pretrained(llama, saved_adapter, adapter_name="__base__")
    assert_unchanged(before, llama)


def test_unknown_config_keys_are_ignored(saved_adapter, tmp_path, llama, input_ids):
    d = tmp_path / "adapter"
    shutil.copytree(saved_adapter, d)
    _edit_config(d, some_future_option=123, layer_replication=None)
    loaded = RoadModel.from_pretrained(llama, d)
    reference = RoadModel.from_pretrained(tiny_llama(), saved_adapter)
    close(logits(loaded, input_ids), logits(reference, input_ids))


# ---- atomic writes ---------------------------------------------------------------------------


def test_save_over_existing_directory_replaces_files(tmp_path, input_ids):
    target = tmp_path / "out"
    fresh = tmp_path / "fresh"
    torch.manual_seed(0)
    big = get_peft_model(
        tiny_llama(), RoadConfig(variant="road_4", group_size=16, init_weights=False, target_modules="all-linear")
    )
    big.save_pretrained(target)
    small = build_roadkit("causal_lm")
    small.save_pretrained(target)
    small.save_pretrained(fresh)
    assert files_bytes(str(target)) == files_bytes(str(fresh))
    assert not temp_leftovers(str(target))

    loaded = RoadModel.from_pretrained(tiny_llama(), target)
    close(logits(loaded, input_ids), logits(small, input_ids))


def test_failed_write_keeps_previous_files(tmp_path, monkeypatch):
    rm = build_roadkit("causal_lm")
    rm.save_pretrained(tmp_path)
    before = files_bytes(str(tmp_path))
    with torch.no_grad():
        for _, layer in rm.road_layers():
            for p in layer.road_theta.values():
                p.add_(1.0)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated: disk full")

    monkeypatch.setattr(roadkit.checkpoint, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        rm.save_pretrained(tmp_path)
    assert files_bytes(str(tmp_path)) == before
    assert not temp_leftovers(str(tmp_path))


def test_failed_fsync_removes_temp_file_and_keeps_previous_files(tmp_path, monkeypatch):
    rm = build_roadkit("causal_lm")
    rm.save_pretrained(tmp_path)
    before = files_bytes(str(tmp_path))
    with torch.no_grad():
        rm.model.lm_head.modules_to_save["default"].weight.mul_(2)

    def boom(fd):
        raise OSError("simulated: I/O error")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="I/O error"):
        rm.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert files_bytes(str(tmp_path)) == before
    assert not temp_leftovers(str(tmp_path))


def test_failure_on_second_adapter_keeps_its_old_files(tmp_path, monkeypatch, input_ids):
    rm = build_roadkit("causal_lm")
    rm.save_pretrained(tmp_path)
    old_other = {k: v for k, v in files_bytes(str(tmp_path)).items() if k.startswith("other")}
    with torch.no_grad():
        for _, layer in rm.road_layers():
            for p in layer.road_alpha.values():
                p.mul_(1.5)
    real_save = roadkit.checkpoint.save
    calls = []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure on the second adapter")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(roadkit.checkpoint, "save", second_fails)
    with pytest.raises(RuntimeError, match="second adapter"):
        rm.save_pretrained(tmp_path)
    monkeypatch.undo()
    now = files_bytes(str(tmp_path))
    assert {k: v for k, v in now.items() if k.startswith("other")} == old_other
    assert not temp_leftovers(str(tmp_path))
    # The adapter written before the failure is complete and current.
    loaded = RoadModel.from_pretrained(tiny_llama(), tmp_path)
    rm.set_adapter("default")
    close(logits(loaded, input_ids), logits(rm, input_ids))


def test_saved_files_get_ordinary_permissions(tmp_path):
    """Atomic writes must not leave files readable only by their owner (mkstemp creates them 0600)."""
    rm = build_roadkit("causal_lm")
    rm.save_pretrained(tmp_path)
    reference = tmp_path / "reference.txt"
    reference.write_text("x")  # created like any ordinary file, honouring the umask
    want = stat.S_IMODE(os.stat(reference).st_mode)
    for rel in (CONFIG, WEIGHTS, os.path.join("other", CONFIG), os.path.join("other", WEIGHTS)):
        assert stat.S_IMODE(os.stat(tmp_path / rel).st_mode) == want, rel


def test_legacy_bin_weights_load(tmp_path, input_ids):
    """Older PEFT versions wrote adapter_model.bin (torch.save) instead of safetensors."""
    rm = build_roadkit("causal_lm")
    rm.set_adapter("default")
    expected = logits(rm, input_ids)
    rm.save_pretrained(tmp_path, selected_adapters=["default"])
    weights = load_file(tmp_path / WEIGHTS)
    os.remove(tmp_path / WEIGHTS)
    torch.save(weights, tmp_path / "adapter_model.bin")
    loaded = RoadModel.from_pretrained(SETUPS["causal_lm"]["builder"](), tmp_path)
    close(logits(loaded, input_ids), expected)
