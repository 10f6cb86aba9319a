"""Serve a composition nobody registered: vLLM answers `model="A+B"` from an adapter store, beside A and B.

    python scripts/serve_compose_demo.py [--store roadkit-compose] [--words 8] [--max-tokens 14]

`bash scripts/serve_compose_demo.sh` trains the store first (`examples/composition.py --save-adapters`:
adapter A upper-cases `"kitten ->"` in shard 0 of 2 of the demo base's rotation pairs, adapter B
reverses `"<- kitten ->"` in shard 1 of 2), then runs this. It starts stock vLLM on 127.0.0.1 with the
demo base and `ROADKIT_ADAPTER_STORE` set, and no `--lora-modules`: the server finds A and B by name
and builds their union `A+B` at the first request for it. Every prompt goes to the base, A, B and A+B
at once; the completions are printed beside roadkit's in-process ones (A+B composed by
`roadkit.compose`), with how many of each task's answers are right.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for examples/
from serve_demo import (  # noqa: E402
    free_port,
    interrupt,
    print_table,
    roadkit_completions,
    start_server,
    stop_server,
    vllm_completions,
    wait_healthy,
)

from examples.composition import PROMPTS  # noqa: E402

MODELS = ("A", "B", "A+B")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="roadkit-compose", help="folder with adapters A and B (default: roadkit-compose)")
    p.add_argument("--words", type=int, default=8, help="held-out demo words to prompt with (default: 8)")
    p.add_argument("--max-tokens", type=int, default=14, help="tokens to generate per prompt (default: 14)")
    p.add_argument("--port", type=int, default=0, help="port for the server (default: a free one)")
    args = p.parse_args()
    store = Path(args.store).resolve()
    adapters = {name: store / name for name in ("A", "B")}
    if not all((path / "adapter_config.json").is_file() for path in adapters.values()):
        print(f"error: {store}/A and {store}/B not found: run `bash scripts/serve_compose_demo.sh`.", file=sys.stderr)
        return 1

    from roadkit.app.demo import BASE_DIR, TASKS, words

    base = Path(BASE_DIR)
    held_out = words("eval", args.words)
    prompts = [PROMPTS["upper"](w) for w in held_out] + [PROMPTS["reverse"](w) for w in held_out]
    wanted = [f" {TASKS['upper'](w)}" for w in held_out] + [f" {TASKS['reverse'](w)}" for w in held_out]
    port = args.port or free_port()
    log_fd, log_name = tempfile.mkstemp(prefix="roadkit-serve-compose-", suffix=".log")
    os.close(log_fd)
    log_path = Path(log_name)
    signal.signal(signal.SIGTERM, interrupt)
    env = {"ROADKIT_ADAPTER_STORE": str(store), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}
    proc = start_server(base, {}, port, log_path, env=env)
    ok = False
    try:
        print(f"vLLM is starting on 127.0.0.1:{port} with ROADKIT_ADAPTER_STORE={store} (log: {log_path})", flush=True)
        local = roadkit_completions(base, adapters, prompts, args.max_tokens, {"A+B": ("union", ["A", "B"])})
        wait_healthy(proc, port, log_path)
        start = time.monotonic()
        served = asyncio.run(vllm_completions(port, prompts, args.max_tokens, MODELS))
        print(f"{len(prompts) * (1 + len(MODELS))} requests answered in {time.monotonic() - start:.1f} s\n")
        mismatches = print_table(prompts, served, local)
        print()
        for model, texts in served.items():
            right = [text[: len(w)] == w for text, w in zip(texts, wanted, strict=True)]
            n = len(held_out)
            print(f"{model:>5}: upper-case task {sum(right[:n])}/{n} right, reverse task {sum(right[n:])}/{n} right")
        total = len(prompts) * len(served)
        print(f"\n{total - mismatches} of {total} completions identical to roadkit's")
        ok = mismatches == 0
        return 0 if ok else 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        stop_server(proc)
        if ok:
            log_path.unlink(missing_ok=True)
        else:
            print(f"server log: {log_path}")


if __name__ == "__main__":
    sys.exit(main())
