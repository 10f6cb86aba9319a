"""vLLM's offline engine serving RoAd adapters, against roadkit and PEFT on the same prompts.

Each engine runs in a subprocess (`engine_run.py`); the references run here, in float32. Float32
engines: greedy tokens must be identical and generated tokens' log-probabilities agree within 1e-4.
bfloat16 engines (what people serve in): see `test_mixed_batch_in_bfloat16`.
"""

from __future__ import annotations

import peft
import pytest
import torch
from vllm_helpers import (
    Family,
    llama_config,
    prompts,
    reference_logprobs,
    request,
    roadkit_model,
    run_engine,
    save_model,
    save_peft_lora,
    save_road,
    with_bad_values,
)

from roadkit import RoadConfig, RoadModel, get_peft_model

ATOL = 1e-4
# bfloat16 engine vs float32 reference: a generated token's log-probability within BF16_ATOL, and the
# greedy token equal wherever the reference's best token leads the second by more than BF16_MARGIN (where
# the bfloat16 base model alone is stable). The bfloat16 base rows of the same batch differ from float32
# transformers by up to 0.003 on these models, the adapters' rows by up to 0.005.
BF16_ATOL = 0.02
BF16_MARGIN = 0.05
ROTATION = ["r1", "r2", None, "r4", "peft_road"]  # adapters cycled over the requests; None: the base


def mixed_requests(family: Family, n: int) -> tuple[list[dict], list[str | None]]:
    ids = {name: i + 1 for i, name in enumerate(family.adapters)}
    names = [ROTATION[i % len(ROTATION)] for i in range(n)]
    reqs = [
        request(p, (name, ids[name], family.adapters[name]) if name else None)
        for p, name in zip(prompts(n), names, strict=True)
    ]
    return reqs, names


def check_against_roadkit(family: Family, reqs: list[dict], names: list, results: list[dict]) -> None:
    model = roadkit_model(family, [n for n in family.adapters])
    for req, name, res in zip(reqs, names, results, strict=True):
        assert res["error"] is None, res["error"]
        picked, logprobs = reference_logprobs(
            model, req["prompt_token_ids"], res["token_ids"], adapter_names=[name or "__base__"]
        )
        assert res["token_ids"] == picked, f"{family.name}/{name}: greedy tokens differ from roadkit"
        assert max(abs(a - b) for a, b in zip(res["logprobs"], logprobs, strict=True)) < ATOL, f"{family.name}/{name}"


@pytest.mark.parametrize("family_name", ["llama", "opt"])
def test_mixed_batch_equals_roadkit_and_peft(families: dict[str, Family], family_name: str, tmp_path) -> None:
    """road_1/2/4 adapters of three group sizes, one saved by PEFT, and base rows in one batch."""
    family = families[family_name]
    reqs, names = mixed_requests(family, 10)
    results = run_engine(tmp_path, family.model_dir, reqs)
    check_against_roadkit(family, reqs, names, results)
    for name in {n for n in names if n}:  # PEFT, one adapter at a time
        model = peft.PeftModel.from_pretrained(family.base(), family.adapters[name]).eval()
        for req, n, res in zip(reqs, names, results, strict=True):
            if n == name:
                picked, logprobs = reference_logprobs(model, req["prompt_token_ids"], res["token_ids"])
                assert res["token_ids"] == picked, f"{family_name}/{name}: greedy tokens differ from PEFT"
                assert max(abs(a - b) for a, b in zip(res["logprobs"], logprobs, strict=True)) < ATOL


def test_evictions_keep_outputs(families: dict[str, Family], tmp_path) -> None:
    """max_loras=2 slots for 4 adapters: adapters are evicted and reloaded mid-run, outputs unchanged."""
    family = families["llama"]
    reqs, names = mixed_requests(family, 10)
    results = run_engine(
        tmp_path,
        family.model_dir,
        reqs,
        engine={"max_loras": 2, "max_cpu_loras": 2},
        batches=[[i] for i in range(10)] + [list(range(10))],
    )
    check_against_roadkit(family, reqs, names, results)


