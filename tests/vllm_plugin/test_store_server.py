"""Adapters on demand: the API server started with ROADKIT_ADAPTER_STORE serves `model=` names from the
store and compositions of them (`a+b`, `a>b`, `0.5*a+0.5*c`) that nobody registered, equal to roadkit
composing the same adapters in-process."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from server_helpers import CHAT_TEMPLATE, Server, check_roadkit, complete, error_message, healthy, running_server, same
from transformers import AutoModelForCausalLM
from vllm_helpers import LLAMA_TARGETS, Family, prompts, with_bad_values

from roadkit import RoadConfig, RoadModel, compose, get_peft_model
from roadkit.integrations.vllm.store import MAX_ALIASES, MAX_COMPOSED


def save_store_adapter(family: Family, directory: Path, seed: int, **config) -> Path:  # noqa: ANN003
    """A road_1 adapter with positive scales (interpolation works on log-scales) on every projection."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(family.model_dir, dtype=torch.float32)
    cfg = RoadConfig(variant="road_1", group_size=32, init_weights=False, target_modules=LLAMA_TARGETS, **config)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "road_alpha" in name:
                p.abs_().add_(0.2)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def store_server(families: dict[str, Family], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    family = families["llama"]
    root = tmp_path_factory.mktemp("store")
    save_store_adapter(family, root / "a", seed=41, subspace="0/2")
    save_store_adapter(family, root / "b", seed=42, subspace="1/2")
    save_store_adapter(family, root / "c", seed=43)
    with_bad_values(root / "c", root / "nan", "nan")
    outside = tmp_path_factory.mktemp("outside")
    save_store_adapter(family, outside / "x", seed=44)
    os.symlink(outside / "x", root / "link")
    template = tmp_path_factory.mktemp("chat") / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    log = tmp_path_factory.mktemp("store_server") / "server.log"
    with running_server(family, [], template, log, env={"ROADKIT_ADAPTER_STORE": str(root)}) as srv:
        srv.store = root  # type: ignore[attr-defined]
        yield srv


@pytest.fixture(scope="module")
def reference(store_server: Server) -> RoadModel:
    """roadkit in-process with the store's adapters and the compositions the tests request."""
    store = store_server.store  # type: ignore[attr-defined]
    model = RoadModel.from_pretrained(store_server.family.base(), store / "a", adapter_name="a")
    for name in ("b", "c"):
        model.load_adapter(store / name, adapter_name=name)
    compose(model, ["a", "b"], "union_ab", mode="union")
    compose(model, ["a", "b"], "sequence_ab", mode="sequential")
    compose(model, ["a", "c"], "halfway_ac", mode="interpolate", weights=[0.5, 0.5])
    return model.eval()


IN_PROCESS = {"a+b": "union_ab", "b+a": "union_ab", "a>b": "sequence_ab", "0.5*a+0.5*c": "halfway_ac",
              "0.5*c+0.5*a": "halfway_ac"}  # fmt: skip


@pytest.mark.parametrize("name", ["a", "c", "a+b", "b+a", "a>b", "0.5*a+0.5*c", "0.5*c+0.5*a"])
def test_store_names_and_compositions_equal_roadkit(store_server: Server, reference: RoadModel, name: str) -> None:
    for p in prompts(3, seed=51):
        res = complete(store_server, name, p)
        check_roadkit(reference, IN_PROCESS.get(name, name), p, list(res.token_ids), res.logprobs)


def test_union_of_disjoint_adapters_equals_their_sequence_and_shares_a_slot(store_server: Server) -> None:
    p = prompts(3, seed=52)
    union = [complete(store_server, "a+b", q) for q in p]
    assert [complete(store_server, "b+a", q) for q in p] == union
    assert [complete(store_server, "a>b", q).token_ids for q in p] == [u.token_ids for u in union]
    assert any(u.token_ids != complete(store_server, "a", q).token_ids for u, q in zip(union, p, strict=True))
    cards = {m.id: m.root for m in store_server.client.models.list().data}
    assert cards["a+b"] == cards["b+a"]  # one composed adapter, served under both names
    assert not str(cards["a+b"]).startswith(str(store_server.store))  # type: ignore[attr-defined]


REFUSED = {
    "a+": (400, "is not a valid adapter composition; use an adapter name in the store"),
    "zzz": (404, "The model `zzz` does not exist"),
    "a+zzz": (400, "'a+zzz': adapter 'zzz' is not in the adapter store"),
    "a+c": (400, "cannot be composed"),
    "link": (400, "'link' is outside the adapter store"),
    "nan": (400, "parameters are NaN or infinite"),
    "0.5*a+0.5*nan": (400, "NaN"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_bad_names_are_refused_and_serving_continues(store_server: Server, name: str) -> None:
    p = prompts(1, seed=53)[0]
    before = complete(store_server, "a", p)
    response = httpx.post(
        f"{store_server.url}/v1/completions", json={"model": name, "prompt": p, "max_tokens": 4}, timeout=60
    )
    status, needle = REFUSED[name]
    assert response.status_code == status, (response.status_code, response.text)
    assert needle in error_message(response), error_message(response)
    assert healthy(store_server)
    assert same(complete(store_server, "a", p), before)


def test_load_mixing_plain_composed_and_base(store_server: Server) -> None:
    """8 clients x 20 requests over plain, composed and base names: each equals the same request alone."""
    models = ["a", "b", "a+b", "b+a", "0.5*a+0.5*c", "a>b", "base"]
    ps = prompts(4, seed=54)
    work = [[(models[(t + k) % len(models)], (t + k) % len(ps)) for k in range(20)] for t in range(8)]
    alone = {job: complete(store_server, job[0], ps[job[1]], max_tokens=5) for job in {j for w in work for j in w}}
    with ThreadPoolExecutor(8) as pool:
        results = [
            r for rs in pool.map(lambda jobs: [(j, complete(store_server, j[0], ps[j[1]], 5)) for j in jobs], work)
            for r in rs
        ]  # fmt: skip
    assert len(results) == 160
    mismatched = [job for job, res in results if not same(res, alone[job])]
    assert not mismatched, mismatched[:5]
    assert healthy(store_server)


def test_other_spellings_of_a_composition_are_bounded(store_server: Server) -> None:
    """Each spelling of one composition is an alias of it; at most MAX_ALIASES are kept, the oldest dropped, and a
    dropped spelling is served again when it comes back."""
    p = prompts(1, seed=56)[0]
    spellings = [f"{'0' * k}1*a+1*c" for k in range(1, MAX_ALIASES + 3)]  # 01*a+1*c, 001*a+1*c, ...
    want = complete(store_server, "1*a+1*c", p, max_tokens=2)
    for name in spellings:
        assert same(complete(store_server, name, p, max_tokens=2), want), name
    root = {m.id: str(m.root) for m in store_server.client.models.list().data}["1.0*a+1.0*c"]
    aliases = [m.id for m in store_server.client.models.list().data if str(m.root) == root and m.id != "1.0*a+1.0*c"]
    assert len(aliases) <= MAX_ALIASES and spellings[0] not in aliases
    assert same(complete(store_server, spellings[0], p, max_tokens=2), want)
    assert healthy(store_server)


def test_the_least_recently_requested_composition_is_unloaded_first(store_server: Server) -> None:
    """At most MAX_COMPOSED compositions stay loaded. One requested between every new one stays; the oldest
    of the new ones, never requested again, goes. (Last in this file: it unloads the others' compositions.)"""
    p = prompts(1, seed=55)[0]
    busy = "b>a>b"
    first = complete(store_server, busy, p, max_tokens=2)

    def loaded() -> dict[str, str]:  # model name -> the folder it is served from
        return {m.id: str(m.root) for m in store_server.client.models.list().data}

    folder = loaded()[busy]
    names = [">".join(parts) for parts in itertools.product("abc", repeat=4)][:MAX_COMPOSED]
    for name in names:
        complete(store_server, name, p, max_tokens=1)
        assert same(complete(store_server, busy, p, max_tokens=2), first)
    now = loaded()
    assert now.get(busy) == folder  # never unloaded (and built again) in between
    assert names[-1] in now and names[0] not in now
    assert healthy(store_server)
