"""`TrainingRun`: the training of `roadkit train` and the demo, a `RoadTrainer` with callbacks.

It trains whatever parameters of a model require grad (a `RoadModel` leaves only its active adapters
trainable) on tokenized `Sample`s with transformers' AdamW, linear schedule (`lr_scheduler_type="linear"`),
`DataCollatorForSeq2Seq` (labels padded with IGNORE_INDEX; with packing, `DataCollatorWithFlattening`) and the
model's own causal-LM loss, with the token count averaged across processes and accumulation steps, so a DDP run
(torchrun) or one in micro-batches takes the steps one process would on the same global batch. Every process of
a DDP run writes its checkpoints into the same directory (the first process's), so a checkpoint holds every
process's random state. What roadkit adds are callbacks:

* `RunLog` keeps the per-step loss and learning rate and the held-out losses;
* `StopOnRequest` ends training after the current step with a checkpoint once the first SIGINT or
  SIGTERM arrived (a second one aborts at once), and evaluates and saves at the last step;
* `ResumeSchedule` recomputes the learning rate of a resumed run from its (possibly longer) schedule;
* `Progress` draws the progress bar and prints the periodic held-out loss.

`RoadTrainer` adds `StopOnDivergence` (roadkit.integrations.trainer): after every step it checks the
adapter's values and the step's loss, and at the first step that breaks them it stops the run and puts
back the adapter of the last good step; `fit` then returns DIVERGED, and no checkpoint of the broken
step is written. The Trainer's `logging_nan_inf_filter` is off, so the log shows a NaN loss as NaN
(null in training_log.json), not as the mean of the steps before it.

Resuming is the Trainer's: optimizer, schedule, RNG states and the data order are restored from
the checkpoint, so a run resumed at step k takes the steps an uninterrupted run would.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import os
import shutil
import tempfile
from typing import Any, Optional, Sequence, Union, cast

import torch
from torch import nn
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..errors import InputError
from ..fileio import atomic_write_bytes
from ..integrations.trainer import RoadTrainer, StopOnDivergence, any_process
from ..model import RoadModel
from .data import IGNORE_INDEX, Sample, pad_token_id
from .runs import (
    CHECKPOINT_NAME,
    COMPLETED,
    CURVE_NAME,
    DIVERGED,
    INTERRUPTED,
    LOG_NAME,
    TENSORBOARD_NAME,
    TrainConfig,
    signals_request_stop,
)

# ---- callbacks ---------------------------------------------------------------------------------


class RunLog(TrainerCallback):
    """Keeps {"train": [{"step", "loss", "lr"}], "eval": [{"step", "loss"}]}: the learning rate each step
    used, and the loss on the eval set (not on data passed to `TrainingRun.evaluate`)."""

    def __init__(self) -> None:
        self.log: dict[str, list[dict[str, float]]] = {"train": [], "eval": []}
        self._lr = float("nan")

    def on_step_begin(
        self, args: TrainingArguments, state: Any, control: Any, lr_scheduler: Any = None, **kwargs: Any
    ) -> None:
        self._lr = float(lr_scheduler.get_last_lr()[0])

    def on_log(
        self, args: TrainingArguments, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any
    ) -> None:
        if logs and "loss" in logs:
            self.log["train"].append({"step": state.global_step, "loss": float(logs["loss"]), "lr": self._lr})

    def on_evaluate(
        self, args: TrainingArguments, state: Any, control: Any, metrics: Optional[dict] = None, **kwargs: Any
    ) -> None:
        evals = self.log["eval"]
        if metrics and "eval_loss" in metrics and not (evals and evals[-1]["step"] == state.global_step):
            evals.append({"step": state.global_step, "loss": float(metrics["eval_loss"])})


class StopOnRequest(TrainerCallback):
    """Once `requested` is set (by a signal, on any process), stop after the current step with a
    checkpoint; at the last step, evaluate (when there is an eval set) and save."""

    def __init__(self) -> None:
        self.requested = False

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if any_process(self.requested, args.device):
            control.should_save = control.should_training_stop = True
        if state.global_step >= state.max_steps:
            control.should_save = True
            control.should_evaluate = control.should_evaluate or args.eval_strategy != "no"


class ResumeSchedule(TrainerCallback):
    """A resumed run restores the schedule's step but keeps this run's schedule, which may be longer (a larger
    `max_steps`): recompute the learning rate for the step, as the saved one followed the old schedule."""

    def on_train_begin(
        self, args: TrainingArguments, state: Any, control: Any, lr_scheduler: Any = None, **kwargs: Any
    ) -> None:
        if state.global_step and lr_scheduler is not None:
            lr_scheduler.last_epoch -= 1
            lr_scheduler.step()  # sets the optimizer's learning rates for `last_epoch` from the lambdas


class Progress(TrainerCallback):
    """A progress bar with the last loss and learning rate (`enabled=None`: on terminals only), and a line per
    held-out evaluation after the first step."""

    def __init__(self, run_log: RunLog) -> None:
        self.run_log, self.bar = run_log, None
        self.enabled: Optional[bool] = None  # None: a bar on terminals only

    def on_train_begin(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="training",
                dynamic_ncols=True,
                disable=None if self.enabled is None else not self.enabled,
            )

    def on_log(
        self, args: TrainingArguments, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any
    ) -> None:
        if self.bar is not None and logs and "loss" in logs:
            last = self.run_log.log["train"][-1]
            self.bar.update(state.global_step - self.bar.n)
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}")

    def on_evaluate(
        self, args: TrainingArguments, state: Any, control: Any, metrics: Optional[dict] = None, **kwargs: Any
    ) -> None:
        if self.bar is not None and state.global_step and metrics and "eval_loss" in metrics:
            self.bar.write(f"step {state.global_step}/{state.max_steps}: eval loss {metrics['eval_loss']:.4f}")

    def on_train_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---- the trainer -------------------------------------------------------------------------------


def collator(tokenizer: Any) -> DataCollatorForSeq2Seq:
    """Right padding with the tokenizer's pad token (else its end-of-sequence token); labels padded with
    IGNORE_INDEX. Works on a copy: the caller's tokenizer keeps its settings."""

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad_token_id(tokenizer, default=0)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)


