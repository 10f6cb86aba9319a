"""A reduced run of examples/composition.py: adapters trained in disjoint shards, joined by union."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "composition.py"


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("composition_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reduced_experiment(experiment):
    settings = {"steps": 12, "batch_size": 8, "lr": 1e-2, "train": 96, "eval": 16, "replay": 0, "cross": 8}
    result = experiment.run(settings, say=lambda _: None)
    losses, (task1, task2) = result["losses"], list(experiment.PROMPTS)
    assert set(losses) == {"base", "A", "B", "union", "joint", "A then B"}
    assert all(math.isfinite(v) for row in losses.values() for v in row.values())
    # Each adapter learns its own task in its half of the pairs, with half the joint adapter's parameters.
    assert losses["A"][task1] < losses["base"][task1]
    assert losses["B"][task2] < losses["base"][task2]
    assert result["trainable_parameters"]["A"] * 2 == result["trainable_parameters"]["joint"]
    # Disjoint pairs commute: the union is exactly both adapters applied one after the other.
    assert losses["union"] == pytest.approx(losses["A then B"], abs=1e-5)
    kept = result["union_keeps"]
    assert kept[task1] == pytest.approx(
        (losses["base"][task1] - losses["union"][task1]) / (losses["base"][task1] - losses["A"][task1])
    )
    assert result["goal_met"] == (min(kept.values()) >= 0.9)
    assert "union keeps" in experiment.markdown(result)
    right = result["right"]
    assert set(right) == {"base", "A", "B", "union", "joint"}
    assert all(0 <= v <= 1 for row in right.values() for v in row.values())
    assert right["base"][task2] == 0  # the base never reverses an unnamed prompt; B is trained to


def test_cross_rows_are_the_other_tasks_prompts_answered_by_the_base(experiment):
    from roadkit.app.demo import load_base

    base, tokenizer = load_base()
    rows = experiment.base_answers(base, tokenizer, "reverse", 5)
    assert [r.prompt for r in rows] == [experiment.PROMPTS["reverse"](w) for w in experiment.words("train", 5, seed=1)]
    ids = tokenizer(rows[0].prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        first = base(ids).logits[0, -1].argmax()
    assert rows[0].completion.startswith(tokenizer.decode(first))  # the base's own greedy answer


def test_replay_leaves_out_rows_shaped_like_the_adapters_own_prompts(experiment):
    task1, task2 = experiment.PROMPTS
    rows = experiment.replay(200, [task1])
    marker = experiment.PROMPTS[task1]("").strip()
    assert rows and len(rows) < 200
    assert not any(ex.completion.partition(" ")[2].startswith(marker) for ex in rows)
    assert len(experiment.replay(200, [task2])) > len(rows)  # the other task's form is rehearsed
