"""A plain training loop for adapters: AdamW, a linear schedule, periodic evaluation, Ctrl-C and resume.

`Trainer` trains whatever parameters of a model require grad (a `RoadModel` leaves only its active
adapters trainable) on tokenized `Sample`s with a token-level cross-entropy. Batches follow a
fixed shuffled order per epoch (seeded by `seed + epoch`), so a run resumed at step k sees the
same batches an uninterrupted run would. The first Ctrl-C (SIGINT) or SIGTERM asks the loop to
stop after the current step, leaving the model, optimizer and schedule consistent for a
checkpoint; a second one aborts at once.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from . import defaults
from .data import IGNORE_INDEX, Sample, collate
from .fileio import atomic_write_bytes
from .loading import one_line

STATE_NAME = "trainer_state.pt"
LOG_NAME = "training_log.json"
CURVE_NAME = "loss_curve.png"
COMPLETED, INTERRUPTED = "completed", "interrupted"


@dataclass
class TrainConfig:
    """Hyperparameters of one run. `max_steps`, when set, overrides `epochs`; `eval_every=None`
    evaluates about ten times per run (and before the first step)."""

    lr: float = defaults.LR
    epochs: int = 1
    max_steps: Optional[int] = None
    batch_size: int = defaults.BATCH_SIZE
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    eval_every: Optional[int] = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("max_steps", "eval_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must not be negative, got {self.warmup_steps}.")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be positive, got {self.lr}.")


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled tokens, their count) for one batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    total = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                        ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((labels != IGNORE_INDEX).sum())


class Trainer:
    """Trains the parameters of `model` that require grad; keeps a log of losses and learning rates."""

    def __init__(self, model: nn.Module, train_data: Sequence[Sample], config: TrainConfig, pad_id: int,
                 eval_data: Optional[Sequence[Sample]] = None) -> None:
        if not train_data:
            raise ValueError("no training samples.")
        self.model, self.config, self.pad_id = model, config, pad_id
        self.train_data, self.eval_data = list(train_data), list(eval_data or [])
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters.")
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.log: dict[str, list[dict[str, float]]] = {"train": [], "eval": []}
        self.stop_requested = False

    # ---- schedule ------------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_data) / self.config.batch_size)

    @property
    def total_steps(self) -> int:
        return self.config.max_steps or self.config.epochs * self.steps_per_epoch

    @property
    def eval_every(self) -> int:
        return self.config.eval_every or max(1, self.total_steps // 10)

    def _lr_factor(self, step: int) -> float:
        """Linear warmup over `warmup_steps`, then linear decay to zero at `total_steps`."""
        warmup = self.config.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup))

    def _batches(self) -> Iterator[list[Sample]]:
        """Batches from the current step on, in the order an uninterrupted run would use."""
        size, per_epoch = self.config.batch_size, self.steps_per_epoch
        epoch, offset = divmod(self.step, per_epoch)
        while True:
            order = torch.randperm(len(self.train_data),
                                   generator=torch.Generator().manual_seed(self.config.seed + epoch)).tolist()
            for i in range(offset, per_epoch):
                yield [self.train_data[j] for j in order[i * size:(i + 1) * size]]
            epoch, offset = epoch + 1, 0

    # ---- steps ---------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self.params[0].device

    def _to_device(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        return {k: v.to(self._device()) for k, v in collate(samples, self.pad_id).items()}

    def train_step(self, samples: Sequence[Sample]) -> float:
        """One optimizer step on one batch; returns the batch's mean token loss."""
        self.model.train()
        total, count = token_loss(self.model, self._to_device(samples))
        loss = total / max(count, 1)
        loss.backward()
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self, data: Optional[Sequence[Sample]] = None) -> Optional[float]:
        """Mean token loss over `data` (default: the eval set); None if a Ctrl-C cut it short."""
        data = self.eval_data if data is None else list(data)
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            for i in range(0, len(data), self.config.batch_size):
                if self.stop_requested:
                    return None
                part_total, part_count = token_loss(self.model, self._to_device(data[i:i + self.config.batch_size]))
                total, count = total + float(part_total), count + part_count
        finally:
            self.model.train(was_training)
        return total / max(count, 1)

    def _eval_due(self) -> bool:
        """Whether the current step should be evaluated (before training, every `eval_every` steps and at the
        end) and has not been."""
        due = self.step == 0 or self.step % self.eval_every == 0 or self.step == self.total_steps
        return bool(self.eval_data) and due and not (self.log["eval"] and self.log["eval"][-1]["step"] == self.step)

    def _record_eval(self) -> bool:
        loss = self.evaluate()
        if loss is None:
            return False
        self.log["eval"].append({"step": self.step, "loss": loss})
        return True

    def fit(self, progress: Optional[bool] = None) -> str:
        """Train up to `total_steps`; returns COMPLETED, or INTERRUPTED after a Ctrl-C (the state is then
        consistent at `self.step`, ready for `state_dict`). `progress=None` shows a bar on terminals."""
        from tqdm.auto import tqdm

        self.stop_requested = False
        with _sigint_requests_stop(self), tqdm(total=self.total_steps, initial=self.step, desc="training",
                                                disable=None if progress is None else not progress,
                                                dynamic_ncols=True) as bar:
            if self._eval_due() and not self._record_eval():  # before training, or one a Ctrl-C cut short
                return INTERRUPTED
            batches = self._batches()
            while self.step < self.total_steps:
                if self.stop_requested:
                    return INTERRUPTED
                lr = self.scheduler.get_last_lr()[0]
                loss = self.train_step(next(batches))
                self.step += 1
                self.log["train"].append({"step": self.step, "loss": loss, "lr": lr})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if self._eval_due():
                    if not self._record_eval():
                        return INTERRUPTED
                    bar.write(f"step {self.step}/{self.total_steps}: eval loss {self.log['eval'][-1]['loss']:.4f}")
        return COMPLETED

    # ---- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model needed to continue exactly: optimizer, schedule, step, RNG, log."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng, "log": self.log, "config": asdict(self.config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` taken from a trainer over the same model and data."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        # The saved learning rates follow the saved schedule; a resumed run may have a longer one
        # (a larger max_steps or epochs), so recompute them from this trainer's schedule.
        self.scheduler.last_epoch = self.step
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base_lr * self._lr_factor(self.step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.log = {"train": list(state["log"]["train"]), "eval": list(state["log"]["eval"])}
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def save_state(directory: Union[str, os.PathLike], state: dict[str, Any]) -> None:
    """Write a trainer state (plus whatever the caller added to it) as `trainer_state.pt`, atomically."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(os.path.join(directory, STATE_NAME), buffer.getvalue())


def load_state(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    """Read `trainer_state.pt` from a run directory (tensors and plain Python values only)."""
    path = os.path.join(directory, STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.fspath(directory)!r} holds no {STATE_NAME}: not a roadkit training run.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or corrupt: torch raises RuntimeError, EOFError, UnpicklingError...
        raise ValueError(f"{path}: cannot read the trainer state ({one_line(err)}); the file is damaged.") from err
    if not isinstance(state, dict) or "step" not in state:
        raise ValueError(f"{path}: not a roadkit trainer state.")
    return state


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
def _sigint_requests_stop(trainer: Trainer) -> Iterator[None]:
    """While training, the first SIGINT or SIGTERM sets `trainer.stop_requested`; the second raises
    KeyboardInterrupt."""

    def request_stop(signum: int, frame: Any) -> None:
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step to save a checkpoint (Ctrl-C again aborts without one).",
              file=sys.stderr, flush=True)

    with _handle_signals(request_stop):
        yield


@contextmanager
def deferred_stop_signals() -> Iterator[list[int]]:
    """While the block runs, SIGINT and SIGTERM are only recorded (in the yielded list), never raised:
    for writing a finished or interrupted run, which a signal must not throw away halfway. A
    `Trainer.fit` inside the block installs its own handlers for the training loop and puts these back."""
    received: list[int] = []

    def record(signum: int, frame: Any) -> None:
        if not received:
            print("\nsaving the run; it stops once the files are in place.", file=sys.stderr, flush=True)
        received.append(signum)

    with _handle_signals(record):
        yield received


def write_run(directory: Union[str, os.PathLike], model: nn.Module, trainer: Trainer, status: str,
              run: dict[str, Any]) -> None:
    """Write a run directory: the adapter (`model.save_pretrained`), `trainer_state.pt` for resuming,
    `training_log.json` and `loss_curve.png`. `run` (JSON-able settings) is stored in both files."""
    from .plots import loss_curves

    model.save_pretrained(directory)
    save_state(directory, {**trainer.state_dict(), "run": run, "status": status})
    log = {"status": status, "step": trainer.step, "total_steps": trainer.total_steps,
           "trainable_parameters": sum(p.numel() for p in trainer.params), "run": run, **trainer.log}
    atomic_write_bytes(os.path.join(directory, LOG_NAME), (json.dumps(log, indent=1) + "\n").encode())
    loss_curves({"run": trainer.log}, os.path.join(directory, CURVE_NAME),
                title=f"training loss ({status} at step {trainer.step}/{trainer.total_steps})")


# ---- run settings (what `roadkit train` stores in a run and checks on --resume) ------------------

# Settings a resumed run takes from the interrupted one; giving a different value is an error.
RUN_FIXED = ("model", "data", "eval_data", "variant", "group_size", "targets", "subspace", "lr", "batch_size",
             "max_length", "bf16", "seed", "warmup_steps", "eval_every")
# The values live in `defaults` (the command's help reads them there too).
RUN_DEFAULTS: dict[str, Any] = {"variant": defaults.VARIANT, "group_size": defaults.GROUP_SIZE,
                                "targets": defaults.TARGETS, "subspace": None, "lr": defaults.LR, "epochs": 1,
                                "max_steps": defaults.MAX_STEPS, "batch_size": defaults.BATCH_SIZE,
                                "max_length": defaults.MAX_LENGTH, "bf16": False, "seed": 0, "warmup_steps": 0,
                                "eval_every": None, "eval_data": None}
_DATA_FILES = (("data", "data_sha256", "training data"), ("eval_data", "eval_data_sha256", "held-out data"))


def run_settings(given: dict[str, Any], output: Union[str, os.PathLike],
                 resume: bool) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """The settings of a run: `given` (None for "not given") over `RUN_DEFAULTS` for a new run, or, with
    `resume`, the settings stored in `output`'s trainer state, which `given` may only extend (`max_steps`,
    `epochs`); returns them with that saved state (None for a new run). Paths must already be absolute.
    Raises ValueError when a resumed run's settings or data files differ from the stored ones."""
    from .fileio import file_sha256

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
        raise ValueError(f"--resume: {os.fspath(output)!r} was not written by `roadkit train`.")
    run.setdefault("subspace", None)  # runs from before --subspace trained every pair
    for key in RUN_FIXED:
        if given.get(key) is not None and given[key] != run.get(key):
            shown = given[key] if not isinstance(given[key], dict) else json.dumps(given[key])
            raise ValueError(f"--resume: --{key.replace('_', '-')} {shown} differs from the run's "
                             f"{run.get(key)}; leave it out to use the run's.")
    if given.get("max_steps") is not None:
        run["max_steps"] = given["max_steps"]
    elif given.get("epochs") is not None:
        run.update(epochs=given["epochs"], max_steps=None)
    for key, digest, what in _DATA_FILES:
        if run.get(key) is None or digest not in run:  # no such file, or a run that did not record it
            continue
        if not os.path.isfile(run[key]) or file_sha256(run[key]) != run[digest]:
            raise ValueError(f"--resume: the {what} {run[key]} is missing or changed since the run started; "
                             "resuming needs the same data.")
    return run, state
