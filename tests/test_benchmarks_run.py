"""The benchmark runner's bookkeeping (not its timings): scenarios run in the order given, results are
rewritten after each one, and failures or interruptions keep what finished. A lent GPU machine's
single call depends on this (benchmarks/gpu.sh)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import run, scenarios


def _main(tmp_path, names: str, *extra: str) -> int:
    return run.main(
        [
            "--quick",
            "--scenarios",
            names,
            "--reps",
            "1",
            "--warmup",
            "0",
            "--threads",
            str(torch.get_num_threads()),
            "--out",
            str(tmp_path),
            *extra,
        ]
    )


def _results(tmp_path) -> dict:
    return json.loads((tmp_path / "results.json").read_text())


def _fail(*_):
    raise RuntimeError("planted failure")


def test_keep_going_records_the_failure_and_runs_the_rest_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(scenarios, "kernels", _fail)
    assert _main(tmp_path, "kernels,merge", "--keep-going") == 1
    res = _results(tmp_path)
    assert list(res["scenarios"]) == ["kernels", "merge"]
    assert res["scenarios"]["kernels"]["error"] == "RuntimeError: planted failure"
    assert "planted failure" in res["scenarios"]["kernels"]["traceback"]
    assert res["scenarios"]["merge"]["speedup_peft_over_roadkit"]["merge"] > 0
    assert res["meta"]["complete"] is True
    md = (tmp_path / "results.md").read_text()
    assert "## kernels: failed" in md and "## merge:" in md
    assert not list(tmp_path.glob("*.tmp"))


def test_without_keep_going_a_failure_raises_after_earlier_results_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(scenarios, "merge", _fail)
    with pytest.raises(RuntimeError, match="planted failure"):
        _main(tmp_path, "kernels,merge")
    res = _results(tmp_path)
    assert list(res["scenarios"]) == ["kernels"] and res["meta"]["complete"] is False
    assert "**incomplete**: written after 1 of 2 scenarios" in (tmp_path / "results.md").read_text()


def test_an_interrupt_stops_the_run_and_keeps_what_finished(tmp_path, monkeypatch):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(scenarios, "merge", interrupted)
    assert _main(tmp_path, "kernels,merge,overhead", "--keep-going") == 130
    assert list(_results(tmp_path)["scenarios"]) == ["kernels"]


@pytest.mark.parametrize(
    "names, message", [("kernels,kernels", "named twice: kernels"), ("kernels,nope", "unknown scenario")]
)
def test_bad_scenario_lists_are_refused_before_anything_runs(tmp_path, capsys, names, message):
    with pytest.raises(SystemExit):
        _main(tmp_path, names)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
