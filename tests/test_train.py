"""The training path (`roadkit.app.training.TrainingRun` on `RoadTrainer`): learning, schedule, evaluation, stop
requests and exact resumption."""

from __future__ import annotations

import copy
import json
import os
import signal
import threading

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from roadkit import RoadConfig, get_peft_model
from roadkit.app.data import tokenize_all
from roadkit.app.demo import build_model, build_tokenizer, task_examples
from roadkit.app.runs import COMPLETED, DIVERGED, INTERRUPTED, TrainConfig, load_state
from roadkit.app.training import TrainingRun, write_run


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_tokenizer()
    base = build_model(tokenizer, hidden_size=64, num_layers=1, intermediate_size=128)
    train, _ = tokenize_all(tokenizer, task_examples("upper", "train", 24), 64)
    held_out, _ = tokenize_all(tokenizer, task_examples("upper", "eval", 8), 64)
    return tokenizer, base, train, held_out


def make(setup, steps=6, **kwargs):
    tokenizer, base, train, held_out = setup
    model = get_peft_model(copy.deepcopy(base), RoadConfig(group_size=64, target_modules="all-linear"))
    config = TrainConfig(lr=1e-2, max_steps=steps, batch_size=4, eval_every=3, **kwargs)
    return model, TrainingRun(model, train, config, tokenizer, held_out)


def adapter(model):
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


