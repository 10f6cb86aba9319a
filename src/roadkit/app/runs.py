"""Run directories, their settings and stop signals: what `roadkit train` writes, resumes and checks.

A run directory holds the adapter, `checkpoint/` (the Trainer's, for resuming), `training_log.json` and
`loss_curve.png`; the training itself is `training.TrainingRun`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

from ..errors import InputError, MissingFileError
from ..fileio import file_sha256
from . import defaults
from .loading import one_line

CHECKPOINT_NAME = "checkpoint"
LOG_NAME = "training_log.json"
CURVE_NAME = "loss_curve.png"
TENSORBOARD_NAME = "tensorboard"  # TensorBoard's event files, with --report-to tensorboard
# `status` in training_log.json; a DIVERGED run also records `diverged_at_step` and `divergence`.
COMPLETED, INTERRUPTED, DIVERGED = "completed", "interrupted", "diverged"


@dataclass
class TrainConfig:
    """Hyperparameters of one run. `max_steps`, when set, overrides `epochs`; `eval_every=None`
    evaluates about ten times per run (and before the first step). `batch_size` is the global batch:
    under DDP or FSDP every process takes an equal share of it, in `gradient_accumulation_steps`
    micro-batches (less memory, the same steps).

    `gradient_checkpointing` recomputes activations in the backward pass instead of keeping them;
    `packing` joins each micro-batch's rows into one row without padding (position ids restart at
    every row, so attention stays inside rows and the loss is the padded batch's); `report_to` names
    transformers' logging integrations ("tensorboard", ...)."""

    lr: float = defaults.LR
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = defaults.BATCH_SIZE
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    eval_every: Optional[int] = None
    seed: int = 0
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    packing: bool = False
    report_to: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_steps", "eval_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.warmup_steps < 0:
            raise InputError(f"warmup_steps must not be negative, got {self.warmup_steps}.")
        if not self.lr > 0:
            raise InputError(f"the learning rate must be positive, got {self.lr}.")
        if self.batch_size % self.gradient_accumulation_steps:
            raise InputError(
                f"the batch size {self.batch_size} does not split into {self.gradient_accumulation_steps} "
                "gradient accumulation steps."
            )


# ---- run directories ---------------------------------------------------------------------------


