"""A reduced run of examples/composition.py: adapters trained in disjoint shards, joined by union."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "composition.py"


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("composition_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reduced_experiment(experiment):
    settings = {"steps": 12, "batch_size": 8, "lr": 1e-2, "train": 96, "eval": 16, "replay": 0}
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


def test_replay_leaves_out_rows_shaped_like_the_adapters_own_prompts(experiment):
    task1, task2 = experiment.PROMPTS
    rows = experiment.replay(200, [task1])
    marker = experiment.PROMPTS[task1]("").strip()
    assert rows and len(rows) < 200
    assert not any(ex.completion.partition(" ")[2].startswith(marker) for ex in rows)
    assert len(experiment.replay(200, [task2])) > len(rows)  # the other task's form is rehearsed
