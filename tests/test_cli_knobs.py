"""The knobs of a real fine-tuning run of `roadkit train`, in this process on the shipped demo base: gradient
accumulation, gradient checkpointing and packing change memory and speed but not the adapter; a bitsandbytes base
(4-bit, 8-bit) trains; --report-to tensorboard writes the run's losses as TensorBoard events; a resumed run may
change how it computes but not what."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_cli import cli, one_line_error, write_jsonl

from roadkit.app.demo import BASE_DIR, task_examples

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--model", BASE_DIR, "--data", "train.jsonl", "--batch-size", "4", "--lr", "1e-2", "--no-progress"]
COMMON += ["--device", "cpu"]
# Sums in another order round differently, and Adam divides each update by its gradient's size: after 3 steps of
# lr 1e-2 (updates of about 3e-2), a near-zero gradient entry can differ by a few 1e-6.
ATOL = 2e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Prompt/completion rows of different lengths (so padding and packing differ), and held-out rows."""
    root = tmp_path_factory.mktemp("knobs")
    for split, n in (("train", 16), ("eval", 4)):
        rows = [{"prompt": e.prompt, "completion": e.completion} for e in task_examples("reverse", split, n)]
        write_jsonl(root / f"{split}.jsonl", rows)
    return root


def train(data, capsys, monkeypatch, output, *flags):
    code, out, err = cli(["train", *COMMON, "--output", data / output, *flags], capsys, data, monkeypatch)
    assert code == 0, err
    return out


def adapter(run):
    return load_file(run / "adapter_model.safetensors")


def assert_same_adapter(a, b, atol):
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture
def spy(monkeypatch):
    """What each TrainingRun.fit trained with: the collator, the micro-batch size, whether blocks were checkpointed,
    and the wrapped layers' types."""
    from roadkit.app.training import TrainingRun

    seen = []
    fit = TrainingRun.fit

    def recording_fit(self, *args, **kwargs):
        status = fit(self, *args, **kwargs)
        trainer = self.road_trainer
        seen.append(
            {
                "collator": type(trainer.data_collator).__name__,
                "micro_batch": trainer.args.per_device_train_batch_size,
                "checkpointed": any(getattr(m, "gradient_checkpointing", False) for m in self.model.modules()),
                "layers": {type(m.base_layer).__name__ for m in self.model.modules() if hasattr(m, "base_layer")},
            }
        )
        return status

    monkeypatch.setattr(TrainingRun, "fit", recording_fit)
    return seen


def test_accumulation_checkpointing_and_packing_give_the_same_adapter(data, capsys, monkeypatch, spy):
    train(data, capsys, monkeypatch, "plain", "--max-steps", "3")
    out = train(data, capsys, monkeypatch, "accum", "--max-steps", "3", "--gradient-accumulation-steps", "2")
    assert "batch 4 in 2 micro-batches" in out
    train(data, capsys, monkeypatch, "ckpt", "--max-steps", "3", "--gradient-checkpointing")
    train(data, capsys, monkeypatch, "packed", "--max-steps", "3", "--packing")
    plain = spy[0]
    assert (plain["collator"], plain["micro_batch"], plain["checkpointed"]) == ("DataCollatorForSeq2Seq", 4, False)
    assert spy[1]["micro_batch"] == 2 and spy[2]["checkpointed"] and spy[3]["collator"] == "DataCollatorWithFlattening"
    reference = adapter(data / "plain")
    for run in ("accum", "ckpt", "packed"):
        assert_same_adapter(reference, adapter(data / run), atol=ATOL)
    logged = json.loads((data / "accum" / "training_log.json").read_text())["run"]
    assert logged["gradient_accumulation_steps"] == 2 and not logged["packing"]


def test_a_resumed_run_may_change_how_it_computes_but_not_what(data, capsys, monkeypatch):
    from roadkit.app.training import StopOnRequest

    train(data, capsys, monkeypatch, "whole", "--max-steps", "4")
    with monkeypatch.context() as patched:  # the run stops after step 2, as after a Ctrl-C
        on_step_end = StopOnRequest.on_step_end

        def stop_at_2(self, args, state, control, **kwargs):
            self.requested = self.requested or state.global_step == 2
            return on_step_end(self, args, state, control, **kwargs)

        patched.setattr(StopOnRequest, "on_step_end", stop_at_2)
        code, _, err = cli(
            ["train", *COMMON, "--output", data / "halves", "--max-steps", "4"], capsys, data, monkeypatch
        )
        assert code == 130, err
    resume = ["train", "--output", data / "halves", "--resume"]
    code, _, err = cli([*resume, "--packing"], capsys, data, monkeypatch)
    one_line_error(code, err, "--packing True differs from the run's False")
    code, _, err = cli(
        [*resume, "--gradient-accumulation-steps", "2", "--gradient-checkpointing"], capsys, data, monkeypatch
    )
    assert code == 0, err
    assert_same_adapter(adapter(data / "whole"), adapter(data / "halves"), atol=ATOL)
    logged = json.loads((data / "halves" / "training_log.json").read_text())["run"]
    assert (logged["gradient_accumulation_steps"], logged["gradient_checkpointing"]) == (2, True)


