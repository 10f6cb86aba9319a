"""`RoadTrainer`: `transformers.Trainer` for a `RoadModel`, with adapter-only checkpoints.

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

Not covered: DeepSpeed ZeRO-3 and adapter parameters sharded by FSDP (the adapter is read from the live,
unsharded parameters; a base that transformers shards as it loads it works, see docs/training.md), and
quantized bases (the Trainer refuses those unless they are PEFT models).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Optional

import torch
from torch import nn
from transformers import Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_pt_utils import LabelSmoother
from transformers.utils import can_return_loss, find_labels

from .. import checkpoint as ckpt
from ..model import RoadModel

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
        model.check_adapter_values(name, tensors, ckpt.adapter_subdir(directory, name))
    for name, (_, tensors) in found.items():
        model.load_adapter_values(name, tensors, ckpt.adapter_subdir(directory, name))
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
