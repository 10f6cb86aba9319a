"""The quality benchmark's tasks, rate choice and bookkeeping (not its numbers): a quick run on the tiny demo
model writes every file, compares roadkit's road_1 with PEFT's, and marks itself complete."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks import quality
from roadkit.app.demo import BASE_DIR


@pytest.mark.parametrize("task", quality.TASKS, ids=lambda t: t.name)
def test_tasks_are_seeded_distinct_and_held_out(task):
    train, held_out = quality.task_data(task, 300, 200, seed=3)
    assert (train, held_out) == quality.task_data(task, 300, 200, seed=3)
    assert len(train) == 300 and len(held_out) == 200
    prompts = [p for p, _ in train + held_out]
    assert len(set(prompts)) == 500
    assert all(p.endswith("\nAnswer:") and a.startswith(" ") and a.strip() for p, a in train + held_out)


def test_answers_are_right():
    for prompt, answer in quality.task_data(quality.TASKS[0], 50, 20, seed=0)[0]:
        a, b = prompt.removeprefix("What is ").split("?")[0].split(" + ")
        assert int(answer) == int(a) + int(b)
    for prompt, answer in quality.task_data(quality.TASKS[1], 50, 20, seed=0)[0]:
        words = prompt.split(": ", 1)[1].split("\n")[0].split(", ")
        assert answer.strip().split(", ") == words[::-1]
    labels = [a.strip() for _, a in quality.task_data(quality.TASKS[2], 400, 0, seed=0)[0]]
    assert set(labels) == {"positive", "negative"} and 150 < labels.count("positive") < 250


def test_best_rate_prefers_lower_loss_within_one_point():
    def run(lr, em, loss):
        return {"lr": lr, "after": {"exact_match": em, "loss": loss}}

    assert quality.best_rate([run(1, 76.0, 0.12), run(2, 76.5, 0.16), run(3, 50.0, 0.3)]) == 1
    assert quality.best_rate([run(1, 70.0, 0.12), run(2, 76.5, 0.16)]) == 2
    assert quality.answers_first("85, and more", "85") and not quality.answers_first("850", "85")


def test_quick_run_on_the_demo_model_writes_everything(tmp_path):
    model = tmp_path / "model"  # the demo's tiny Llama, with room for the tasks' prompts (RoPE: no position weights)
    shutil.copytree(BASE_DIR, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    code = quality.main(
        ["--quick", "--model", str(model), "--methods", "road_1,peft_road", "--steps", "2", "--out", str(tmp_path)]
    )
    assert code == 0
    res = json.loads((tmp_path / "quality.json").read_text())
    assert res["meta"]["complete"] is True and len(res["runs"]) == 2 * (2 + 2)
    assert set(res["best_lr"]) == {"road_1", "peft_road"}
    assert res["parity"] and all(p["same_keys"] and p["max_abs_diff"] < 1e-4 for p in res["parity"])
    md = (tmp_path / "quality.md").read_text()
    assert "roadkit road_1" in md and "PEFT RoAd road_1" in md and "Partial" not in md
    assert (tmp_path / "quality.png").read_bytes().startswith(b"\x89PNG")
