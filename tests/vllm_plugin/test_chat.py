"""A RoAd adapter trained by `roadkit train` on chat rows, served by vLLM's OpenAI server on /v1/chat/completions.

The base is the shipped demo model with a small chat template (`roadkit.app.demo.save_chat_base`); the adapter
learns to answer a user turn "kitten" with "KITTEN". The server renders each request with the same template and
answers greedily what roadkit's own chat-form generation (`roadkit generate --chat`) answers, prompt ids included.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from server_helpers import API_SERVER, SERVER_ENV, STARTUP_TIMEOUT, free_port, stop

from roadkit.app.demo import chat_rows, save_chat_base, words

MAX_TOKENS = 12
WORDS = words("train", 8)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base with a chat template, adapter trained on chat rows of the demo's "upper" task)."""
    from roadkit.app.cli import main

    root = tmp_path_factory.mktemp("chat")
    base = Path(save_chat_base(root / "base"))
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows("upper", "train", 256)))
    args = ["train", "--model", str(base), "--data", str(root / "train.jsonl"), "--output", str(root / "run")]
    args += ["--max-steps", "150", "--batch-size", "16", "--lr", "3e-2", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    return base, root / "run"


@pytest.fixture(scope="module")
def client(chat_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """vLLM's API server for the base (as "base") and the chat adapter (as "chat"), healthy; stopped afterwards."""
    base, run = chat_run
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [*API_SERVER, "--model", str(base), "--served-model-name", "base", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--dtype", "float32", "--max-model-len", "64", "--enable-lora"]
    command += ["--lora-modules", f"chat={run}", "--max-loras", "1", "--max-lora-rank", "8"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            command, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **SERVER_ENV}, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not healthy(url):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            if proc.poll() is not None:
                pytest.fail(f"the API server exited with {proc.returncode} during startup:\n{tail}")
            if time.monotonic() > deadline:
                pytest.fail(f"the API server is not healthy after {STARTUP_TIMEOUT} s:\n{tail}")
            time.sleep(1)
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=60, max_retries=0)
    finally:
        stop(proc)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def roadkit_answers(base: Path, adapter: Path | None) -> list[str]:
    """Greedy chat-form answers of roadkit itself (what `roadkit generate --chat` prints) to WORDS."""
    from roadkit import RoadModel
    from roadkit.app.generation import generate
    from roadkit.app.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(base)
    if adapter is not None:
        model = RoadModel.from_pretrained(model, adapter)
    return generate(model, load_tokenizer(base), WORDS, None, MAX_TOKENS, chat=True)


def test_chat_completions_answer_as_roadkit_does(chat_run: tuple[Path, Path], client: openai.OpenAI) -> None:
    from roadkit.app.data import chat_prompt_ids
    from roadkit.app.loading import load_tokenizer

    base, run = chat_run
    tokenizer = load_tokenizer(base)
    for name, adapter in (("chat", run), ("base", None)):
        expected = roadkit_answers(base, adapter)
        for word, answer in zip(WORDS, expected, strict=True):
            out = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": word}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                extra_body={"return_token_ids": True},
            )
            assert out.model_extra["prompt_token_ids"] == chat_prompt_ids(tokenizer, word), word
            assert out.choices[0].message.content == answer, (name, word)
        if name == "chat":  # the trained answers (7 of 8 when this was written), which the base never gives
            assert sum(a == w.upper() for a, w in zip(expected, WORDS, strict=True)) >= 6, expected
        else:
            assert not any(a.strip() == w.upper() for a, w in zip(expected, WORDS, strict=True)), expected