def load_state(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    """What resuming a run directory needs: {"step", "status", "run", "log", "checkpoint"}. MissingFileError
    when it holds no checkpoint, InputError naming the file when one is damaged or the run is an earlier
    roadkit's, and InputError for a run that diverged (resuming it would take the same steps again)."""
    checkpoint = os.path.join(directory, CHECKPOINT_NAME)
    _refuse_diverged(directory)
    if os.path.isfile(os.path.join(directory, "trainer_state.pt")):
        raise InputError(
            f"{os.fspath(directory)!r} holds a trainer_state.pt: a run of an earlier roadkit, whose "
            "checkpoints this one cannot resume; resume it with that version, or start a new run."
        )
    if not os.path.isfile(os.path.join(checkpoint, "trainer_state.json")):
        raise MissingFileError(
            f"{os.fspath(directory)!r} holds no {CHECKPOINT_NAME}/trainer_state.json: not a roadkit training run."
        )
    files = [os.path.join(checkpoint, name) for name in sorted(os.listdir(checkpoint))]
    for path in [os.path.join(directory, LOG_NAME), *files]:
        try:
            if path.endswith(".json"):
                with open(path, encoding="utf-8") as fh:
                    json.load(fh)
            elif path.endswith((".pt", ".pth", ".bin")):  # torch.save's zip archives: check every member's CRC
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    raise zipfile.BadZipFile(f"{bad} is corrupt")
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise InputError(f"{path}: cannot read the trainer state ({one_line(err)}); the file is damaged.") from err
    with open(os.path.join(directory, LOG_NAME), encoding="utf-8") as fh:
        log = json.load(fh)
    with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
        step = json.load(fh).get("global_step")
    if not isinstance(log, dict) or not isinstance(step, int):
        raise InputError(f"{os.fspath(directory)!r}: not a roadkit training run.")
    return {
        "step": step,
        "status": log.get("status"),
        "run": log.get("run"),
        "checkpoint": checkpoint,
        "log": {"train": log.get("train", []), "eval": log.get("eval", [])},
    }


def _refuse_diverged(directory: Union[str, os.PathLike]) -> None:
    """InputError when the run's training_log.json says it diverged (an unreadable log is load_state's to report)."""
    try:
        with open(os.path.join(directory, LOG_NAME), encoding="utf-8") as fh:
            log = json.load(fh)
    except (OSError, ValueError):
        return
    if isinstance(log, dict) and log.get("status") == DIVERGED:
        run = log.get("run")
        lr = run.get("lr") if isinstance(run, dict) else None
        raise InputError(
            f"the run in {os.fspath(directory)!r} diverged at step {log.get('diverged_at_step')} (see its {LOG_NAME}); "
            "resuming it would take the same steps again. Start a new run with a lower learning rate"
            + (f" than {lr:g}" if isinstance(lr, (int, float)) else "")
            + " (--overwrite replaces this one)."
        )


# ---- signals -----------------------------------------------------------------------------------

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


@contextmanager
def _handle_signals(handler: Any) -> Iterator[None]:
    """Install `handler` for SIGINT and SIGTERM, and restore the previous handlers afterwards. Signal
    handlers exist only in the main thread; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, before in previous.items():
            if before is None:  # installed outside Python: the closest default
                before = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, before)


@contextmanager
def signals_request_stop(stop: Any) -> Iterator[None]:
    """While training, the first SIGINT or SIGTERM sets `stop.requested`; the second raises KeyboardInterrupt."""

    def request_stop(signum: int, frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(
            f"\n{name}: stopping after this step to save a checkpoint (Ctrl-C again aborts without one).",
            file=sys.stderr,
            flush=True,
        )

    with _handle_signals(request_stop):
        yield


@contextmanager
def deferred_stop_signals() -> Iterator[list[int]]:
    """While the block runs, SIGINT and SIGTERM are only recorded (in the yielded list), never raised:
    for writing a finished or interrupted run, which a signal must not throw away halfway. A
    `TrainingRun.fit` inside the block installs its own handlers for the training loop and puts these back."""
    received: list[int] = []

    def record(signum: int, frame: Any) -> None:
        if not received:
            print("\nsaving the run; it stops once the files are in place.", file=sys.stderr, flush=True)
        received.append(signum)

    with _handle_signals(record):
        yield received


# ---- run settings (what `roadkit train` stores in a run and checks on --resume) ------------------

# Settings a resumed run takes from the interrupted one; giving a different value is an error.
RUN_FIXED = (
    "model",
    "data",
    "eval_data",
    "variant",
    "group_size",
    "targets",
    "subspace",
    "lr",
    "batch_size",
    "max_length",
    "bf16",
    "seed",
    "warmup_steps",
    "eval_every",
    "loss_on",
    "packing",
    "quantize",
)
# Settings that change how a run computes, not what: a resumed run may be given other values (more
# accumulation steps after running out of memory, say); left out, they are the run's.
RUN_ADJUSTABLE = ("gradient_accumulation_steps", "gradient_checkpointing", "report_to")
# The values live in `defaults` (the command's help reads them there too).
RUN_DEFAULTS: dict[str, Any] = {
    "variant": defaults.VARIANT,
    "group_size": defaults.GROUP_SIZE,
    "targets": defaults.TARGETS,
    "subspace": None,
    "lr": defaults.LR,
    "epochs": 1,
    "max_steps": defaults.MAX_STEPS,
    "batch_size": defaults.BATCH_SIZE,
    "max_length": defaults.MAX_LENGTH,
    "bf16": False,
    "seed": 0,
    "warmup_steps": 0,
    "eval_every": None,
    "eval_data": None,
    "loss_on": "assistant",
    "packing": False,
    "quantize": None,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "report_to": [],
}
_DATA_FILES = (("data", "data_sha256", "training data"), ("eval_data", "eval_data_sha256", "held-out data"))


def run_settings(
    given: dict[str, Any], output: Union[str, os.PathLike], resume: bool
) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """The settings of a run: `given` (None for "not given") over `RUN_DEFAULTS` for a new run, or, with
    `resume`, the settings stored in `output`'s trainer state, which `given` may only extend (`max_steps`,
    `epochs`) or adjust (`RUN_ADJUSTABLE`); returns them with that saved state (None for a new run). A
    setting an earlier roadkit did not store has its default. Paths must already be absolute.
    Raises InputError when a resumed run's settings or data files differ from the stored ones."""
    if not resume:
        run = {k: (RUN_DEFAULTS[k] if given.get(k) is None else given[k]) for k in (*RUN_DEFAULTS, "model", "data")}
        if given.get("epochs") is not None and given.get("max_steps") is None:
            run["max_steps"] = None  # --epochs alone: whole passes over the data, not the default step count
        for key, digest, _ in _DATA_FILES:
            run[digest] = file_sha256(run[key]) if run[key] is not None and os.path.isfile(run[key]) else None
        return run, None
    state = load_state(output)
    run = dict(state.get("run") or {})
    if "data" not in run:
        raise InputError(f"--resume: {os.fspath(output)!r} was not written by `roadkit train`.")
    for key, value in RUN_DEFAULTS.items():  # settings of a later roadkit: runs from before had the default
        run.setdefault(key, value)
    for key in RUN_FIXED:
        if given.get(key) is not None and given[key] != run.get(key):
            if key == "quantize":  # --load-in-4bit / --load-in-8bit
                stored = f"--load-in-{run[key]}" if run.get(key) else "unquantized base"
                problem = f"--load-in-{given[key]} differs from the run's {stored}"
            else:
                shown = given[key] if not isinstance(given[key], dict) else json.dumps(given[key])
                problem = f"--{key.replace('_', '-')} {shown} differs from the run's {run.get(key)}"
            raise InputError(f"--resume: {problem}; leave it out to use the run's.")
    run.update({key: given[key] for key in RUN_ADJUSTABLE if given.get(key) is not None})
    if given.get("max_steps") is not None:
        run["max_steps"] = given["max_steps"]
    elif given.get("epochs") is not None:
        run.update(epochs=given["epochs"], max_steps=None)
    for key, digest, what in _DATA_FILES:
        if run.get(key) is None or digest not in run:  # no such file, or a run that did not record it
            continue
        if not os.path.isfile(run[key]) or file_sha256(run[key]) != run[digest]:
            raise InputError(
                f"--resume: the {what} {run[key]} is missing or changed since the run started; "
                "resuming needs the same data."
            )
    return run, state
