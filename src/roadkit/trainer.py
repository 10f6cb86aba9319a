"""`RoadTrainer`: `transformers.Trainer` for a `RoadModel`, with adapter-only checkpoints; and the
training path of `roadkit train` and the demo, built on it with callbacks (`TrainingRun`, see `roadkit.train`).

Why a subclass and not the stock `Trainer`: the Trainer recognises adapter models only by
`isinstance(model, peft.PeftModel)` (`transformers.trainer_utils._is_peft_model`), with no
duck-typed hook a wrapper could provide, and treats every other model that is not a
`PreTrainedModel` as an opaque module. On a `RoadModel` the stock Trainer

* inspects `RoadModel.forward(*args, **kwargs)` to decide which batch columns the model takes,
  and drops them all ("The batch received was empty"), unless `remove_unused_columns=False`;
* finds no label names in that signature, so evaluation computes no loss;
* writes the whole model's state dict (`model.safetensors`) into every checkpoint, and resumes
  and loads the best model from that, not from the adapter;
* with label smoothing, checks the wrapper's class name to decide whether a causal LM's labels
  are shifted, and does not shift them.

`RoadTrainer` changes only those places, each by looking at the wrapped model (what the Trainer
does for PEFT models): checkpoints hold `adapter_config.json` + `adapter_model.safetensors` (every
adapter, PEFT's layout, as `RoadModel.save_pretrained` writes it), and resuming or
`load_best_model_at_end` copies the saved values into the live adapter parameters in place, so
the parameters the optimizer tracks stay the same objects. Everything else is the stock Trainer.
A model that is not a `RoadModel` is handled exactly as `Trainer` would.

Not covered: DeepSpeed ZeRO-3 and FSDP sharded checkpoints (the adapter is read from the live,
unsharded parameters), and quantized bases (the Trainer refuses those unless they are PEFT models).
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
from typing import Any, Optional, Sequence, cast

import torch
from torch import nn
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_pt_utils import LabelSmoother
from transformers.utils import can_return_loss, find_labels

from . import checkpoint as ckpt
from .data import IGNORE_INDEX, Sample, pad_token_id
from .model import RoadModel, _check_tensors
from .train import COMPLETED, INTERRUPTED, TrainConfig, signals_request_stop

TRAINING_ARGS_NAME = "training_args.bin"


class _ShiftedLabelSmoother(LabelSmoother):
    """Label smoothing with labels shifted by one, as the Trainer does for causal LMs it recognises."""

    def __call__(
        self, model_output: Any, labels: torch.Tensor, shift_labels: bool = True, num_items_in_batch: Any = None
    ) -> torch.Tensor:
        return super().__call__(model_output, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)


def _accepts_loss_kwargs(model: nn.Module) -> bool:
    """The Trainer's own test, applied to the wrapped model instead of the wrapper's `**kwargs`."""
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params)


def _reload_adapters(model: RoadModel, directory: str) -> list[str]:
    """Copy the adapter values saved in `directory` (PEFT layout) into `model`'s existing adapters, in place.

    Every adapter of `model` found there is loaded ("default" at the root, others in subfolders);
    the active adapters must all be there. Variant, group size and the exact tensor keys and shapes
    are checked before anything changes. Returns the names loaded.
    """
    found = {}
    for name in model.peft_config:
        sub = ckpt.adapter_subdir(directory, name)
        if os.path.isfile(os.path.join(sub, ckpt.WEIGHTS_NAME)) or os.path.isfile(
            os.path.join(sub, ckpt.LEGACY_WEIGHTS_NAME)
        ):
            found[name] = ckpt.read_adapter(sub)
    missing = [n for n in model.active_adapters if n not in found]
    if missing:
        raise ValueError(f"checkpoint {directory!r} holds no weights for the active adapter(s) {missing}.")
    for name, (config, tensors) in found.items():
        ours = model.peft_config[name]
        fields = ("variant", "group_size", "subspace")
        if any(getattr(config, f, None) != getattr(ours, f, None) for f in fields):
            raise ValueError(
                f"adapter {name!r} in {directory!r} was saved with "
                f"{ {f: getattr(config, f, None) for f in fields} }, but the model's has "
                f"{ {f: getattr(ours, f, None) for f in fields} }. Nothing was loaded."
            )
        expected = {k: t.shape for k, t in model.adapter_state_dict(name).items()}
        _check_tensors(expected, tensors, ckpt.adapter_subdir(directory, name))
    for name, (_, tensors) in found.items():
        model._load_tensors(name, tensors)
    return list(found)


class RoadTrainer(Trainer):
    """`transformers.Trainer` that saves, resumes and reloads a `RoadModel` by its adapters only.

    Use it exactly like `Trainer`; see the module docstring for what differs and why.
    """

    def __init__(self, model: Optional[nn.Module] = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        road = self._road_model()
        if road is not None:  # the Trainer inspected the wrapper's forward(*args, **kwargs): look at the base
            base = road.get_base_model()
            if self.args.label_names is None:
                self.label_names = find_labels(type(base))
            self.can_return_loss = can_return_loss(type(base))
            self.model_accepts_loss_kwargs = self.model_accepts_loss_kwargs and _accepts_loss_kwargs(base)
            if self.label_smoother is not None and base._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
                self.label_smoother = _ShiftedLabelSmoother(
                    self.label_smoother.epsilon, self.label_smoother.ignore_index
                )

    def _road_model(self, model: Optional[nn.Module] = None) -> Optional[RoadModel]:
        """The `RoadModel` under any DDP / compile wrapper, or None."""
        model = self.model if model is None else model
        if model is None:
            return None
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped = getattr(unwrapped, "_orig_mod", unwrapped)  # torch.compile, on any accelerate version
        return unwrapped if isinstance(unwrapped, RoadModel) else None

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the batch columns the wrapped model's forward takes (and the labels)."""
        road = self._road_model()
        if self._signature_columns is None and road is not None:
            columns = list(inspect.signature(road.get_base_model().forward).parameters)
            # transformers declares the attribute as None; it holds a list of column names once set
            self._signature_columns = columns + sorted(  # type: ignore[assignment]
                {"label", "label_ids", *self.label_names} - set(columns)
            )
        super()._set_signature_columns_if_needed()

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """Write the adapters (PEFT layout), the processing class and the training arguments."""
        road = self._road_model()
        if road is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        if output_dir is None:
            raise ValueError("RoadTrainer has no output_dir to save to: set TrainingArguments(output_dir=...).")
        os.makedirs(output_dir, exist_ok=True)
        road.save_pretrained(output_dir)
        tokenizer = getattr(self.data_collator, "tokenizer", None)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        """Resume: copy the checkpoint's adapter values into the model's adapters."""
        road = self._road_model(model)
        if road is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _reload_adapters(road, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: copy the best checkpoint's adapter values into the model's adapters."""
        road = self._road_model()
        if road is None:
            return super()._load_best_model()
        if self.state.best_model_checkpoint is not None:
            _reload_adapters(road, self.state.best_model_checkpoint)
        return None


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
        if _on_any_process(self.requested, args.device):
            control.should_save = control.should_training_stop = True
        if state.global_step >= state.max_steps:
            control.should_save = True
            control.should_evaluate = control.should_evaluate or args.eval_strategy != "no"


def _on_any_process(flag: bool, device: torch.device) -> bool:
    """`flag` or-ed over the processes of a distributed run, so that all of them stop at the same step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


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


def _collator(tokenizer: Any) -> DataCollatorForSeq2Seq:
    """Right padding with the tokenizer's pad token (else its end-of-sequence token); labels padded with
    IGNORE_INDEX. Works on a copy: the caller's tokenizer keeps its settings."""
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = pad_token_id(tokenizer, default=0)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)


