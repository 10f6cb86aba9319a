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
the parameters the optimizer tracks stay the same objects. For a `RoadModel` it also stops a run
whose adapter diverged (`StopOnDivergence`, added by default). Everything else is the stock
Trainer. A model that is not a `RoadModel` is handled exactly as `Trainer` would.

Other trainers built on `Trainer` (TRL's `SFTTrainer`, `DPOTrainer`, `GRPOTrainer`, ...) get the same behaviour
from `road_trainer(cls)`, a subclass that puts `RoadTrainer` in front of `cls` (without changing `cls`), lets `cls`
choose its own batch columns, accepts a `roadkit.RoadConfig` where `cls` takes a `peft_config`, and gives
preference trainers a reference model that costs no memory (`AdapterReference`). See docs/training.md.

Not covered: DeepSpeed ZeRO-3 and adapter parameters sharded by FSDP (the adapter is read from the live,
unsharded parameters; a base that transformers shards as it loads it works, see docs/training.md), and
quantized bases (the Trainer refuses those unless they are PEFT models).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional, TypeVar, cast

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer_pt_utils import LabelSmoother
from transformers.utils import can_return_loss, find_labels

from .. import checkpoint as ckpt
from ..config import RoadConfig
from ..functional import value_problem
from ..model import RoadModel, get_peft_model

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


def any_process(flag: bool, device: torch.device) -> bool:
    """`flag` or-ed over the processes of a distributed run, so that all of them stop at the same step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _road_model_in(model: Optional[nn.Module]) -> Optional[RoadModel]:
    """The `RoadModel` inside `model` (itself, or under DDP's `module` / torch.compile's `_orig_mod`), or None."""
    for _ in range(4):
        if model is None or isinstance(model, RoadModel):
            return model
        model = model._modules.get("module") or model._modules.get("_orig_mod")
    return None


class StopOnDivergence(TrainerCallback):
    """Stops a `RoadModel`'s training at the first step that breaks it, and puts back the last good values.

    After every optimizer step it checks the model's trainable parameters, the ground truth (a logged
    loss is a mean over `logging_steps`, and the Trainer replaces a NaN loss by the running mean,
    `logging_nan_inf_filter`): the values of every RoAd layer with `functional.value_problem` (NaN or
    infinite values, degenerate rotations: what `RoadModel.from_pretrained` refuses to load), other
    trainable parameters (`modules_to_save`) for NaN or infinite values, and the losses of the step,
    which `RoadTrainer.training_step` reports to `observe_loss`. At the first bad step it

    * records the step (`diverged_at`), why (`reason`, one phrase) and the step whose values it
      kept (`kept_step`: the last good step, or the one training started from);
    * copies those values back into the parameters, so the model, and whatever is saved from it
      afterwards, holds the adapter of `kept_step`;
    * stops training and cancels that step's evaluation and checkpoint (the checkpoints written
      before it passed the check). The optimizer's state is not put back: the run ends there.

    Training that starts from unusable values raises ValueError. The cost: one copy of the trainable
    parameters (for RoAd alone, `d_out` values or fewer per layer), one pass over them and a host sync
    per step, and under DDP one all-reduce of a flag, so that every process stops at the same step.

    `RoadTrainer` adds one for a `RoadModel` by default (its `divergence_guard`): a diverged adapter is
    never useful, and without the check the Trainer keeps stepping on NaN values and writes checkpoints
    that `RoadModel.from_pretrained` and resuming refuse. `trainer.remove_callback(StopOnDivergence)`
    turns it off. Added to the Trainer of another model, it checks that model's trainable parameters
    for NaN or infinite values.
    """

    def __init__(self) -> None:
        self.diverged_at: Optional[int] = None
        self.reason: Optional[str] = None
        self.kept_step: Optional[int] = None
        self._finite_losses: Optional[torch.Tensor] = None
        self._road: list[tuple[tuple[str, int], list[tuple[str, Any, str]]]] = []  # (where, RoadLayer, adapter)
        self._others: list[tuple[str, torch.Tensor]] = []
        self._groups: list[list[torch.Tensor]] = []  # the trainable parameters, by device and dtype
        self._saved: list[torch.Tensor] = []  # their values after the last good step, one flat tensor per group
        self._saved_step = 0

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Note whether a micro-batch's loss was finite (no host sync; read at the end of the step)."""
        finite = torch.isfinite(loss.detach()).all()
        self._finite_losses = finite if self._finite_losses is None else self._finite_losses & finite

    def on_train_begin(
        self, args: TrainingArguments, state: Any, control: Any, model: Optional[nn.Module] = None, **kwargs: Any
    ) -> None:
        self.diverged_at = self.reason = self.kept_step = None
        self._finite_losses = None
        self._plan(model)
        problem = self._problem()
        if problem is not None:
            raise ValueError(f"training cannot start from these values: {problem}.")
        self._save(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._groups:
            return
        problem = self._problem()
        if not any_process(problem is not None, args.device):
            self._save(state.global_step)
            return
        self.diverged_at, self.kept_step = state.global_step, self._saved_step
        self.reason = problem or "the model diverged on another process"
        self._restore()
        control.should_training_stop = True
        control.should_save = control.should_evaluate = False

    def on_epoch_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> None:
        if self.diverged_at is not None:  # no save or evaluation at the end of the epoch either
            control.should_save = control.should_evaluate = False

    def _plan(self, model: Optional[nn.Module]) -> None:
        """Which parameters to check, and how: RoAd values by (variant, group size, device, dtype), the
        other trainable parameters one by one."""
        self._road, self._others, self._groups, self._saved = [], [], [], []
        road = _road_model_in(model)
        model = road if road is not None else model
        if model is None:
            return
        road_groups: dict[tuple, list[tuple[str, Any, str]]] = {}
        covered: set[int] = set()
        for path, layer in road.road_layers() if road is not None else ():
            for name, theta in layer.road_theta.items():
                alpha = layer.road_alpha[name]
                if theta.requires_grad or alpha.requires_grad:
                    key = (layer.variant[name], layer.group_size[name], theta.device, theta.dtype, alpha.dtype)
                    where = path if name == ckpt.DEFAULT_ADAPTER else f"{path} [adapter {name!r}]"
                    road_groups.setdefault(key, []).append((where, layer, name))
                    covered.update((id(theta), id(alpha)))
        self._road = [((key[0], key[1]), layers) for key, layers in road_groups.items()]
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._others = [(n, p) for n, p in trainable if id(p) not in covered]
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for _, p in trainable:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        self._groups = list(by_kind.values())
        self._saved = [
            torch.empty(sum(p.numel() for p in g), device=g[0].device, dtype=g[0].dtype) for g in self._groups
        ]

    @torch.no_grad()
    def _problem(self) -> Optional[str]:
        """Why the model's current values (or the losses of the step) are unusable, or None."""
        finite_losses, self._finite_losses = self._finite_losses, None
        for (variant, group_size), layers in self._road:
            # full-length values (a subspace adapter's parameters hold its own pairs only), all layers at once
            pairs = [layer.parameters_of(name) for _, layer, name in layers]
            theta, alpha = torch.cat([t.flatten() for t, _ in pairs]), torch.cat([a.flatten() for _, a in pairs])
            if value_problem(variant, group_size, theta, alpha) is not None:
                return self._layer_problems()
        for name, p in self._others:
            if not bool(torch.isfinite(p.detach()).all()):
                return f"NaN or infinite values in the trainable parameter {name}"
        if finite_losses is not None and not bool(finite_losses):
            return "a NaN or infinite training loss"
        return None

    def _layer_problems(self) -> str:
        """What is wrong, layer by layer: how many RoAd layers, and the first one's problem."""
        layers = [(key, entry) for key, group in self._road for entry in group]
        found = [(where, value_problem(*key, *layer.parameters_of(name))) for key, (where, layer, name) in layers]
        bad = [(path, problem) for path, problem in found if problem]
        if not bad:
            return "NaN, infinite or degenerate values in the adapter"
        path, problem = bad[0]
        return f"unusable values in {len(bad)} of the adapter's {len(layers)} RoAd layers, first in {path}: {problem}"

    @torch.no_grad()
    def _save(self, step: int) -> None:
        """Keep a copy of the trainable parameters' values, those of `step`."""
        for group, saved in zip(self._groups, self._saved, strict=True):
            torch.cat([p.detach().flatten() for p in group], out=saved)
        self._saved_step = step

    @torch.no_grad()
    def _restore(self) -> None:
        """Put the values of the last good step back, in place (the optimizer keeps its parameter objects)."""
        for group, saved in zip(self._groups, self._saved, strict=True):
            for p, value in zip(group, saved.split([p.numel() for p in group]), strict=True):
                p.copy_(value.view_as(p))


def _prepare_quantized_base(model: RoadModel) -> None:
    """Make a RoadModel on a bitsandbytes-quantized base trainable by `Trainer`.

    transformers' Trainer refuses a quantized model unless it sees adapters on it, by PEFT's class or by this
    flag of its own PEFT integration; a RoadModel's adapters are what trains. And bitsandbytes (0.50) repacks
    4-bit weights for CPU inference at a layer's first inference call on CPUs with AVX512-BF16, after which the
    layer passes no gradient to its input: every adapter below it would train on wrong gradients after the
    first evaluation, so the repacking is turned off.
    """
    if getattr(model, "is_quantized", False):
        cast(Any, model)._hf_peft_config_loaded = True
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            cast(Any, module).support_avx512bf16_for_cpu = False


class RoadTrainer(Trainer):
    """`transformers.Trainer` that saves, resumes and reloads a `RoadModel` by its adapters only.

    Use it exactly like `Trainer`; see the module docstring for what differs and why. For a `RoadModel`
    `divergence_guard` is the `StopOnDivergence` it added (None otherwise): after `train()`, its
    `diverged_at` is None, or the step at which the run stopped because the adapter diverged.
    """

    def __init__(self, model: Optional[nn.Module] = None, *args: Any, **kwargs: Any) -> None:
        given = _road_model_in(model) if isinstance(model, nn.Module) else None  # TRL takes names too
        if given is not None:
            _prepare_quantized_base(given)
        super().__init__(model, *args, **kwargs)
        road = self._road_model()
        self.divergence_guard: Optional[StopOnDivergence] = None
        if road is not None:  # the Trainer inspected the wrapper's forward(*args, **kwargs): look at the base
            self.divergence_guard = StopOnDivergence()
            self.add_callback(self.divergence_guard)  # last: it may cancel a checkpoint other callbacks asked for
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

    def _chosen_below(self, method: str) -> bool:
        """Whether a class between `RoadTrainer` and `Trainer` in this object's class hierarchy defines `method`."""
        mro = type(self).__mro__
        return any(method in vars(k) for k in mro[mro.index(RoadTrainer) + 1 : mro.index(Trainer)])

    def training_step(self, model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The stock step; its loss also goes to the `StopOnDivergence` callbacks (without a host sync)."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, StopOnDivergence):
                callback.observe_loss(loss)
        return loss

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the batch columns the wrapped model's forward takes (and the labels), unless a subclass of
        `Trainer` behind this one (in a `road_trainer` class) chooses the columns itself, as TRL's trainers do."""
        road = self._road_model()
        if (
            self._signature_columns is None
            and road is not None
            and not self._chosen_below("_set_signature_columns_if_needed")
        ):
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


REFERENCE_ADAPTER = "ref"


class AdapterReference(nn.Module):
    """The reference model of a preference trainer (`ref_model`, as TRL's `DPOTrainer` takes it) for a `RoadModel`,
    at no memory cost: the trained model itself, called with its adapters off (a new adapter starts as the identity,
    so that is the model training starts from), or with `adapter` active: a frozen copy of the adapter training
    started from, made when the trainer is built. TRL does the same for PEFT models, which it recognises only by
    their class.

    It owns no parameters (the Trainer places and prepares the trained model once) and reads every other attribute
    (`config`, `get_output_embeddings`, ...) from the wrapped transformers model. Calls do not switch gradients off:
    the trainer calls its reference under `torch.no_grad()`.
    """

    def __init__(self, adapter: Optional[str] = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.__dict__["_road"] = None  # not a submodule: the parameters belong to the trained model

    def bind(self, road: RoadModel) -> None:
        """Refer to `road`; with `adapter`, first add it to `road` as a frozen copy of the active adapter (unless
        `road` already has one by that name: a reference saved with a checkpoint)."""
        if self.adapter is not None and self.adapter not in road.peft_config:
            active = road.active_adapters
            if len(active) != 1:
                raise ValueError(
                    f"the reference model copies the active adapter, but {active} are active: activate one, or "
                    "pass ref_model= yourself."
                )
            config = dataclasses.replace(road.peft_config[active[0]], inference_mode=True)
            road.add_adapter(self.adapter, config, state_dict=road.adapter_state_dict(active[0]))
        self.__dict__["_road"] = road

    @property
    def road(self) -> RoadModel:
        """The `RoadModel` this reference runs."""
        road = self.__dict__["_road"]
        if road is None:
            raise RuntimeError("this AdapterReference is not bound to a RoadModel yet: call bind(model) first.")
        return road

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.road.get_base_model(), name)

    @contextmanager
    def _as_reference(self) -> Iterator[None]:
        road = self.road
        if self.adapter is None:
            with road.disable_adapter():
                yield
            return
        active = road.active_adapters
        road.set_adapter(self.adapter)
        try:
            yield
        finally:
            road.set_adapter(active)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._as_reference():
            return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The `RoadModel`'s forward, under `__call__`'s reference adapters (with whatever the trainer added to the
        trained model's forward, such as TRL's fused log-probability head)."""
        return self.road(*args, **kwargs)


class _AppliesRoadConfig(Trainer):
    """The last class before `Trainer` in a `road_trainer` class: wraps the model that the trainer class built or
    loaded (TRL loads a model given by name) with the `RoadConfig` given as `peft_config`, and binds the reference
    model, just before `Trainer.__init__` sees the model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        plan = self.__dict__.pop("_road_plan", None)
        bound = inspect.signature(Trainer.__init__).bind(self, *args, **kwargs)
        model = bound.arguments.get("model")
        if plan is not None:
            config, reference = plan
            if config is not None:
                if not isinstance(model, nn.Module):
                    raise TypeError(f"peft_config=RoadConfig(...) needs a model to wrap, got {type(model).__name__}.")
                training_args = bound.arguments.get("args")
                if training_args is not None:  # random adapter initialisations (init_weights=False) follow the seed
                    set_seed(training_args.seed)
                model = bound.arguments["model"] = get_peft_model(model, config)
            if reference is not None:
                if not isinstance(model, RoadModel):
                    raise TypeError(f"the reference model needs a RoadModel, got {type(model).__name__}.")
                reference.bind(model)
        road = _road_model_in(model) if isinstance(model, nn.Module) else None
        if road is not None:  # the model as Trainer.__init__ will see it (TRL may have loaded it by name)
            _prepare_quantized_base(road)
        super().__init__(*bound.args[1:], **bound.kwargs)


_Trainer = TypeVar("_Trainer", bound=Trainer)
_ROAD_CLASSES: dict[type, type] = {}


def road_trainer(trainer_class: type[_Trainer]) -> type[_Trainer]:
    """`trainer_class` (a subclass of transformers' `Trainer`, such as TRL's `SFTTrainer`) with `RoadTrainer`'s
    behaviour for a `RoadModel`: adapter-only checkpoints, resuming and `save_model`, the divergence check.

    The result is a new subclass, `Road<name>` (the same one on every call); `trainer_class` itself is not changed.
    It takes the same arguments as `trainer_class`, and moreover:

    * `peft_config=roadkit.RoadConfig(...)` where `trainer_class` takes a `peft_config`: the model (given, or loaded
      from a name by `trainer_class`) is wrapped with `get_peft_model` before `Trainer.__init__` sees it;
    * where `trainer_class` takes a `ref_model` (preference training, e.g. TRL's `DPOTrainer`) and none is given, the
      reference is an `AdapterReference`: with `peft_config`, the model with its adapters off; for a `RoadModel`
      passed in, a frozen copy of its active adapter, added as adapter "ref" (what TRL does for PEFT models). With
      `precompute_ref_log_probs=True` the trainer computes the reference values from the model before training;
    * where `trainer_class` takes no `ref_model` but its arguments ask for a KL term against one (`beta` > 0, as in
      TRL's `GRPOTrainer`), the same `AdapterReference` is its `ref_model`, instead of a second copy of the base
      loaded from the model's name or path (which an in-memory model does not have).

    `road_trainer(Trainer)` is `RoadTrainer`, and a subclass of `RoadTrainer` comes back unchanged.
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(
            f"road_trainer takes a subclass of transformers.Trainer (e.g. trl.SFTTrainer), got {trainer_class!r}."
        )
    if issubclass(trainer_class, RoadTrainer):
        return trainer_class
    if trainer_class is Trainer:
        return cast("type[_Trainer]", RoadTrainer)
    made = _ROAD_CLASSES.get(trainer_class)
    if made is None:
        made = _ROAD_CLASSES[trainer_class] = _make_road_trainer(trainer_class)
    return cast("type[_Trainer]", made)


def _make_road_trainer(trainer_class: type[Trainer]) -> type:
    """The class `road_trainer` returns; its classes in order: `RoadTrainer`, `trainer_class` (and its bases),
    `_AppliesRoadConfig`, `Trainer`."""
    signature = inspect.signature(trainer_class.__init__)
    takes_reference = "ref_model" in signature.parameters

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        model, config = bound.arguments.get("model"), bound.arguments.get("peft_config")
        if isinstance(config, RoadConfig):
            if isinstance(model, RoadModel):
                raise ValueError(
                    "the model already has RoAd adapters: pass peft_config=RoadConfig(...) with a base model, or "
                    "the RoadModel without peft_config."
                )
            bound.arguments["peft_config"] = None
        else:
            config = None
        reference = None
        wrapped = config is not None or isinstance(model, RoadModel)
        training_args = bound.arguments.get("args")
        # An online trainer with a KL term (TRL's GRPOTrainer, beta > 0) takes no ref_model: for a model it does not
        # know as PEFT's, it would load a second copy of the base from the model's name or path.
        beta = getattr(training_args, "beta", 0.0) if not takes_reference else 0.0
        needs_reference = wrapped and (
            (takes_reference and bound.arguments.get("ref_model") is None)
            or (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta != 0)
        )
        if needs_reference:
            if getattr(training_args, "sync_ref_model", False):
                raise ValueError(
                    "sync_ref_model=True updates a separate reference model from the trained one; a RoAd model's "
                    "reference is the model itself (as for PEFT models): set sync_ref_model=False."
                )
            if not getattr(training_args, "precompute_ref_log_probs", False):
                reference = AdapterReference(None if config is not None else REFERENCE_ADAPTER)
                if takes_reference:
                    bound.arguments["ref_model"] = reference
        if config is not None or reference is not None:
            self._road_plan = (config, reference)
        if reference is not None and not takes_reference and training_args is not None:
            training_args.beta = 0.0  # the trainer builds no reference of its own; the KL term is restored below
            try:
                RoadTrainer.__init__(self, *bound.args[1:], **bound.kwargs)
            finally:
                training_args.beta = beta
            self.beta, self.ref_model = beta, reference
        else:
            RoadTrainer.__init__(self, *bound.args[1:], **bound.kwargs)  # the next class: then trainer_class
        if "_road_plan" in self.__dict__:
            raise TypeError(
                f"{trainer_class.__name__}.__init__ did not reach Trainer.__init__ through super(): road_trainer "
                "cannot apply peft_config there; wrap the model with roadkit.get_peft_model and pass it instead."
            )

    __init__.__doc__ = f"`{trainer_class.__name__}.__init__`; see `roadkit.road_trainer` for what differs."
    name = f"Road{trainer_class.__name__}"
    return type(
        name,
        (RoadTrainer, trainer_class, _AppliesRoadConfig),
        {
            "__init__": __init__,
            "__doc__": f"`{trainer_class.__name__}` for RoAd models, made by `roadkit.road_trainer`.",
            "__module__": __name__,
            "__qualname__": name,
        },
    )
