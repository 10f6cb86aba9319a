"""`RoadModel` / `get_peft_model`: the model with RoAd adapters, PEFT's API for RoAd.

It injects the layers (`layers`, chosen by `targeting`), keeps the adapters' books (which exist, which are
active, which are merged), and hands mixed batches their `Routing` (`routing`). Reading and writing adapters
goes through `persistence`.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence, Union, cast

import torch
from torch import nn

from . import checkpoint as ckpt
from . import persistence
from .config import RoadConfig
from .errors import InputError
from .layers import (
    BASE,
    AdapterParameters,
    ModulesToSaveWrapper,
    RoadLayer,
    Routing,
    base_of,
    road_layers,
    saved_wrappers,
    wrapper_for,
)
from .routing import batch_shape_of, make_routing, tables_for
from .targeting import select_modules_to_save, select_targets

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedModel


def _as_list(names: Union[str, Iterable[str]]) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def _base_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: its `compute_dtype` (bitsandbytes 4-bit), else its first
    floating-point parameter's, else float32."""
    compute_dtype = getattr(module, "compute_dtype", None)
    if isinstance(compute_dtype, torch.dtype):
        return compute_dtype
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _check_adapter_name(adapter_name: Any) -> None:
    """Raise ValueError unless `adapter_name` is a usable adapter name (whether or not it is taken)."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise InputError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}.")
    if adapter_name == BASE:
        raise InputError(f"{BASE!r} is reserved for 'no adapter' in mixed batches; choose another name.")
    if hasattr(AdapterParameters(), adapter_name):  # it would shadow an attribute of the adapters' dicts
        raise InputError(
            f"adapter name {adapter_name!r} is reserved (an attribute of torch's ParameterDict, "
            "which holds the adapters); choose another name."
        )


class RoadModel(nn.Module):
    """A model with RoAd adapters. Attribute access falls through to the wrapped model."""

    def __init__(
        self,
        model: nn.Module,
        config: RoadConfig,
        adapter_name: str = ckpt.DEFAULT_ADAPTER,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Wrap `model` with a fresh adapter. Adapter parameters are float32 (`autocast_adapter_dtype`,
        the default, which trains well under bf16/fp16 bases) or, if False, each base layer's dtype."""
        super().__init__()
        self._check_config(config)
        if isinstance(model, RoadModel) or any(
            isinstance(m, (RoadLayer, ModulesToSaveWrapper)) for m in model.modules()
        ):
            raise InputError(
                "this model already has RoAd adapters: add another with add_adapter() (or "
                "load_adapter()) on its RoadModel instead of wrapping it again."
            )
        _check_adapter_name(adapter_name)
        persistence.expected_tensors(model, config)  # every error before the model is touched
        self.model = model
        self.training = model.training
        self.peft_config: dict[str, RoadConfig] = {}
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self._active: list[str] = [adapter_name]
        for p in model.parameters():
            p.requires_grad_(False)
        self._inject(adapter_name, config)
        if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
            self._inputs_require_grad()  # checkpointing was switched on before wrapping

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- validation ----------------------------------------------------------------------------

    @staticmethod
    def _check_config(config: Any) -> None:
        if not isinstance(config, RoadConfig):
            raise TypeError(f"expected a roadkit.RoadConfig, got {type(config).__name__}.")

    def check_new_adapter_name(self, adapter_name: Any) -> None:
        """Raise ValueError unless `adapter_name` can name a new adapter: a valid name not in use."""
        _check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise InputError(f"an adapter named {adapter_name!r} already exists; existing: {sorted(self.peft_config)}.")

    def check_adapter_names(self, names: Iterable[str]) -> None:
        """Raise ValueError naming every unknown adapter among `names`, and the available ones."""
        unknown = sorted({n for n in names if n not in self.peft_config})
        if unknown:
            raise InputError(f"unknown adapter(s) {unknown}; available: {sorted(self.peft_config)}.")

    # ---- the layers ----------------------------------------------------------------------------

    def road_layers(self) -> Iterator[tuple[str, RoadLayer]]:
        """(path, layer) for every RoAd layer, paths relative to the wrapped model."""
        return road_layers(self.model)

    def _saved_wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        return saved_wrappers(self.model)

    def _replace(self, path: str, new: nn.Module) -> None:
        """Put `new` at `path`; the list of adapter modules is walked again on its next use."""
        parent_path, _, child = path.rpartition(".")
        setattr(self.model.get_submodule(parent_path) if parent_path else self.model, child, new)
        self.__dict__.pop("_adapter_modules_memo", None)

    def _inject(self, adapter_name: str, config: RoadConfig) -> None:
        """Wrap (or extend) every target and every module to save. Callers validated `config` first."""
        for path in select_targets(self.model, config):
            module = self.model.get_submodule(path)
            dtype = None if self.autocast_adapter_dtype else _base_dtype(base_of(module))
            settings = config.layer_settings()
            if isinstance(module, RoadLayer):
                module.update_layer(adapter_name, **settings, dtype=dtype)
                continue
            wrapper = wrapper_for(module)
            if wrapper is None:  # select_targets picks only modules that have a wrapper
                raise TypeError(f"RoAd cannot wrap {path!r} ({type(module).__name__})")
            self._replace(path, wrapper(module, adapter_name, **settings, dtype=dtype).train(module.training))
        for path in select_modules_to_save(self.model, config):
            module = self.model.get_submodule(path)
            if isinstance(module, ModulesToSaveWrapper):
                module.add_adapter(adapter_name)
            else:
                self._replace(path, ModulesToSaveWrapper(module, adapter_name).train(module.training))
        self.peft_config[adapter_name] = config
        self._apply_active()

    def _apply_active(self) -> None:
        """Push the active adapter list to every layer; only active, trainable adapters get gradients."""
        for _, layer in self.road_layers():
            layer.set_adapter(self._active)
        for _, wrapper in self._saved_wrappers():
            wrapper.set_adapter(self._active)
        frozen = [n for n, c in self.peft_config.items() if c.inference_mode]
        for _, layer in self.road_layers():
            for name in frozen:
                if name in layer.road_theta:
                    layer.road_theta[name].requires_grad_(False)
                    layer.road_alpha[name].requires_grad_(False)
        for _, wrapper in self._saved_wrappers():
            for name in frozen:
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(False)

    # ---- adapter bookkeeping -------------------------------------------------------------------

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        return self._active[0] if len(self._active) == 1 else list(self._active)

    def add_adapter(
        self, adapter_name: str, config: RoadConfig, state_dict: Optional[dict[str, torch.Tensor]] = None
    ) -> None:
        """Add an adapter (inactive and not trainable until `set_adapter`), fresh or with the tensors
        of `state_dict` (PEFT keys, as `adapter_state_dict` returns them). Checked before any change: the keys,
        shapes and subspace; the values are taken as they are (copies of a live adapter, a composition)."""
        self._check_config(config)
        self.check_new_adapter_name(adapter_name)
        if state_dict is None:
            persistence.expected_tensors(self.model, config)  # the config fits the model
        else:
            persistence.check_tensors(self.model, config, state_dict, "the given state_dict", values=False)
        self._inject(adapter_name, config)
        if state_dict is not None:
            persistence.load_tensors(self.model, adapter_name, state_dict)

    def set_adapter(self, adapter_name: Union[str, list[str]]) -> None:
        """Activate one adapter, or several applied in the given order."""
        names = _as_list(adapter_name)
        if not names:
            raise InputError("set_adapter needs at least one adapter name.")
        self.check_adapter_names(names)
        self._active = names
        self._apply_active()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer (refused while it is merged).

        If it was active, the other active adapters stay active. If it was the only active one, the first
        remaining adapter (in the order they were added) becomes active on every layer, with a warning naming
        it, as in PEFT (which picks the first remaining one layer by layer, so where adapters target different
        layers its layers may differ); with none left, no adapter is active and the model computes its base
        outputs.
        """
        self.check_adapter_names([adapter_name])
        merged = [p for p, layer in self.road_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise InputError(f"adapter {adapter_name!r} is merged into {merged}; call unmerge_adapter() first.")
        for _, layer in self.road_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in self._saved_wrappers():
            wrapper.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        active = [n for n in self._active if n != adapter_name]
        if not active and self.peft_config:
            active = list(self.peft_config)[:1]
            warnings.warn(
                f"adapter {adapter_name!r} was active and is deleted; {active[0]!r} is active now.", stacklevel=2
            )
        self._active = active
        self._apply_active()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model inside this block (merged adapters are undone on the fly, not unmerged)."""
        with self._set_on_adapter_modules("disable_adapters", True, reset=False):
            yield

    def _adapter_modules(self) -> list[Union[RoadLayer, ModulesToSaveWrapper]]:
        """Every RoAd layer and modules-to-save wrapper: one walk over the model, kept until this
        model wraps or unwraps a module (`_replace`), since a serving loop routes every call through it.
        Layers wrapped behind the model's back, outside its methods, are not seen."""
        memo = self.__dict__.get("_adapter_modules_memo")
        if memo is None:
            memo = [m for m in self.model.modules() if isinstance(m, (RoadLayer, ModulesToSaveWrapper))]
            self.__dict__["_adapter_modules_memo"] = memo
        return memo

    @contextmanager
    def _set_on_adapter_modules(
        self, attr: str, value: Any, reset: Any, modules: Optional[Sequence[nn.Module]] = None
    ) -> Iterator[None]:
        """Set `attr` on every RoAd layer and modules-to-save wrapper (or on `modules`, when the caller
        already has them) for the duration of a block."""
        if modules is None:
            modules = self._adapter_modules()
        # Plain attributes (never parameters or modules), written straight to the instance dict:
        # nn.Module.__setattr__ costs about 5 us a call, and this runs twice per layer per model call.
        for m in modules:
            m.__dict__[attr] = value
        try:
            yield
        finally:
            for m in modules:
                m.__dict__[attr] = reset

    def get_base_model(self) -> nn.Module:
        return self.model

    def _hf_model(self) -> PreTrainedModel:
        """The wrapped model, for the methods only a transformers model has (an AttributeError on others)."""
        return cast("PreTrainedModel", self.model)

    # ---- parameters ----------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters) of the wrapped model, adapters included."""
        trainable = total = 0
        for p in self.model.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # ---- gradient checkpointing ------------------------------------------------------------------

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs: Any
    ) -> None:
        """The wrapped model's gradient checkpointing, made safe for a frozen base (see `_inputs_require_grad`)."""
        self._hf_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs
        )
        self._inputs_require_grad()

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: Optional[dict] = None, **kwargs: Any
    ) -> None:
        """transformers 5's name for `gradient_checkpointing_enable` (what its `Trainer` calls)."""
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if enable is None:  # transformers 4
            self._hf_model().gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs
            )
        else:
            enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
        self._inputs_require_grad()

    def _inputs_require_grad(self) -> None:
        """Make the input embeddings' output require grad, as PEFT does.

        Reentrant checkpointing (`use_reentrant=True`) only tracks gradients through a block if one of
        its tensor inputs requires grad. With the base frozen none does, so the RoAd parameters inside
        checkpointed blocks would get no gradient. transformers 5 does this itself for models whose
        main input is `input_ids`, not for others (vision, audio) nor in transformers 4. Idempotent.
        """
        if getattr(self.model, "_require_grads_hook", None) is not None:
            return  # already done (by transformers or by an earlier call)
        if hasattr(self.model, "enable_input_require_grads"):
            self._hf_model().enable_input_require_grads()
            return
        embeddings: Optional[nn.Module] = getattr(self.model, "get_input_embeddings", lambda: None)()
        if embeddings is not None:  # a plain torch model
            # nn.Module.__setattr__ takes any value; torch's stub says Tensor | Module.
            self.model._require_grads_hook = embeddings.register_forward_hook(  # type: ignore[assignment]
                lambda _module, _inputs, output: output.requires_grad_(True)
            )

    # ---- merging -------------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights, in closed form.

        With `safe_merge`, every layer's result is checked for NaN/inf on copies before any weight
        changes: if one has any, the model is left exactly as it was.
        """
        names = self._active if adapter_names is None else _as_list(adapter_names)
        self.check_adapter_names(names)
        self._check_untied(names)
        if safe_merge:
            for path, layer in self.road_layers():
                problem = layer.merge_problem(names)
                if problem:
                    raise InputError(f"{problem} of layer {path!r}; nothing was changed.")
        for _, layer in self.road_layers():
            layer.merge(adapter_names=names)

    def _check_untied(self, names: list[str]) -> None:
        """Refuse to merge into a weight another module shares (tied input/output embeddings):
        merging would silently change that module too."""
        owners: dict[int, set[str]] = {}
        for module_name, module in self.model.named_modules():
            for p in module.parameters(recurse=False):
                owners.setdefault(p.data_ptr(), set()).add(module_name)
        for path, layer in self.road_layers():
            if not any(n in layer.road_theta and n not in layer.merged_adapters for n in names):
                continue
            for p in layer._merge_params():
                others = sorted(owners.get(p.data_ptr(), set()) - {f"{path}.base_layer"})
                if others:
                    raise InputError(
                        f"cannot merge into {path!r}: its weight is shared with {others} (tied "
                        "weights), which merging would change too. Keep the adapter unmerged, or "
                        "untie the weights first. Nothing was merged."
                    )

    def unmerge_adapter(self) -> None:
        """Restore the base weights of every layer with merged adapters."""
        for _, layer in self.road_layers():
            if layer.merged:
                layer.unmerge()

    def _unwrap(
        self,
        merge: bool,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
        progressbar: bool = False,
    ) -> nn.Module:
        if progressbar and importlib.util.find_spec("tqdm") is None:
            warnings.warn(
                "progressbar=True draws its bar with tqdm, which is not installed (pip install tqdm); "
                "going on without one.",
                stacklevel=3,
            )
            progressbar = False
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        else:
            self.unmerge_adapter()
        layers = list(self.road_layers())
        if progressbar:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc="Unloading" + (" and merging" if merge else ""))
        for path, layer in layers:
            self._replace(path, layer.get_base_layer())
        for path, wrapper in list(self._saved_wrappers()):
            self._replace(path, wrapper.active_module() if merge else wrapper.original_module)
        return self.model

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: Optional[list[str]] = None
    ) -> nn.Module:
        """Merge adapters into the weights and return the plain base model (RoAd layers removed)."""
        return self._unwrap(True, safe_merge, adapter_names, progressbar)

    def unload(self) -> nn.Module:
        """Remove all RoAd layers and return the base model with its original weights."""
        return self._unwrap(False)

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Module:
        """transformers' `resize_token_embeddings` (same arguments) on a model whose input embeddings may
        carry adapters: those rotate the embedding vectors, whose size resizing keeps, so the wrapper stays
        and takes the resized table. An adapter on the output head (which rotates over the vocabulary)
        or a merged one makes resizing a ValueError."""
        model = self._hf_model()
        head = model.get_output_embeddings()
        if isinstance(head, RoadLayer):
            raise InputError(
                "cannot resize the token embeddings: the output head carries RoAd adapters, whose "
                "rotations act on the vocabulary; resize the base model before adding them."
            )
        wrapper = model.get_input_embeddings()
        if not isinstance(wrapper, RoadLayer):
            return model.resize_token_embeddings(*args, **kwargs)
        if wrapper.merged:
            raise InputError(
                "cannot resize the token embeddings while adapters are merged into them; unmerge them first."
            )
        model.set_input_embeddings(wrapper.get_base_layer())
        try:
            model.resize_token_embeddings(*args, **kwargs)
        finally:
            wrapper.base_layer = model.get_input_embeddings()
            model.set_input_embeddings(wrapper)
        return wrapper

    # ---- forward / generate ----------------------------------------------------------------------

    def route(
        self,
        adapter_names: list[str],
        adapter_indices: Optional[torch.Tensor] = None,
        batch_shape: Optional[tuple[int, ...]] = None,
    ) -> Routing:
        """Which adapter each batch row (or token) uses, checked and ready for the layers.

        `adapter_names` alone: one adapter name per batch row (`__base__` for none). With
        `adapter_indices` (an integer tensor of shape [batch], [batch, seq] or flat [tokens]),
        `adapter_names` is the list those indices point into. `batch_shape`, the (batch, seq) of the
        input when known, lets per-row indices reach layers that flatten the batch.

        Pass the result as `routing=` to any number of `forward` / `generate` calls (a serving loop's
        decode steps), which then do no per-call adapter bookkeeping. It keeps each layer's coefficient
        tables, checked against the layer's cache on every call: after an in-place update of the adapters
        it serves their new values, and after a merge it is refused. Every check runs here, before any
        compute, and each layer's tables are looked up here too.
        """
        if self.training:
            raise InputError("adapter_names (mixed-adapter batches) is for inference; call model.eval() first.")
        layers = [m for m in self._adapter_modules() if isinstance(m, RoadLayer)]
        merged = sorted({n for m in layers for n in m.merged_adapters})
        if merged:
            raise InputError(
                f"adapters {merged} are merged into the weights; call unmerge_adapter() before mixed-adapter batches."
            )
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        routing = make_routing(adapter_names, adapter_indices, batch_shape, self.peft_config, device)
        if not torch.compiler.is_compiling():  # the tables from the layers' caches: inputs to a compiled model
            for layer in layers:
                tables_for(routing, layer)
        return routing

    @contextmanager
    def _routed(self, routing: Routing) -> Iterator[None]:
        """Hand `routing` to every adapter layer for one call (one walk), and take it back after."""
        if self.training:
            raise InputError("a routing (mixed-adapter batches) is for inference; call model.eval() first.")
        merged = sorted({n for m in self._adapter_modules() if isinstance(m, RoadLayer) for n in m.merged_adapters})
        if merged:  # a routing made before a merge would apply the merged adapters a second time
            raise InputError(
                f"adapters {merged} are merged into the weights; call unmerge_adapter() before mixed-adapter batches."
            )
        deleted = [n for n in routing.names if n != BASE and n not in self.peft_config]
        if deleted:  # its rows would silently get the identity
            raise InputError(f"this routing uses adapters {deleted}, deleted since it was made; route again.")
        with self._set_on_adapter_modules("routing", routing, reset=None):
            yield

    def _routing_for(
        self,
        args: tuple,
        kwargs: dict,
        adapter_names: Optional[list[str]],
        adapter_indices: Optional[torch.Tensor],
        routing: Optional[Routing],
    ) -> Optional[Routing]:
        if routing is not None:
            if adapter_names is not None or adapter_indices is not None:
                raise InputError(
                    "give either routing= (from model.route) or adapter_names / adapter_indices, not both."
                )
            if not isinstance(routing, Routing):
                raise TypeError(f"routing must be a Routing made by model.route(...), got {type(routing).__name__}.")
            return routing
        if adapter_names is None:
            if adapter_indices is not None:
                raise InputError("adapter_indices needs adapter_names, the list of names it indexes into.")
            return None
        return self.route(adapter_names, adapter_indices, batch_shape_of(args, kwargs))

    def forward(
        self,
        *args: Any,
        adapter_names: Optional[list[str]] = None,
        adapter_indices: Optional[torch.Tensor] = None,
        routing: Optional[Routing] = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model, optionally with several adapters in one batch.

        `adapter_names` alone: one adapter name per batch row (`__base__` for none). With
        `adapter_indices` (an integer tensor of shape [batch], [batch, seq] or flat [tokens]),
        `adapter_names` is the list those indices point into: per-token routing for packed or
        continuous batching. Or `routing`, made once by `route` and reused across calls.
        """
        routing = self._routing_for(args, kwargs, adapter_names, adapter_indices, routing)
        if routing is None:
            return self.model(*args, **kwargs)
        with self._routed(routing):
            return self.model(*args, **kwargs)

    def generate(
        self, *args: Any, adapter_names: Optional[list[str]] = None, routing: Optional[Routing] = None, **kwargs: Any
    ) -> Any:
        """`model.generate`, optionally with one adapter per prompt row in a single batch (`adapter_names`,
        or a per-row `routing` from `route`)."""
        routing = self._routing_for(args, kwargs, adapter_names, None, routing)
        model = cast("GenerationMixin", self.model)  # a transformers model that generates
        if routing is None:
            return model.generate(*args, **kwargs)
        with self._routed(routing):
            return model.generate(*args, **kwargs)

    # ---- checkpoints (persistence.py does the work, checkpoint.py the files) ------------------------

    def adapter_state_dict(self, adapter_name: str = ckpt.DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's keys (what `save_pretrained` writes)."""
        self.check_adapter_names([adapter_name])
        return persistence.state_dict_of(self.model, adapter_name)

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        safe_serialization: bool = True,
        selected_adapters: Optional[list[str]] = None,
        save_embedding_layers: Union[str, bool] = "auto",
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write adapters in PEFT's layout: "default" at the root, every other one in a subfolder.

        Takes PEFT's keywords: with `is_main_process=False` (the other ranks of a distributed run) it
        writes nothing. Adapters are always safetensors, and RoAd adapters never hold embedding layers, so
        `safe_serialization` and `save_embedding_layers` change nothing; other keywords are reported unused.
        """
        if kwargs:
            warnings.warn(f"RoadModel.save_pretrained ignores {sorted(kwargs)}.", stacklevel=2)
        if not safe_serialization:
            warnings.warn(
                "RoadModel.save_pretrained writes safetensors only (safe_serialization=False is ignored).", stacklevel=2
            )
        names = list(self.peft_config) if selected_adapters is None else _as_list(selected_adapters)
        if not names:
            raise InputError(
                "there is no adapter to save: this RoadModel has none left"
                if not self.peft_config
                else "selected_adapters is empty: no adapter to save."
            )
        self.check_adapter_names(names)
        if os.path.isfile(save_directory):
            raise InputError(f"save_directory {os.fspath(save_directory)!r} is a file, not a directory.")
        if is_main_process:
            for name in names:
                persistence.save(self.model, save_directory, name, self.peft_config[name])

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: Union[str, os.PathLike],
        adapter_name: str = ckpt.DEFAULT_ADAPTER,
        is_trainable: bool = False,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        autocast_adapter_dtype: bool = True,
        check_values: bool = True,
    ) -> "RoadModel":
        """Wrap `model` with the adapter saved at `model_id` (a directory or a Hub id).

        An adapter with NaN or infinite values, or a degenerate rotation, is refused; `check_values=False`
        loads it anyway, to inspect a diverged run."""
        config, tensors = persistence.read_checked(model, model_id, subfolder, revision, is_trainable, check_values)
        wrapped = cls(model, config, adapter_name, autocast_adapter_dtype)
        persistence.load_tensors(wrapped.model, adapter_name, tensors)
        if not is_trainable:
            wrapped.eval()
        return wrapped

    def load_adapter(
        self,
        model_id: Union[str, os.PathLike],
        adapter_name: str,
        is_trainable: bool = False,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        check_values: bool = True,
    ) -> None:
        """Add the adapter saved at `model_id` under `adapter_name` (not activated); values are checked
        as in `from_pretrained`."""
        self.check_new_adapter_name(adapter_name)
        model = self.model
        config, tensors = persistence.read_checked(model, model_id, subfolder, revision, is_trainable, check_values)
        self._inject(adapter_name, config)
        persistence.load_tensors(self.model, adapter_name, tensors)
        if not is_trainable:
            self.eval()

    def check_adapter_values(
        self, adapter_name: str, state_dict: dict[str, torch.Tensor], source: str = "the given state_dict"
    ) -> None:
        """Raise ValueError (naming `source`) unless `state_dict` (PEFT keys, as `adapter_state_dict` returns
        them) fits the existing adapter `adapter_name`: the same keys and shapes, nothing outside its subspace,
        no NaN or infinite value and no degenerate rotation."""
        self.check_adapter_names([adapter_name])
        expected = {k: t.shape for k, t in self.adapter_state_dict(adapter_name).items()}
        persistence.check_tensors(self.model, self.peft_config[adapter_name], state_dict, source, expected)

    def load_adapter_values(
        self, adapter_name: str, state_dict: dict[str, torch.Tensor], source: str = "the given state_dict"
    ) -> None:
        """Copy `state_dict` into the existing adapter `adapter_name` in place, after `check_adapter_values`:
        the parameter objects stay the same, so an optimizer tracking them keeps doing so (resuming a run)."""
        self.check_adapter_values(adapter_name, state_dict, source)
        persistence.load_tensors(self.model, adapter_name, state_dict)


@dataclass(frozen=True)
class TensorParallelIssue:
    """A RoAd layer whose per-rank output slice cannot hold whole rotation groups."""

    module: str
    adapter: str
    out_features: int
    group_size: int
    tp_size: int

    def __str__(self) -> str:
        return (
            f"{self.module} (adapter {self.adapter!r}): out_features={self.out_features} / tp_size="
            f"{self.tp_size} is not a multiple of group_size={self.group_size}"
        )


def check_tensor_parallel(model: RoadModel, tp_size: int) -> list[TensorParallelIssue]:
    """RoAd layers (and adapters) that a tensor-parallel split of `tp_size` ranks would break.

    A column-parallel layer gives each rank d_out / tp_size output features, and RoAd's pairs must
    not straddle ranks: that needs d_out divisible by tp_size and d_out / tp_size by group_size.
    Row-parallel layers (whose outputs are all-reduced, not split) are checked by the same rule, so
    the answer errs on the safe side. An empty list means every layer splits cleanly.
    """
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise InputError(f"tp_size must be a positive integer, got {tp_size!r}.")
    issues = []
    for path, layer in model.road_layers():
        for name, g in layer.group_size.items():
            d = layer.out_features
            if d % tp_size or (d // tp_size) % g:
                issues.append(TensorParallelIssue(path, name, d, g, tp_size))
    return issues


def get_peft_model(
    model: nn.Module,
    peft_config: RoadConfig,
    adapter_name: str = ckpt.DEFAULT_ADAPTER,
    autocast_adapter_dtype: bool = True,
) -> RoadModel:
    """Wrap `model` with a fresh RoAd adapter (PEFT's entry point, for RoAd).

    `autocast_adapter_dtype=False` keeps adapter parameters in the base layers' dtype (e.g. bf16)
    instead of float32, as in PEFT.
    """
    return RoadModel(model, peft_config, adapter_name, autocast_adapter_dtype)