def test_lora_and_road_in_one_engine(families: dict[str, Family], tmp_path) -> None:
    """A LoRA adapter (served by vLLM) beside RoAd ones; with one slot the LoRA sits in the last slot,
    where vLLM's CPU kernels would send tokens without an adapter."""
    family = families["llama"]
    lora_dir = save_peft_lora(family.model_dir, tmp_path / "lora", ["q_proj", "v_proj", "down_proj"], seed=7)
    p = prompts(6, seed=1)
    lora, road = ("lora", 9, lora_dir), ("r2", 2, family.adapters["r2"])
    reqs = [
        request(p[0], lora),
        request(p[1]),
        request(p[2], road),
        request(p[3], lora),
        request(p[4]),
        request(p[5], road),
    ]
    for max_loras, batches in ((1, [[0, 1], [2, 4], [3, 5, 1]]), (2, None)):
        results = run_engine(tmp_path, family.model_dir, reqs, engine={"max_loras": max_loras}, batches=batches)
        lora_model = peft.PeftModel.from_pretrained(family.base(), lora_dir).eval()
        road_model = roadkit_model(family, ["r2"])
        for req, res in zip(reqs, results, strict=True):
            assert res["error"] is None, res["error"]
            adapter = req["adapter"][0] if req["adapter"] else None
            model, names = (lora_model, None) if adapter == "lora" else (road_model, [adapter or "__base__"])
            picked, logprobs = reference_logprobs(model, req["prompt_token_ids"], res["token_ids"], names)
            assert res["token_ids"] == picked, f"max_loras={max_loras}, adapter {adapter}"
            assert max(abs(a - b) for a, b in zip(res["logprobs"], logprobs, strict=True)) < ATOL


def test_bad_adapters_fail_alone(families: dict[str, Family], tmp_path) -> None:
    """Each bad adapter fails its request with a clear message; the engine then serves the next batch."""
    family = families["llama"]
    bad = {
        "modules_to_save": save_road(
            family.model_dir, tmp_path / "mts", "road_1", 32, ["q_proj"], seed=3, modules_to_save=["lm_head"]
        ),
        "unknown module": save_road(family.model_dir, tmp_path / "emb", "road_1", 32, ["embed_tokens"], seed=3),
    }
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "ROAD", "variant": "road_1", "group_size": 32}')
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    bad["broken"] = broken
    for kind in ("nan", "inf", "zero scale"):
        bad[kind] = with_bad_values(family.adapters["r2"], tmp_path / kind.replace(" ", "_"), kind)
    p = prompts(len(bad) + 1, seed=2)
    reqs = [request(p[i], (name.replace(" ", "_"), 20 + i, path)) for i, (name, path) in enumerate(bad.items())]
    reqs.append(request(p[-1], ("r1", 1, family.adapters["r1"])))
    expected = {
        "modules_to_save": "modules_to_save",
        "unknown module": "cannot adapt",
        "broken": "damaged",
        "nan": "parameters are NaN or infinite",
        "inf": "parameters are NaN or infinite",
        "zero scale": "rotation blocks are degenerate",
    }
    # Added first (as the API server does), and sent straight to generate: either way the bad adapter
    # fails its own call with RoadAdapterError, and the engine serves r1 afterwards.
    for preload in (True, False):
        run_dir = tmp_path / f"preload_{preload}"
        run_dir.mkdir()
        results = run_engine(
            run_dir, family.model_dir, reqs, batches=[[i] for i in range(len(reqs))], spec={"preload": preload}
        )
        for (name, path), res in zip(bad.items(), results[: len(bad)], strict=True):
            error = res["error"]
            assert error and error.startswith("RoadAdapterError: ") and expected[name] in error, (preload, error)
            assert str(path) in error, error
        assert results[-1]["error"] is None
        check_against_roadkit(family, reqs[-1:], ["r1"], results[-1:])


