"""Adapter values that cannot be served (NaN, infinite, degenerate rotations) are refused on load."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file

from roadkit import RoadConfig, RoadModel, get_peft_model
from roadkit import functional as F

WEIGHTS = "adapter_model.safetensors"


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_value_problem_finds_bad_values_and_passes_good_ones(variant: str) -> None:
    n_out, group = 64, 16
    length = F.parameter_length(variant, n_out)
    torch.manual_seed(0)
    theta, alpha = torch.randn(length), 1 + 0.1 * torch.randn(length)
    assert F.value_problem(variant, group, theta, alpha) is None
    for value, words in ((math.nan, "NaN or infinite"), (math.inf, "NaN or infinite")):
        bad = theta.clone()
        bad[5] = value
        assert words in F.value_problem(variant, group, bad, alpha)
    zero = alpha.clone()
    zero[:] = 0.0
    assert "degenerate" in F.value_problem(variant, group, theta, zero)
    huge = alpha * 1e30  # finite, but c_a*c_b + s_a*s_b overflows float32 (a diverged run's scales)
    assert "degenerate" in F.value_problem(variant, group, theta, huge)


def test_value_problem_counts_blocks_against_a_dense_determinant() -> None:
    """One feature with a zero scale makes exactly its own 2x2 block singular, as the dense block's
    determinant shows; the other blocks are not counted."""
    group = 4
    theta = torch.tensor([0.0, 0.3, 0.7, 0.3])  # pairs (0, 2) and (1, 3)
    alpha = torch.tensor([1.0, 1.0, 0.0, 2.0])
    c, s = F.coefficients("road_2", group, theta, alpha)
    for a, b, singular in ((0, 2, True), (1, 3, False)):
        block = torch.tensor([[c[a], -s[a]], [s[b], c[b]]], dtype=torch.float64)
        assert (torch.linalg.det(block) == 0) == singular
    assert "1 of its 2 rotation blocks are degenerate" in F.value_problem("road_2", group, theta, alpha)


def saved_adapter(tmp_path, variant: str = "road_2"):
    model = get_peft_model(tiny_llama(), RoadConfig(variant=variant, group_size=32, init_weights=False))
    model.save_pretrained(tmp_path / "good")
    return tmp_path / "good"


def break_values(directory, kind: str) -> None:
    tensors = load_file(directory / WEIGHTS)
    key = sorted(k for k in tensors if k.endswith("road_alpha"))[0]
    if kind == "zero scale":
        tensors[key][:] = 0.0
    else:
        tensors[key.replace("road_alpha", "road_theta")][2] = math.nan
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})


@pytest.mark.parametrize("kind", ["nan", "zero scale"])
def test_loading_refuses_bad_values_and_changes_nothing(tmp_path, kind: str) -> None:
    directory = saved_adapter(tmp_path)
    break_values(directory, kind)
    ids = torch.randint(3, 90, (1, 8))
    base = tiny_llama()
    reference = base(input_ids=ids).logits
    with pytest.raises(ValueError, match="holds values that cannot be served .*check_values=False") as err:
        RoadModel.from_pretrained(base, directory)
    assert "model.layers.0" in str(err.value) and "\n" not in str(err.value)
    assert torch.equal(base(input_ids=ids).logits, reference)  # nothing was injected

    model = get_peft_model(tiny_llama(), RoadConfig(variant="road_2", group_size=32))
    with pytest.raises(ValueError, match="cannot be served"):
        model.load_adapter(directory, adapter_name="bad")
    assert list(model.peft_config) == ["default"]
    assert not any("bad" in name for name, _ in model.named_parameters())

    loaded = RoadModel.from_pretrained(tiny_llama(), directory, check_values=False)  # for forensics
    values = torch.cat([p.detach().flatten() for n, p in loaded.named_parameters() if "road_" in n])
    assert (torch.isnan(values).any() if kind == "nan" else (values == 0).any()).item()


def test_resuming_refuses_bad_values(tmp_path) -> None:
    directory = saved_adapter(tmp_path)
    model = RoadModel.from_pretrained(tiny_llama(), directory, is_trainable=True)
    state = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    key = sorted(state)[0]
    state[key][0] = math.inf
    with pytest.raises(ValueError, match="cannot be served"):
        model.load_adapter_values("default", state)
    assert all(torch.equal(v, before[k]) for k, v in model.adapter_state_dict().items())


def test_save_records_the_base_weights_and_peft_still_reads_the_file(tmp_path) -> None:
    """The first weights of each adapted linear layer go into the safetensors metadata, which PEFT ignores."""
    from safetensors import safe_open

    import roadkit.checkpoint as ckpt

    base = tiny_llama()
    config = RoadConfig(variant="road_1", group_size=32, init_weights=False, target_modules="all-linear")
    model = get_peft_model(base, config)
    model.save_pretrained(tmp_path / "a")
    recorded = ckpt.read_base_fingerprint(tmp_path / "a")
    paths = sorted(p for p, _ in model.road_layers())
    assert sorted(recorded) == paths[:4] and len(paths) > 4
    for path in paths[:4]:
        weight = model.model.get_submodule(path).get_base_layer().weight
        assert recorded[path] == weight[0, :8].tolist()
    with safe_open(str(tmp_path / "a" / WEIGHTS), framework="pt") as fh:
        assert fh.metadata()["format"] == "pt"

    peft = pytest.importorskip("peft")
    ids = torch.randint(3, 90, (1, 8))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    ours = RoadModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    torch.testing.assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_loading_on_another_base_warns(tmp_path, recwarn) -> None:
    model = get_peft_model(tiny_llama(seed=0), RoadConfig(variant="road_1", group_size=32, init_weights=False))
    model.save_pretrained(tmp_path / "a")
    RoadModel.from_pretrained(tiny_llama(seed=0), tmp_path / "a")
    assert not [w for w in recwarn if "another base model" in str(w.message)]
    with pytest.warns(UserWarning, match=r"was trained on another base model: the weights of modules \(4\)"):
        RoadModel.from_pretrained(tiny_llama(seed=1), tmp_path / "a")  # the same shapes, other weights
    with pytest.warns(UserWarning, match="another base model"):
        get_peft_model(tiny_llama(seed=1), RoadConfig(group_size=32)).load_adapter(tmp_path / "a", "b")


def test_a_merged_layer_records_no_base_weights(tmp_path) -> None:
    import roadkit.checkpoint as ckpt

    model = get_peft_model(tiny_llama(), RoadConfig(variant="road_1", group_size=32, init_weights=False))
    model.add_adapter("other", RoadConfig(variant="road_1", group_size=32, target_modules=["q_proj"]))
    model.merge_adapter(["other"])  # q_proj's weights are now R W
    model.save_pretrained(tmp_path / "m")
    recorded = ckpt.read_base_fingerprint(tmp_path / "m")
    assert recorded and not any(p.endswith("q_proj") for p in recorded)


def test_a_refused_safe_merge_changes_nothing(recwarn) -> None:
    """Adapter b has a NaN in one layer only: merging a and b safely raises, and every weight, every
    layer's merged list and the warnings are exactly as before (a used to stay merged there)."""
    model = get_peft_model(tiny_llama(), RoadConfig(variant="road_2", group_size=32, init_weights=False), "a")
    model.add_adapter("b", RoadConfig(variant="road_2", group_size=32, init_weights=False))
    paths = [p for p, _ in model.road_layers()]
    with torch.no_grad():
        model.model.get_submodule(paths[-1]).road_alpha["b"][0] = math.nan
    before = {k: v.clone() for k, v in model.model.state_dict().items() if "road_" not in k}  # the base's
    with pytest.raises(ValueError, match=rf"adapter 'b' would put NaN or inf .*{paths[-1]}.*nothing was changed"):
        model.merge_adapter(["a", "b"], safe_merge=True)
    after = model.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(not layer.merged_adapters for _, layer in model.road_layers())
    assert not [w for w in recwarn if "unmerge" in str(w.message)]


