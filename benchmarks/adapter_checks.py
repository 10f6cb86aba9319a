"""What checking and keeping a RoAd adapter costs the vLLM plugin, per adapter.

    python -m benchmarks.adapter_checks                      # in-process: read, value check, snapshot size
    python -m benchmarks.adapter_checks --server [--baseline SRC]   # also runtime loads through vLLM's API server

A SmolLM2-135M-shaped Llama (random weights; hidden 576, 30 layers) with road_1 on every linear layer.
In-process, interleaved rounds time `read_road_adapter` (read, shape checks, value check, coefficients)
and the value check alone (`functional.value_problem` over every module), and report the bytes the
engine keeps per adapter and the time the adapter store takes to build a composition (`a>a`) from the
files. With `--server` (run it in the vLLM environment) it starts vLLM's OpenAI
server on 127.0.0.1 and times `/v1/load_lora_adapter` for fresh adapters, once with this tree and once
with the roadkit source at `--baseline SRC` (e.g. a worktree of an older commit), one server at a time.
The first load on a server includes each layer's one-time probe (`RoadLinear.probe`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA = dict(
    vocab_size=256,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(root: Path, n_adapters: int) -> tuple[Path, list[Path]]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    from roadkit import RoadConfig, get_peft_model

    torch.manual_seed(0)
    base_dir = root / "base"
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA))
    model.save_pretrained(base_dir)
    demo = Path(__file__).parents[1] / "src" / "roadkit" / "app" / "demo_base"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base_dir / name).write_bytes((demo / name).read_bytes())
    adapters = []
    for i in range(n_adapters):
        torch.manual_seed(1 + i)
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        cfg = RoadConfig(variant="road_1", group_size=64, init_weights=False, target_modules=TARGETS)
        get_peft_model(base, cfg).save_pretrained(root / f"a{i}")
        adapters.append(root / f"a{i}")
    return base_dir, adapters


def in_process(adapter: Path, rounds: int) -> dict[str, float]:
    from roadkit import functional as F
    from roadkit.checkpoint import read_adapter
    from roadkit.integrations.vllm.adapter import read_road_adapter
    from roadkit.integrations.vllm.store import AdapterStore, parse

    config, tensors = read_adapter(adapter)
    pairs = [(tensors[k], tensors[k.replace("road_theta", "road_alpha")]) for k in tensors if k.endswith("road_theta")]
    read_ms, check_ms = [], []
    for _ in range(rounds):  # interleaved
        start = time.perf_counter()
        rotations = read_road_adapter(str(adapter)).rotations
        read_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        problems = [F.value_problem(config.variant, config.group_size, t, a) for t, a in pairs]
        check_ms.append((time.perf_counter() - start) * 1e3)
        assert not any(problems)
    compose_ms = []
    for _ in range(max(rounds // 4, 3)):  # a composition built from the files, as the adapter store does
        store = AdapterStore(str(adapter.parent))
        start = time.perf_counter()
        store.resolve(parse(f"{adapter.name}>{adapter.name}"))
        compose_ms.append((time.perf_counter() - start) * 1e3)
    snapshot = sum(r.c.numel() * r.c.element_size() + r.s.numel() * r.s.element_size() for r in rotations.values())
    params = sum(t.numel() * t.element_size() for t in tensors.values())
    return {
        "modules": len(pairs),
        "read_and_check_ms": statistics.median(read_ms),
        "value_check_ms": statistics.median(check_ms),
        "value_check_share": statistics.median(check_ms) / statistics.median(read_ms),
        "compose_sequential_ms": statistics.median(compose_ms),
        "snapshot_bytes": snapshot,
        "file_parameter_bytes": params,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_loads(base: Path, adapters: list[Path], src: str | None) -> list[float]:
    """Seconds per `/v1/load_lora_adapter` of each adapter (a fresh name each), on a server running `src`."""
    import httpx

    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    if src:
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base), "--port", str(port)]
    args += ["--host", "127.0.0.1", "--dtype", "float32", "--enable-lora", "--max-lora-rank", "8"]
    args += ["--max-loras", "4", "--max-model-len", "128"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"server did not start:\n{log.read()[-3000:].decode(errors='replace')}")
                time.sleep(1)
            times = []
            for i, path in enumerate(adapters):
                start = time.perf_counter()
                body = {"lora_name": f"x{i}", "lora_path": str(path)}
                response = httpx.post(f"{url}/v1/load_lora_adapter", json=body, timeout=120)
                times.append(time.perf_counter() - start)
                assert response.status_code == 200, response.text
            return times
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8, help="adapters to load per server (default 8)")
    parser.add_argument("--rounds", type=int, default=20, help="in-process timing rounds (default 20)")
    parser.add_argument("--server", action="store_true", help="also time runtime loads through vLLM's API server")
    parser.add_argument("--baseline", metavar="SRC", help="with --server: another roadkit source tree to compare")
    parser.add_argument("--output", metavar="JSON", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = build(Path(tmp), args.adapters if args.server else 1)
        results: dict = {"in_process": in_process(adapters[0], args.rounds)}
        if args.server:
            for label, src in [("this tree", None)] + ([("baseline", args.baseline)] if args.baseline else []):
                times = server_loads(base, adapters, src)
                results[f"server load s ({label})"] = {"median": statistics.median(times), "all": times}
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