@pytest.mark.parametrize("bits", ["4", "8"])
def test_a_quantized_base_trains(data, capsys, monkeypatch, spy, bits):
    """Evaluations between steps change nothing: on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at
    the first inference call, and the repacked layers pass no gradient back unless training stops that."""
    pytest.importorskip("bitsandbytes")
    from roadkit import RoadModel
    from roadkit.app.loading import load_causal_lm

    flag = f"--load-in-{bits}bit"
    train(data, capsys, monkeypatch, f"q{bits}", "--max-steps", "3", flag)
    train(data, capsys, monkeypatch, f"q{bits}-eval", "--max-steps", "3", flag, "--eval-data", "eval.jsonl")
    assert spy[0]["layers"] == {"Linear4bit" if bits == "4" else "Linear8bitLt"}
    log = json.loads((data / f"q{bits}-eval" / "training_log.json").read_text())
    assert log["run"]["quantize"] == f"{bits}bit" and log["eval"][-1]["loss"] < log["eval"][0]["loss"]
    trained = adapter(data / f"q{bits}")
    assert_same_adapter(trained, adapter(data / f"q{bits}-eval"), atol=ATOL)
    assert any((t != 0).any() for k, t in trained.items() if "road_theta" in k)
    RoadModel.from_pretrained(load_causal_lm(BASE_DIR), data / f"q{bits}")  # the adapter fits the float base
    capsys.readouterr()  # transformers' loading bar
    other = "8" if bits == "4" else "4"
    resume = ["train", "--output", data / f"q{bits}", "--resume", "--max-steps", "4", f"--load-in-{other}bit"]
    code, _, err = cli(resume, capsys, data, monkeypatch)
    one_line_error(code, err, f"--load-in-{other}bit differs from the run's --load-in-{bits}bit")


def test_report_to_tensorboard_writes_the_losses(data, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--max-steps", "4", "--eval-data", "eval.jsonl", "--eval-every", "2", "--report-to", "tensorboard"]
    out = train(data, capsys, monkeypatch, "tb", *flags)
    assert "TensorBoard events:" in out
    run = data / "tb"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    reader = EventAccumulator(str(run / "tensorboard"))
    reader.Reload()
    log = json.loads((run / "training_log.json").read_text())
    assert log["run"]["report_to"] == ["tensorboard"]
    for tag, logged in (("train/loss", log["train"]), ("eval/loss", log["eval"])):
        scalars = reader.Scalars(tag)
        assert [e.step for e in scalars] == [e["step"] for e in logged], tag
        assert [e.value for e in scalars] == pytest.approx([e["loss"] for e in logged]), tag

    code, _, err = cli(["train", "--output", run, "--resume", "--max-steps", "6"], capsys, data, monkeypatch)
    assert code == 0, err
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the resumed session's, beside


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gradient-accumulation-steps", "3"], "the batch size 4 does not split into 3 gradient accumulation steps"),
        (["--gradient-accumulation-steps", "0"], "gradient_accumulation_steps must be at least 1"),
        (["--report-to", "tensorboard,nonsense"], "--report-to 'tensorboard,nonsense': expected comma-separated names"),
    ],
)
def test_bad_knobs_are_one_line_errors(data, tmp_path, capsys, monkeypatch, flags, message):
    code, _, err = cli(["train", *COMMON, "--output", tmp_path / "r", *flags], capsys, data, monkeypatch)
    one_line_error(code, err, message)
    assert not (tmp_path / "r").exists()


def test_a_missing_bitsandbytes_or_tensorboard_says_what_to_install(data, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    code, _, err = cli(
        ["train", *COMMON, "--output", tmp_path / "r", "--report-to", "tensorboard"], capsys, data, monkeypatch
    )
    one_line_error(code, err, "--report-to tensorboard needs tensorboard: pip install 'roadkit[tensorboard]'")

    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    code, _, err = cli(["train", *COMMON, "--output", tmp_path / "r", "--load-in-4bit"], capsys, data, monkeypatch)
    one_line_error(code, err, "--load-in-4bit needs bitsandbytes: pip install bitsandbytes")
    assert not (tmp_path / "r").exists()
