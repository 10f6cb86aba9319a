"""`roadkit train` on chat rows and `roadkit generate --chat`, in this process, on a copy of the shipped demo base
given a chat template (`roadkit.app.demo.save_chat_base`): the adapter learns to answer a user turn "kitten" with
"KITTEN", which the base never does."""

from __future__ import annotations

import json

import pytest
from test_cli import cli, one_line_error, write_jsonl

from roadkit.app.demo import BASE_DIR, chat_rows, save_chat_base, words

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = ["--max-steps", "150", "--batch-size", "16", "--lr", "3e-2", "--eval-every", "50"]  # about 10 s, one thread


@pytest.fixture(scope="module")
def chat_work(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    save_chat_base(root / "base")
    write_jsonl(root / "train.jsonl", chat_rows("upper", "train", 256))
    write_jsonl(root / "eval.jsonl", chat_rows("upper", "eval", 16))
    return root


@pytest.fixture(scope="module")
def chat_run(chat_work):
    """One chat training run; its directory."""
    from _pytest.monkeypatch import MonkeyPatch

    from roadkit.app.cli import main

    with MonkeyPatch.context() as mp:
        mp.chdir(chat_work)
        code = main(
            ["train", "--model", "base", "--data", "train.jsonl", "--eval-data", "eval.jsonl", "--output", "run"]
            + [*STEPS, "--no-progress", "--device", "cpu"]
        )
    assert code == 0
    return chat_work / "run"


def test_a_chat_adapter_answers_chat_prompts(chat_work, chat_run, capsys, monkeypatch):
    log = json.loads((chat_run / "training_log.json").read_text())
    assert log["run"]["loss_on"] == "assistant" and log["eval"][-1]["loss"] < 0.5 * log["eval"][0]["loss"]
    trained = words("train", 8)
    args = ["generate", "--model", "base", "--adapter", "a=run", "--chat", "--json", "--max-new-tokens", "12"]
    for w in trained:
        args += ["--prompt", f"a:{w}", "--prompt", f"base:{w}"]
    code, out, err = cli(args, capsys, chat_work, monkeypatch)
    assert code == 0, err
    rows = json.loads(out)
    answers = {(r["adapter"], r["prompt"]): r["completion"] for r in rows}
    right = [w for w in trained if answers["a", w] == w.upper()]
    assert len(right) >= 6, answers  # 7 of 8 when this was written
    assert not [w for w in trained if answers["base", w].strip() == w.upper()], answers

    # the same answers one by one, in process: --chat renders each prompt as a user turn
    from roadkit import RoadModel
    from roadkit.app.generation import generate
    from roadkit.app.loading import load_causal_lm, load_tokenizer

    model = RoadModel.from_pretrained(load_causal_lm(chat_work / "base"), chat_run)
    tokenizer = load_tokenizer(chat_work / "base")
    assert [generate(model, tokenizer, [w], None, 12, chat=True)[0] for w in trained[:2]] == [
        answers["a", w] for w in trained[:2]
    ]


def test_chat_rows_need_a_chat_template_before_the_model_loads(chat_work, tmp_path, capsys, monkeypatch):
    import roadkit.app.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(roadkit.app.loading, "load_causal_lm", no_loading)
    code, _, err = cli(
        ["train", "--model", BASE_DIR, "--data", chat_work / "train.jsonl", "--output", tmp_path / "r"],
        capsys,
        chat_work,
        monkeypatch,
    )
    one_line_error(code, err, "train.jsonl:1: a chat row", f"the tokenizer of {BASE_DIR} has no chat template")
    assert not (tmp_path / "r").exists()

    code, _, err = cli(
        ["generate", "--model", BASE_DIR, "--chat", "--prompt", "kitten"], capsys, chat_work, monkeypatch
    )
    one_line_error(code, err, "--chat: the tokenizer of", "has no chat template")


def test_a_malformed_chat_row_is_a_one_line_error(chat_work, tmp_path, capsys, monkeypatch):
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [*chat_rows("upper", "train", 2), {"messages": [{"role": "user", "content": "hi"}, {"role": "tool"}]}],
    )
    code, _, err = cli(
        ["train", "--model", "base", "--data", bad, "--output", tmp_path / "r"], capsys, chat_work, monkeypatch
    )
    one_line_error(code, err, "bad.jsonl:3: message 2 has the role 'tool'; roles are system, user, assistant")
    assert not (tmp_path / "r").exists()