def _rows(samples: Sequence[Sample]) -> list[dict[str, list[int]]]:
    return [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]


def _checkpointing_arguments() -> dict[str, Any]:
    """TrainingArguments' keywords for gradient checkpointing without reentrant autograd (which DDP and a frozen
    base both work with): `activation_checkpointing` since transformers 5.x, `gradient_checkpointing` before."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {key: True, f"{key}_kwargs": {"use_reentrant": False}}


def _distributed() -> bool:
    """Whether this process is one of several in a torch.distributed process group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _check_packing(model: nn.Module) -> None:
    """InputError unless the model takes `position_ids`, which keep packed rows apart."""
    base = model.get_base_model() if isinstance(model, RoadModel) else model
    if "position_ids" not in inspect.signature(base.forward).parameters:
        raise InputError(
            f"--packing needs a model that takes position_ids (they keep packed rows apart); "
            f"{type(base).__name__} does not."
        )


class TrainingRun:
    """Trains the parameters of `model` that require grad on `Sample`s, through a `RoadTrainer`
    (`self.road_trainer`). Checkpoints go to `output_dir` (default: a temporary directory kept while
    this object lives); `self.checkpoint` is the last one written. Under torchrun every process runs one,
    with the same `output_dir` (or none: they all use the first process's temporary one), and the processes
    split each batch (DDP).

    After a `fit` that returned DIVERGED, `diverged_at` is the step that broke the adapter, `divergence`
    says how, and `step` is the step whose adapter the model holds again (the last good one, or the one
    the run started from); `checkpoint` stays the one the run started from (None for a new run)."""

    def __init__(
        self,
        model: nn.Module,
        train_data: Sequence[Sample],
        config: TrainConfig,
        tokenizer: Any,
        eval_data: Optional[Sequence[Sample]] = None,
        output_dir: Optional[str] = None,
    ) -> None:
        if not train_data:
            raise InputError("no training samples.")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise InputError("the model has no trainable parameters.")
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        parts = processes * config.gradient_accumulation_steps
        if config.batch_size % parts:
            raise InputError(
                f"the batch size {config.batch_size} does not split evenly over {processes} processes x "
                f"{config.gradient_accumulation_steps} gradient accumulation steps."
            )
        if config.packing:
            _check_packing(model)
        self.model, self.config, self.processes = model, config, processes
        self.train_data, self.eval_data = list(train_data), list(eval_data or [])
        self.total_steps = config.max_steps or config.epochs * math.ceil(len(self.train_data) / config.batch_size)
        self.eval_every = config.eval_every or max(1, self.total_steps // 10)
        self.step, self.checkpoint = 0, cast(Optional[str], None)
        self.first_step = 0  # the step the last `fit` started from
        self.diverged_at: Optional[int] = None
        self.divergence: Optional[str] = None
        scratch = output_dir is None
        if output_dir is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="roadkit-train-")
            output_dir = self._scratch.name
        self.run_log, self.stop = RunLog(), StopOnRequest()
        self.progress = Progress(self.run_log)
        device = self.params[0].device
        if device.type == "cuda" and device.index is not None and processes == 1:
            torch.cuda.set_device(device)  # the Trainer moves the model to the current CUDA device
        share = config.batch_size // parts
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=self.total_steps,
            per_device_train_batch_size=share,
            per_device_eval_batch_size=share,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            learning_rate=config.lr,
            lr_scheduler_type="linear",
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm or 0.0,
            optim="adamw_torch",
            seed=config.seed,
            eval_strategy="steps" if self.eval_data else "no",
            eval_steps=self.eval_every,
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,
            logging_nan_inf_filter=False,  # a NaN loss is logged as NaN, not as the running mean
            report_to=list(config.report_to) or "none",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
            ddp_find_unused_parameters=False,  # the adapters in use take part in every step; the others do not train
            **(_checkpointing_arguments() if config.gradient_checkpointing else {}),
        )
        if scratch and args.world_size > 1 and _distributed():
            shared = [output_dir]  # every process checkpoints into the first one's directory
            torch.distributed.broadcast_object_list(shared, src=0)
            args.output_dir = shared[0]
        self.road_trainer = RoadTrainer(
            model=model,
            args=args,
            data_collator=(
                DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
                if config.packing
                else collator(tokenizer)
            ),
            train_dataset=_rows(self.train_data),
            eval_dataset=_rows(self.eval_data) or None,
            callbacks=[self.run_log, self.stop, ResumeSchedule(), self.progress],
        )
        for callback in (ProgressCallback, PrinterCallback):
            self.road_trainer.remove_callback(callback)
        # TensorBoard events go beside the checkpoints, to be copied into the run directory (`write_run`), unless
        # TENSORBOARD_LOGGING_DIR chose a place for them.
        self.tensorboard_dir: Optional[str] = None
        for callback in self.road_trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and not os.environ.get("TENSORBOARD_LOGGING_DIR"):
                callback.logging_dir = self.tensorboard_dir = os.path.join(str(args.output_dir), TENSORBOARD_NAME)
        guard = self.road_trainer.divergence_guard
        if guard is None:  # not a RoadModel: check its trainable parameters for NaN and infinite values
            guard = StopOnDivergence()
            self.road_trainer.add_callback(guard)
        self.guard = guard

    @property
    def log(self) -> dict[str, list[dict[str, float]]]:
        return self.run_log.log

    def resume(self, state: dict[str, Any]) -> None:
        """Continue from a `load_state` result: its step, log and checkpoint."""
        self.step, self.checkpoint = int(state["step"]), state["checkpoint"]
        self.run_log.log = {"train": list(state["log"]["train"]), "eval": list(state["log"]["eval"])}

    def _eval_due(self) -> bool:
        """Whether the current step should be evaluated (before training, every `eval_every` steps and at the
        end) and has not been."""
        due = self.step == 0 or self.step % self.eval_every == 0 or self.step == self.total_steps
        evals = self.log["eval"]
        return bool(self.eval_data) and due and not (evals and evals[-1]["step"] == self.step)

    def fit(self, progress: Optional[bool] = None) -> str:
        """Train up to `total_steps` (from the checkpoint given to `resume`); returns COMPLETED, or INTERRUPTED
        after a SIGINT or SIGTERM, with a checkpoint written either way; or DIVERGED when a step made the
        adapter's values or the loss NaN, infinite or degenerate: then the model holds the adapter of the
        last good step (`self.step`) and no checkpoint is written. `progress=None` shows a bar on terminals."""
        trainer = self.road_trainer
        trainer.args.eval_on_start = self._eval_due()
        self.progress.enabled, self.stop.requested = progress, False
        self.first_step, self.diverged_at, self.divergence = self.step, None, None
        with signals_request_stop(self.stop):
            trainer.train(resume_from_checkpoint=self.checkpoint)
        if _distributed():
            torch.distributed.barrier()  # every process has written its part of the last checkpoint
        if self.guard.diverged_at is not None:
            self.diverged_at, self.divergence = self.guard.diverged_at, self.guard.reason
            self.step = cast(int, self.guard.kept_step)
            return DIVERGED
        self.step = trainer.state.global_step
        self.checkpoint = os.path.join(str(trainer.args.output_dir), f"checkpoint-{self.step}")
        return INTERRUPTED if self.step < self.total_steps else COMPLETED

    def evaluate(self, data: Optional[Sequence[Sample]] = None) -> float:
        """Mean token loss over `data` (default: the eval set), batch by batch."""
        rows = _rows(self.eval_data if data is None else data)
        # a list of rows serves as a dataset (indexable, with a length)
        return float(self.road_trainer.evaluate(eval_dataset=cast(Any, rows), metric_key_prefix="data")["data_loss"])