def test_a_routing_made_before_the_adapters_changed_serves_the_new_values() -> None:
    """A routing kept across an in-place update of the adapters (as a serving loop keeps one) gives what a
    fresh one gives, on every call (the per-row memo included), and is refused after a merge."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), RoadConfig(variant="road_2", group_size=32, init_weights=False), "a")
    model.add_adapter("b", RoadConfig(variant="road_2", group_size=32, init_weights=False))
    model.eval()
    ids = torch.randint(3, 90, (3, 6))
    names = ["a", "b", "__base__"]
    routing = model.route(names, batch_shape=tuple(ids.shape))
    with torch.no_grad():
        first = model(input_ids=ids, routing=routing).logits
        model(input_ids=ids, routing=routing)  # the second use keeps the gathered rows
        state = {k: v * 1.1 for k, v in model.adapter_state_dict("b").items()}
        model.load_adapter_values("b", state)
        for _ in range(2):
            kept = model(input_ids=ids, routing=routing).logits
            fresh = model(input_ids=ids, routing=model.route(names, batch_shape=tuple(ids.shape))).logits
            torch.testing.assert_close(kept, fresh, rtol=0, atol=0)
        assert not torch.equal(kept[1], first[1]) and torch.equal(kept[0], first[0])
        model.merge_adapter(["a"])
        with pytest.raises(ValueError, match=r"\['a'\] are merged into the weights"):
            model(input_ids=ids, routing=routing)
