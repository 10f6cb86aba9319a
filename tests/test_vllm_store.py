"""The adapter store behind on-demand serving: the model-name grammar, safe paths, compositions (no vLLM)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import tiny_llama

from roadkit import RoadConfig, get_peft_model
from roadkit.checkpoint import read_adapter
from roadkit.composition import SavedAdapter, compose_adapters
from roadkit.integrations.vllm import store as store_module
from roadkit.integrations.vllm.store import AdapterMissingError, AdapterStore, Expression, StoreError, parse


@pytest.mark.parametrize(
    ("name", "mode", "names", "weights", "canonical"),
    [
        ("a", None, ("a",), (), "a"),
        ("task_1.v2-final", None, ("task_1.v2-final",), (), "task_1.v2-final"),
        ("b+a", "union", ("b", "a"), (), "a+b"),
        ("c+a+b", "union", ("c", "a", "b"), (), "a+b+c"),
        ("b>a", "sequential", ("b", "a"), (), "b>a"),
        ("a>a", "sequential", ("a", "a"), (), "a>a"),
        ("0.7*b+0.3*a", "interpolate", ("b", "a"), (0.7, 0.3), "0.3*a+0.7*b"),
        ("1e-1*a+2*b", "interpolate", ("a", "b"), (0.1, 2.0), "0.1*a+2.0*b"),
    ],
)
def test_grammar(name: str, mode, names, weights, canonical: str) -> None:  # noqa: ANN001
    expression = parse(name)
    assert expression == Expression(mode, names, weights)
    assert expression.canonical == canonical
    assert parse(canonical).canonical == canonical


@pytest.mark.parametrize(
    "name",
    ["", "a+", "+a", "a++b", "a+>b", "a>b+c", "a*b", "0.3*a+b", "../a", "a+../b", ".hidden", "a/b", "a+a",
     "+".join("abcdefghi"), "0.5*a+0.5*a", "a b", "x" * 200, "inf*a+1*b"],
)  # fmt: skip
def test_grammar_refuses(name: str) -> None:
    with pytest.raises(StoreError, match="adapter|composes|twice|weights"):
        parse(name)


def save(model_seed: int, directory, **config) -> str:  # noqa: ANN003
    torch.manual_seed(model_seed)
    cfg = RoadConfig(variant="road_1", group_size=32, init_weights=False, target_modules=["q_proj", "v_proj"], **config)
    model = get_peft_model(tiny_llama(), cfg)
    with torch.no_grad():  # positive scales, so that interpolation (of log-scales) applies
        for name, p in model.named_parameters():
            if "road_alpha" in name:
                p.abs_().add_(0.1)
    model.save_pretrained(directory)
    return str(directory)


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    root = tmp_path / "store"
    save(1, root / "a", subspace="0/2")
    save(2, root / "b", subspace="1/2")
    save(3, root / "full")
    torch.manual_seed(4)
    other = RoadConfig(variant="road_1", group_size=64, init_weights=False, target_modules=["q_proj"])
    get_peft_model(tiny_llama(), other).save_pretrained(root / "g64")
    outside = tmp_path / "outside"
    save(5, outside)
    os.symlink(outside, root / "link")
    return AdapterStore(str(root))


def test_single_adapters_and_safe_paths(store: AdapterStore) -> None:
    assert store.resolve(parse("a")) == os.path.join(store.root, "a")
    with pytest.raises(AdapterMissingError, match="'zzz' is not in the adapter store"):
        store.resolve(parse("zzz"))
    with pytest.raises(StoreError, match="'link' is outside the adapter store"):
        store.resolve(parse("link"))
    with pytest.raises(AdapterMissingError, match="'zzz'"):
        store.resolve(parse("a+zzz"))


@pytest.mark.parametrize(("name", "mode", "order"), [("b+a", "union", "ab"), ("a>b", "sequential", "ab"),
                                                      ("0.25*full+0.75*a", "interpolate", None)])  # fmt: skip
def test_compositions_equal_compose_adapters(store: AdapterStore, name: str, mode: str, order) -> None:  # noqa: ANN001
    folder = store.resolve(parse(name))
    assert not folder.startswith(store.root)  # never written into the store
    config, tensors = read_adapter(folder)
    expression = parse(name)
    names = list(order) if order else list(expression.names)
    inputs = [SavedAdapter(n, *read_adapter(os.path.join(store.root, n))) for n in names]
    weights = list(expression.weights) if mode == "interpolate" else None
    want_config, want = compose_adapters(inputs, mode, weights)
    assert config.variant == want_config.variant and sorted(tensors) == sorted(want)
    for key in want:
        torch.testing.assert_close(tensors[key], want[key], rtol=0, atol=0)
    assert store.resolve(parse(expression.canonical)) == folder  # one folder per composition


def test_union_of_disjoint_subspaces_equals_sequential(store: AdapterStore) -> None:
    from roadkit import functional as F

    union = read_adapter(store.resolve(parse("a+b")))
    sequential = read_adapter(store.resolve(parse("a>b")))
    for key in union[1]:
        if key.endswith("road_theta"):
            alpha = key.replace("road_theta", "road_alpha")
            u = F.coefficients(union[0].variant, 32, union[1][key], union[1][alpha])
            s = F.coefficients(sequential[0].variant, 32, sequential[1][key], sequential[1][alpha])
            torch.testing.assert_close(u, s, rtol=1e-5, atol=1e-6)


def test_compositions_that_do_not_fit_are_refused(store: AdapterStore) -> None:
    with pytest.raises(StoreError, match="'a\\+full' cannot be composed: .*overlap"):
        store.resolve(parse("full+a"))
    with pytest.raises(StoreError, match="group_size"):
        store.resolve(parse("a>g64"))


def test_composed_folders_are_bounded(store: AdapterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "MAX_COMPOSED", 2)
    first = store.resolve(parse("a>b"))
    store.resolve(parse("b>a"))
    store.resolve(parse("a>full"))
    assert not os.path.exists(first)  # the least recently used one is gone
    assert os.path.isdir(store.resolve(parse("a>b")))  # and is built again on demand


def test_a_store_must_be_a_directory(tmp_path) -> None:
    with pytest.raises(NotADirectoryError, match="ROADKIT_ADAPTER_STORE"):
        AdapterStore(str(tmp_path / "nowhere"))


def test_grammar_says_weights_are_not_negative() -> None:
    with pytest.raises(StoreError, match="weights are numbers >= 0"):
        parse("-1*a+1*b")


def test_a_composition_is_built_again_when_a_part_changed(store: AdapterStore) -> None:
    """A name unloaded from the server comes back as the store is now: a part trained again since its last build
    gives a new composition (the old folder goes); unchanged parts reuse the folder."""
    first = store.resolve(parse("a+b"))
    assert store.resolve(parse("b+a")) == first
    save(6, os.path.join(store.root, "b"), subspace="1/2")  # b trained again: new files in its folder
    second = store.resolve(parse("a+b"))
    assert second != first and not os.path.exists(first)
    inputs = [SavedAdapter(n, *read_adapter(os.path.join(store.root, n))) for n in ("a", "b")]
    _, want = compose_adapters(inputs, "union")
    tensors = read_adapter(second)[1]
    for key in want:
        torch.testing.assert_close(tensors[key], want[key], rtol=0, atol=0)
    assert store.resolve(parse("a+b")) == second