def _rows(samples: Sequence[Sample]) -> list[dict[str, list[int]]]:
    return [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]


class TrainingRun:
    """Trains the parameters of `model` that require grad on `Sample`s, through a `RoadTrainer`
    (`self.road_trainer`). Checkpoints go to `output_dir` (default: a temporary directory kept while
    this object lives); `self.checkpoint` is the last one written. Under torchrun every process runs one,
    with the same `output_dir`, and the processes split each batch (DDP)."""

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
            raise ValueError("no training samples.")
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters.")
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if config.batch_size % processes:
            raise ValueError(f"the batch size {config.batch_size} does not split evenly over {processes} processes.")
        self.model, self.config = model, config
        self.train_data, self.eval_data = list(train_data), list(eval_data or [])
        self.total_steps = config.max_steps or config.epochs * math.ceil(len(self.train_data) / config.batch_size)
        self.eval_every = config.eval_every or max(1, self.total_steps // 10)
        self.step, self.checkpoint = 0, cast(Optional[str], None)
        if output_dir is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="roadkit-train-")
            output_dir = self._scratch.name
        self.run_log, self.stop = RunLog(), StopOnRequest()
        self.progress = Progress(self.run_log)
        device = self.params[0].device
        if device.type == "cuda" and device.index is not None and processes == 1:
            torch.cuda.set_device(device)  # the Trainer moves the model to the current CUDA device
        share = config.batch_size // processes
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=self.total_steps,
            per_device_train_batch_size=share,
            per_device_eval_batch_size=share,
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
            report_to="none",
            disable_tqdm=True,
            use_cpu=device.type == "cpu",
            dataloader_num_workers=0,
        )
        self.road_trainer = RoadTrainer(
            model=model,
            args=args,
            data_collator=_collator(tokenizer),
            train_dataset=_rows(self.train_data),
            eval_dataset=_rows(self.eval_data) or None,
            callbacks=[self.run_log, self.stop, ResumeSchedule(), self.progress],
        )
        for callback in (ProgressCallback, PrinterCallback):
            self.road_trainer.remove_callback(callback)

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
        after a SIGINT or SIGTERM. Either way a checkpoint is written. `progress=None` shows a bar on terminals."""
        trainer = self.road_trainer
        trainer.args.eval_on_start = self._eval_due()
        self.progress.enabled, self.stop.requested = progress, False
        with signals_request_stop(self.stop):
            trainer.train(resume_from_checkpoint=self.checkpoint)
        self.step = trainer.state.global_step
        self.checkpoint = os.path.join(str(trainer.args.output_dir), f"checkpoint-{self.step}")
        return INTERRUPTED if self.step < self.total_steps else COMPLETED

    def evaluate(self, data: Optional[Sequence[Sample]] = None) -> float:
        """Mean token loss over `data` (default: the eval set), batch by batch."""
        rows = _rows(self.eval_data if data is None else data)
        # a list of rows serves as a dataset (indexable, with a length)
        return float(self.road_trainer.evaluate(eval_dataset=cast(Any, rows), metric_key_prefix="data")["data_loss"])