def test_prompt_logprobs_in_a_mixed_batch(families: dict[str, Family], tmp_path) -> None:
    """prompt_logprobs for a batch mixing RoAd adapters and the base: vLLM's CPU LoRA logits path failed
    on it (an einsum size mismatch) and stopped the engine; now each prompt's log-probs are roadkit's."""
    family = families["llama"]
    reqs, names = mixed_requests(family, 6)
    results = run_engine(tmp_path, family.model_dir, reqs, max_tokens=3, spec={"prompt_logprobs": True})
    check_against_roadkit(family, reqs, names, results)
    model = roadkit_model(family, [n for n in family.adapters])
    for req, name, res in zip(reqs, names, results, strict=True):
        ids = req["prompt_token_ids"]
        _, reference = reference_logprobs(model, ids[:1], ids[1:], [name or "__base__"])
        assert max(abs(a - b) for a, b in zip(res["prompt_logprobs"], reference, strict=True)) < ATOL, name


def test_an_adapter_of_another_base_is_refused(families: dict[str, Family], tmp_path) -> None:
    """An adapter saved on another base of the same shapes records that base's weights: the engine
    refuses it (in float32 and bfloat16, where its own adapters still load), unless ROADKIT_TRUST_BASE=1."""
    family = families["llama"]
    other_base = tmp_path / "other_base"
    save_model(llama_config(), other_base, seed=77)
    stranger = save_road(other_base, tmp_path / "stranger", "road_1", 32, family.targets, seed=78)
    p = prompts(2, seed=4)
    reqs = [request(p[0], ("stranger", 30, stranger)), request(p[1], ("r1", 1, family.adapters["r1"]))]
    for dtype in ("float32", "bfloat16"):
        run_dir = tmp_path / dtype
        run_dir.mkdir()
        results = run_engine(run_dir, family.model_dir, reqs, engine={"dtype": dtype}, batches=[[0], [1]])
        error = results[0]["error"]
        assert error and error.startswith("RoadAdapterError: ") and "trained on another base model" in error, error
        assert "ROADKIT_TRUST_BASE=1" in error and str(other_base) in error, error
        assert results[1]["error"] is None, (dtype, results[1]["error"])
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    results = run_engine(trusted, family.model_dir, reqs[:1], env={"ROADKIT_TRUST_BASE": "1"})
    assert results[0]["error"] is None
    model = RoadModel.from_pretrained(family.base(), stranger, adapter_name="stranger").eval()  # warns, serves
    picked, _ = reference_logprobs(model, p[0], results[0]["token_ids"], ["stranger"])
    assert results[0]["token_ids"] == picked