def write_run(
    directory: Union[str, os.PathLike], model: RoadModel, trainer: TrainingRun, status: str, run: dict[str, Any]
) -> None:
    """Write a run directory: the adapter (`model.save_pretrained`), the trainer's last checkpoint as
    `checkpoint/` for resuming, `training_log.json` (with `run`, JSON-able settings, and the number of
    `processes`), `loss_curve.png`, and the TensorBoard events in `tensorboard/` when there are some.

    For a DIVERGED run the log also holds `diverged_at_step` and `divergence`, `step` is the step of the
    adapter kept, and the adapter is written only when that step is past the one the run started from
    (a new run that broke in its first step gets no adapter; a resumed one keeps the adapter it had).
    Non-finite losses are written as null (training_log.json stays strict JSON)."""
    from .plots import loss_curves

    diverged = status == DIVERGED
    if not diverged or trainer.step > trainer.first_step:
        model.save_pretrained(directory)
    if trainer.checkpoint is not None:
        shutil.copytree(trainer.checkpoint, os.path.join(directory, CHECKPOINT_NAME), dirs_exist_ok=True)
    if trainer.tensorboard_dir is not None and os.path.isdir(trainer.tensorboard_dir):
        shutil.copytree(trainer.tensorboard_dir, os.path.join(directory, TENSORBOARD_NAME), dirs_exist_ok=True)
    log: dict[str, Any] = {"status": status, "step": trainer.step, "processes": trainer.processes}
    if diverged:
        log.update(diverged_at_step=trainer.diverged_at, divergence=trainer.divergence)
    log.update(
        total_steps=trainer.total_steps,
        trainable_parameters=sum(p.numel() for p in trainer.params),
        run=run,
        **trainer.log,
    )
    atomic_write_bytes(os.path.join(directory, LOG_NAME), (json.dumps(_finite_or_null(log), indent=1) + "\n").encode())
    at = trainer.diverged_at if diverged else trainer.step
    loss_curves(
        {"run": trainer.log},
        os.path.join(directory, CURVE_NAME),
        title=f"training loss ({status} at step {at}/{trainer.total_steps})",
    )


def _finite_or_null(value: Any) -> Any:
    """`value` with NaN and infinite floats (in dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value