class AtStep(TrainerCallback):
    """Calls `action` when step `step` begins."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.action()


def test_fit_learns_and_logs(setup):
    model, trainer = make(setup, steps=12)
    assert trainer.fit(progress=False) == COMPLETED
    assert [e["step"] for e in trainer.log["train"]] == list(range(1, 13))
    assert [e["step"] for e in trainer.log["eval"]] == [0, 3, 6, 9, 12]
    assert trainer.log["eval"][-1]["loss"] < trainer.log["eval"][0]["loss"]
    # linear decay reaches zero at the last step
    assert trainer.road_trainer.optimizer.param_groups[0]["lr"] == 0.0
    assert all(p.grad is None for p in trainer.params)


def test_epochs_and_warmup(setup):
    _, trainer = make(setup, steps=None, warmup_steps=2)
    assert trainer.total_steps == 6  # 24 rows / batch 4, one epoch
    trainer.fit(progress=False)
    # transformers' linear schedule: warmup from 0 over 2 steps, then linear decay to 0 at step 6
    assert [e["lr"] for e in trainer.log["train"]] == pytest.approx([0.0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3])


def test_stop_request_then_resume_matches_an_uninterrupted_run(setup, tmp_path):
    reference, trainer = make(setup)
    trainer.fit(progress=False)

    model, first = make(setup)
    first.road_trainer.add_callback(AtStep(3, lambda: setattr(first.stop, "requested", True)))  # stop after step 3
    assert first.fit(progress=False) == INTERRUPTED and first.step == 3
    write_run(tmp_path / "run", model, first, INTERRUPTED, {"note": "test"})
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint",
        "training_log.json",
        "loss_curve.png",
    } <= set(os.listdir(tmp_path / "run"))
    saved = set(os.listdir(tmp_path / "run" / "checkpoint"))  # adapter-only: no full model weights
    assert {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= saved
    assert not saved & {"model.safetensors", "pytorch_model.bin"}

    tokenizer, base, train, held_out = setup
    from roadkit import RoadModel

    resumed = RoadModel.from_pretrained(copy.deepcopy(base), tmp_path / "run", is_trainable=True)
    second = TrainingRun(resumed, train, first.config, tokenizer, held_out)
    state = load_state(tmp_path / "run")
    assert state["run"] == {"note": "test"} and state["status"] == INTERRUPTED and state["step"] == 3
    second.resume(state)
    assert second.fit(progress=False) == COMPLETED
    want, got = adapter(reference), adapter(resumed)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert [e["step"] for e in second.log["train"]] == list(range(1, 7))
    assert [e["loss"] for e in second.log["train"]] == pytest.approx([e["loss"] for e in trainer.log["train"]])
    assert [e["step"] for e in second.log["eval"]] == [0, 3, 6]


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_sigint_requests_a_stop_and_restores_the_handler(setup):
    _, trainer = make(setup, steps=50)
    trainer.road_trainer.add_callback(AtStep(2, lambda: os.kill(os.getpid(), signal.SIGINT)))
    before = signal.getsignal(signal.SIGINT)
    assert trainer.fit(progress=False) == INTERRUPTED
    assert trainer.step == 2 and signal.getsignal(signal.SIGINT) is before
    assert os.path.isdir(trainer.checkpoint) and trainer.checkpoint.endswith("checkpoint-2")


def test_state_round_trip(tmp_path, setup):
    model, trainer = make(setup, steps=1)
    trainer.fit(progress=False)
    write_run(tmp_path, model, trainer, COMPLETED, {})
    assert load_state(tmp_path)["step"] == 1
    with pytest.raises(FileNotFoundError, match="not a roadkit training run"):
        load_state(tmp_path / "nowhere")
    (tmp_path / "trainer_state.pt").write_bytes(b"")  # the state file of roadkit's earlier, hand-written loop
    with pytest.raises(ValueError, match="earlier roadkit"):
        load_state(tmp_path)


def test_rejects_bad_settings(setup):
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="learning rate"):
        TrainConfig(lr=0)
    tokenizer, base, train, _ = setup
    frozen = copy.deepcopy(base).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        TrainingRun(frozen, train, TrainConfig(), tokenizer)
    with pytest.raises(ValueError, match="does not split into 3 gradient accumulation steps"):
        TrainConfig(batch_size=4, gradient_accumulation_steps=3)

    class NoPositions(torch.nn.Module):  # a model that cannot keep packed rows apart
        def __init__(self):
            super().__init__()
            self.base = copy.deepcopy(base)

        def forward(self, input_ids, labels=None):
            return self.base(input_ids=input_ids, labels=labels)

    with pytest.raises(ValueError, match=r"--packing needs a model that takes position_ids .*; NoPositions does not"):
        TrainingRun(NoPositions(), train, TrainConfig(packing=True), tokenizer)


def test_resume_with_a_longer_schedule_recomputes_the_learning_rate(setup, tmp_path):
    model, finished = make(setup, steps=2)
    assert finished.fit(progress=False) == COMPLETED
    assert finished.road_trainer.optimizer.param_groups[0]["lr"] == 0.0
    write_run(tmp_path, model, finished, COMPLETED, {})
    _, longer = make(setup, steps=4)
    longer.resume(load_state(tmp_path))
    longer.fit(progress=False)
    assert [e["lr"] for e in longer.log["train"]] == pytest.approx([1e-2, 1e-2 / 2, 1e-2 / 2, 1e-2 / 4])


def test_damaged_state_is_a_value_error_naming_the_file(tmp_path, setup):
    model, trainer = make(setup, steps=1)
    trainer.fit(progress=False)
    write_run(tmp_path, model, trainer, COMPLETED, {})
    (tmp_path / "checkpoint" / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match="trainer_state.json"):
        load_state(tmp_path)
    path = tmp_path / "checkpoint" / "optimizer.pt"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match="optimizer.pt"):
        load_state(tmp_path)


def test_write_run_without_steps_draws_no_empty_legend(tmp_path, setup):
    import warnings

    model, trainer = make(setup)
    trainer.eval_data = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_run(tmp_path / "run", model, trainer, INTERRUPTED, {})
    assert (tmp_path / "run" / "loss_curve.png").is_file()
    assert json.loads((tmp_path / "run" / "training_log.json").read_text())["step"] == 0


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_deferred_stop_signals_records_and_restores(setup):
    from roadkit.app.runs import deferred_stop_signals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with deferred_stop_signals() as received:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    assert received == [signal.SIGINT, signal.SIGTERM]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


class BreakAt(TrainerCallback):
    """Writes NaN into `param` in the optimizer step of step `step` (as a diverging update would)."""

    def __init__(self, step, param):
        self.step, self.param = step, param

    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                self.param[0] = float("nan")


def strict_json(path):
    def refuse(name):
        raise ValueError(f"{name} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_divergence_stops_the_run_and_keeps_the_last_good_adapter(setup, tmp_path):
    reference, stopped = make(setup)
    stopped.road_trainer.add_callback(AtStep(2, lambda: setattr(stopped.stop, "requested", True)))
    assert stopped.fit(progress=False) == INTERRUPTED and stopped.step == 2

    model, trainer = make(setup)
    trainer.road_trainer.add_callback(BreakAt(3, trainer.params[0]))
    assert trainer.fit(progress=False) == DIVERGED
    assert (trainer.diverged_at, trainer.step) == (3, 2)
    assert "1 of the adapter's 7 RoAd layers" in trainer.divergence and "NaN or infinite" in trainer.divergence
    want, got = adapter(reference), adapter(model)  # the model holds the adapter of step 2 again
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    assert [e["step"] for e in trainer.log["train"]] == [1, 2, 3]  # and took no step after the broken one
    assert [e["step"] for e in trainer.log["eval"]] == [0]  # step 3's evaluation was cancelled
    assert trainer.checkpoint is None and not os.listdir(trainer.road_trainer.args.output_dir)

    write_run(tmp_path / "run", model, trainer, DIVERGED, {"note": "test"})
    log = strict_json(tmp_path / "run" / "training_log.json")
    assert (log["status"], log["diverged_at_step"], log["step"]) == ("diverged", 3, 2)
    assert log["divergence"] == trainer.divergence
    saved = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert saved and all(torch.isfinite(t).all() for t in saved.values())
    assert not (tmp_path / "run" / "checkpoint").exists()
    with pytest.raises(ValueError, match="diverged at step 3"):
        load_state(tmp_path / "run")


def test_a_first_step_that_breaks_the_adapter_leaves_the_initial_one_and_saves_none(setup, tmp_path):
    tokenizer, base, train, held_out = setup
    model = get_peft_model(copy.deepcopy(base), RoadConfig(group_size=64, target_modules="all-linear"))
    start = adapter(model)
    trainer = TrainingRun(model, train, TrainConfig(lr=1e30, max_steps=3, batch_size=4), tokenizer, held_out)
    assert trainer.fit(progress=False) == DIVERGED
    assert (trainer.diverged_at, trainer.step) == (1, 0) and "degenerate" in trainer.divergence
    for key, value in adapter(model).items():
        torch.testing.assert_close(value, start[key], rtol=0, atol=0)
    write_run(tmp_path, model, trainer, DIVERGED, {})
    assert not (tmp_path / "adapter_model.safetensors").exists()  # nothing trained is worth saving
    log = strict_json(tmp_path / "training_log.json")
    assert (log["status"], log["diverged_at_step"], log["step"]) == ("diverged", 1, 0)