@torch.no_grad()
def reference_steps(model: torch.nn.Module, prompt: list[int], generated: list[int], adapter_names=None):  # noqa: ANN001
    """Per generated token: its log-probability under `model` (float32), the model's best token, and
    how far that token leads the second (log-probability margin)."""
    ids = torch.tensor([prompt + generated])
    kwargs = {"adapter_names": adapter_names} if adapter_names else {}
    logp = torch.log_softmax(model(input_ids=ids, **kwargs).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
    top = logp.topk(2, dim=-1)
    got = logp.gather(-1, torch.tensor(generated)[:, None])[:, 0]
    return got.tolist(), top.indices[:, 0].tolist(), (top.values[:, 0] - top.values[:, 1]).tolist()


@pytest.mark.parametrize("family_name", ["llama", "opt"])
def test_mixed_batch_in_bfloat16(families: dict[str, Family], family_name: str, tmp_path) -> None:
    """The mixed batch of `test_mixed_batch_equals_roadkit_and_peft` on a bfloat16 engine, against PEFT
    (adapters) and transformers (base rows) in float32: within BF16_ATOL, greedy where stable."""
    family = families[family_name]
    reqs, names = mixed_requests(family, 10)
    results = run_engine(tmp_path, family.model_dir, reqs, engine={"dtype": "bfloat16"})
    references = {
        name: peft.PeftModel.from_pretrained(family.base(), family.adapters[name]).eval()
        for name in set(names) - {None}
    }
    references[None] = family.base()
    worst = {}
    for req, name, res in zip(reqs, names, results, strict=True):
        assert res["error"] is None, res["error"]
        logprobs, best, margin = reference_steps(references[name], req["prompt_token_ids"], res["token_ids"])
        worst[name] = max(worst.get(name, 0.0), max(abs(a - b) for a, b in zip(res["logprobs"], logprobs, strict=True)))
        for step, (token, want, lead) in enumerate(zip(res["token_ids"], best, margin, strict=True)):
            if lead > BF16_MARGIN:
                assert token == want, (
                    f"{family_name}/{name}: step {step} picked {token}, float32 PEFT {want} (lead {lead:.3f})"
                )
            if token != want:
                break  # the sequences part; later steps follow another prefix
    assert max(worst.values()) < BF16_ATOL, worst


def save_many_road(family: Family, root, n: int) -> list:  # noqa: ANN001
    """n RoAd adapters of random rotations, cycling through road_1/2/4 and group sizes 32, 64, 16."""
    models = [
        get_peft_model(
            family.base(), RoadConfig(variant=v, group_size=g, init_weights=False, target_modules=family.targets)
        )
        for v, g in (("road_1", 32), ("road_2", 64), ("road_4", 16))
    ]
    paths = []
    for i in range(n):
        model = models[i % len(models)]
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "road_theta" in pname:
                    param.normal_(0, 0.3)
                elif "road_alpha" in pname:
                    param.normal_(1, 0.2)
        paths.append(root / f"a{i}")
        model.save_pretrained(paths[-1])
    return paths


def test_256_distinct_adapters_in_one_batch(families: dict[str, Family], tmp_path) -> None:
    """--max-loras 256: 256 requests, each with its own RoAd adapter, decoded in one batch; every row
    equals roadkit in-process with that adapter."""
    family = families["llama"]
    n = 256
    paths = save_many_road(family, tmp_path / "adapters", n)
    reqs = [request(p, (f"a{i}", i + 1, paths[i])) for i, p in enumerate(prompts(n, seed=5))]
    engine = {"max_loras": n, "max_cpu_loras": n, "max_num_seqs": n, "max_num_batched_tokens": 4096}
    results = run_engine(tmp_path, family.model_dir, reqs, engine=engine, max_tokens=4)
    model = RoadModel.from_pretrained(family.base(), paths[0], adapter_name="a0")
    for i in range(1, n):
        model.load_adapter(paths[i], adapter_name=f"a{i}")
    model.eval()
    for i, (req, res) in enumerate(zip(reqs, results, strict=True)):
        assert res["error"] is None, res["error"]
        picked, logprobs = reference_logprobs(model, req["prompt_token_ids"], res["token_ids"], [f"a{i}"])
        assert res["token_ids"] == picked, f"adapter a{i}: greedy tokens differ from roadkit"
        assert max(abs(a - b) for a, b in zip(res["logprobs"], logprobs, strict=True)) < ATOL, f"a{i}"


def test_lora_tensors_only_while_a_lora_is_served(families: dict[str, Family], tmp_path) -> None:
    """On CPU a RoAd-only engine holds no LoRA tensors; a LoRA adapter brings them (and is served right),
    and they go when a RoAd adapter takes its slot back. Outputs equal the references throughout."""
    family = families["llama"]
    lora_dir = save_peft_lora(family.model_dir, tmp_path / "lora", ["q_proj", "down_proj"], seed=7)
    p = prompts(3, seed=6)
    reqs = [request(p[0], ("r1", 1, family.adapters["r1"])), request(p[1], ("lora", 9, lora_dir))]
    reqs.append(request(p[2], ("r2", 2, family.adapters["r2"])))
    batches, spec = [[0], [1], [2]], {"adapter_memory": True}
    results = run_engine(tmp_path, family.model_dir, reqs, engine={"max_loras": 1}, batches=batches, spec=spec)
    memory = [res["adapter_memory"] for res in results]
    assert [m["lora_tensors"] > 0 for m in memory] == [False, True, False], memory
    assert all(m["road_tables"] > 0 for m in memory)
    road_model = roadkit_model(family, ["r1", "r2"])
    lora_model = peft.PeftModel.from_pretrained(family.base(), lora_dir).eval()
    for req, res, (model, names) in zip(
        reqs, results, [(road_model, ["r1"]), (lora_model, None), (road_model, ["r2"])], strict=True
    ):
        picked, logprobs = reference_logprobs(model, req["prompt_token_ids"], res["token_ids"], names)
        assert res["token_ids"] == picked
        assert max(abs(a - b) for a, b in zip(res["logprobs"], logprobs, strict=True)) < ATOL
