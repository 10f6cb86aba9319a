"""The engine side: vLLM's adapter managers, taught to load RoAd directories into the same slots.

vLLM keeps adapters in numbered slots and gives every token a slot index. `RoadLoRAModelManager`
keeps that machinery (slots, LRU eviction, `max_loras`, `max_cpu_loras`) and adds:

- every linear LoRA layer is wrapped in a `RoadLinear`, so each slot can hold a LoRA or a RoAd
  adapter;
- a RoAd adapter is checked against those layers when it is loaded, before anything changes, and
  written into its slot's rotation rows when it is activated;
- after vLLM maps tokens to slots, one `SlotRouting` per mapping turns that into the index the
  rotations read.

`RoadWorkerLoRAManager` reads RoAd directories itself and hands every other directory to vLLM.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import shutil
import tempfile
import weakref
from typing import Any, Callable, Optional

import torch
from vllm.lora.lora_model import LoRAModel
from vllm.lora.model_manager import LRUCacheLoRAModelManager
from vllm.lora.request import LoRARequest
from vllm.lora.utils import get_adapter_absolute_path, replace_submodule
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from ...checkpoint import fingerprint_differs, read_base_fingerprint
from ...kernels import c_ops
from ...messages import some_of
from .adapter import (
    LIST_LIMIT,
    ModuleRotation,
    RoadAdapter,
    RoadAdapterError,
    is_road_directory,
    read_road_adapter,
    recorded_base,
    same_model,
)
from .compat import SUPPORTED
from .layers import RoadLinear, is_servable, skip_idle_lora
from .slots import SlotRouting, SlotTable

SUFFIX = ".road_theta"
TRUST_BASE_ENV = "ROADKIT_TRUST_BASE"  # "1": serve adapters whose recorded base weights differ
logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger, whose handler prints it


class RoadAdapterModel(LoRAModel):
    """A RoAd adapter in vLLM's adapter registry: rotations by vLLM module name, no LoRA weights."""

    def __init__(self, lora_model_id: int, rotations: dict[str, ModuleRotation]) -> None:
        super().__init__(lora_model_id, rank=0, loras={})
        self.rotations = rotations

    def clone(self, lora_model_id: int) -> "RoadAdapterModel":
        return RoadAdapterModel(lora_model_id, self.rotations)


class RoadLoRAModelManager(LRUCacheLoRAModelManager):
    """vLLM's LRU adapter manager, with RoAd adapters in the same slots as LoRA adapters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probed_layers: set[str] = set()  # layers whose serving path passed `RoadLinear.probe`
        self.road_disabled: Optional[str] = None  # why RoAd serving is off (a probe failed), or None
        self.road_routings: dict[int, tuple[Any, SlotRouting]] = {}
        for name, module in list(self.modules.items()):
            skip_idle_lora(module, self.lora_config)
            if not is_servable(module):
                continue
            punica = module.punica_wrapper
            if id(punica) not in self.road_routings:
                routing = SlotRouting(self.max_num_batched_tokens, self.lora_slots, self.device)
                self.road_routings[id(punica)] = (punica, routing)
            road = RoadLinear(module, name, self.lora_slots, self.road_routings[id(punica)][1])
            replace_submodule(self.model, name, road)
            self.modules[name] = road
        if torch.device(self.device).type == "cpu":
            try:
                c_ops.library()
                logger.info("RoAd rotations on CPU: roadkit's C kernel, one pass per layer")
            except c_ops.CKernelUnavailable as reason:
                logger.warning("RoAd rotations on CPU: torch ops (slower); no C kernel: %s", reason)

    def _road_layers(self) -> dict[str, RoadLinear]:
        return {name: m for name, m in self.modules.items() if isinstance(m, RoadLinear)}

    def _sub_names(self, name: str) -> list[str]:
        return self.packed_modules.get(name, [name])

    def check_road_adapter(self, adapter: RoadAdapter) -> dict[str, ModuleRotation]:
        """The adapter's rotations by vLLM module name; raises `RoadAdapterError` if any cannot be served."""
        where = f"RoAd adapter {adapter.directory!r}"
        mapper = getattr(self.model, "hf_to_vllm_mapper", None)
        mapper = mapper.get_rename_mapper() if mapper is not None else None  # renames only, as vLLM's LoRA
        rotations, trained = {}, {}  # by vLLM module name; the module name in the checkpoint
        for path, rotation in adapter.rotations.items():
            name = mapper.map_name(path + SUFFIX) if mapper is not None else path + SUFFIX
            if name is None:
                raise RoadAdapterError(f"{where}: module {path!r} has no counterpart in the served model.")
            rotations[name.removesuffix(SUFFIX)] = rotation
            trained[name.removesuffix(SUFFIX)] = path
        layers = self._road_layers()
        servable = {sub for name in layers for sub in self._sub_names(name)}
        unknown = sorted(set(rotations) - servable)
        if unknown:
            raise RoadAdapterError(
                f"{where} targets {len(unknown)} modules that this server cannot adapt: "
                f"{some_of(unknown, shown=LIST_LIMIT)}. Served linear layers look like "
                f"{some_of(sorted(servable), shown=LIST_LIMIT)}; RoAd on embeddings, the output head and MoE experts "
                "is not served."
            )
        for name, layer in layers.items():
            subs = [rotations.get(sub) for sub in self._sub_names(name)]
            if any(r is not None for r in subs):
                try:
                    layer.check_rotations(subs, where, [trained.get(sub, sub) for sub in self._sub_names(name)])
                except ValueError as err:
                    raise RoadAdapterError(str(err)) from err
        if adapter.base_fingerprint and os.environ.get(TRUST_BASE_ENV) != "1":
            self._check_base(adapter, {path: name for name, path in trained.items()})
        self._probe(where, layers, rotations)
        return rotations

    def _probe(self, where: str, layers: dict[str, RoadLinear], rotations: dict[str, ModuleRotation]) -> None:
        """Before a layer serves its first RoAd adapter, check its serving path against the closed form
        (`RoadLinear.probe`); a mismatch turns RoAd serving off for this server, with the reason."""
        if self.road_disabled:
            raise RoadAdapterError(f"{where} cannot be served: {self.road_disabled}")
        for name, layer in layers.items():
            subs = [rotations.get(sub) for sub in self._sub_names(name)]
            if name in self.probed_layers or all(r is None for r in subs):
                continue
            problem = layer.probe(subs)
            if problem:
                self.road_disabled = (
                    f"RoAd serving is off on this server: {problem}, so this vLLM's layers do not behave as "
                    f"roadkit expects (it checked vllm {SUPPORTED}); LoRA adapters are still served"
                )
                logger.error("roadkit: %s.", self.road_disabled)
                raise RoadAdapterError(f"{where} cannot be served: {self.road_disabled}.")
            self.probed_layers.add(name)

    def _check_base(self, adapter: RoadAdapter, served_name: dict[str, str]) -> None:
        """Refuse an adapter whose recorded base weights differ from the served model's (another base)."""
        layers = self._road_layers()
        where = {sub: (layers[n], i) for n in layers for i, sub in enumerate(self._sub_names(n))}
        differing = []
        for path, recorded in sorted(adapter.base_fingerprint.items()):
            layer, sub = where.get(served_name.get(path, ""), (None, 0))
            row = layer.first_weights(sub, len(recorded)) if layer is not None else None
            if row is not None and fingerprint_differs(recorded, row):
                differing.append(path)
        if differing:
            raise RoadAdapterError(
                f"RoAd adapter {adapter.directory!r} was trained on another base model: the weights of "
                f"{some_of(differing, shown=LIST_LIMIT)} differ from the ones it recorded (base_model_name_or_path: "
                f"{adapter.config.base_model_name_or_path!r}). Serve it on that base; if you know this one is "
                f"right, set {TRUST_BASE_ENV}=1 in the server's environment."
            )

    def _add_adapter(self, lora: LoRAModel) -> None:
        if isinstance(lora, RoadAdapterModel):  # nothing to pack: rotations are per module already
            self._registered_adapters[lora.id] = lora
        else:
            super()._add_adapter(lora)

    def activate_adapter(self, lora_id: int) -> bool:
        activated = super().activate_adapter(lora_id)  # puts the adapter in a slot; resets the slot's rows
        adapter = self._registered_adapters.get(lora_id)
        if activated and isinstance(adapter, RoadAdapterModel):
            slot = self.lora_index_to_id.index(lora_id)
            for name, layer in self._road_layers().items():
                subs = [adapter.rotations.get(sub) for sub in self._sub_names(name)]
                if any(r is not None for r in subs):
                    layer.set_road(slot, subs)
        return activated

    def _set_adapter_mapping(self, mapping: Any) -> None:
        super()._set_adapter_mapping(mapping)
        for punica, routing in self.road_routings.values():
            if punica.indices_len[0] is not None:
                routing.update(punica.token_lora_indices)


class RoadWorkerLoRAManager(LRUCacheWorkerLoRAManager):
    """vLLM's worker-side adapter manager: RoAd directories are read here, all others by vLLM.

    A RoAd adapter is read from disk once, when the engine adds it (`check`), and its checked rotations
    stay in host memory until the engine removes it. vLLM evicts adapters from its CPU cache
    (`--max-cpu-loras`) and reloads them when a request needs them again; a RoAd adapter then comes back
    from that snapshot (a LoRA adapter from a private copy of its files, `PrivateCopies`), so what was
    accepted stays servable even if its directory changes or breaks afterwards, and reactivating it
    cannot fail. The snapshot costs 8 bytes per adapted output feature (float32 c and s), e.g. 1.2 MB
    for SmolLM2-135M with every linear layer adapted.
    """

    _manager_cls = RoadLoRAModelManager

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accepted: dict[int, RoadAdapterModel] = {}  # adapter id -> its rotations, as checked
        self.pending: dict[int, RoadAdapterModel] = {}  # checked on this worker, not yet added by the engine
        self.lora_copies = PrivateCopies()  # LoRA adapters: vLLM reloads them from these copies
        self.replacing: set[int] = set()  # adapters the engine is reloading in place (read them anew)

    def check(self, lora_request: LoRARequest) -> None:
        """Read and check a RoAd directory against this worker's layers and keep it, pending, for `add_adapter`."""
        adapter = read_road_adapter(get_adapter_absolute_path(lora_request.lora_path))
        rotations = self._adapter_manager.check_road_adapter(adapter)
        self.pending[lora_request.lora_int_id] = RoadAdapterModel(lora_request.lora_int_id, rotations)

    def _load_adapter(self, lora_request: LoRARequest) -> LoRAModel:
        adapter_id = lora_request.lora_int_id
        replacing = adapter_id in self.replacing  # set by the engine for an in-place reload, just before it
        if adapter_id in self.pending:  # a RoAd adapter `check`ed for this add
            self.accepted[adapter_id] = self.pending.pop(adapter_id)
            self.lora_copies.drop(adapter_id)
        elif adapter_id not in self.accepted or replacing:
            path = get_adapter_absolute_path(lora_request.lora_path)
            if is_road_directory(path):  # reached only when the engine skipped `checked_add_lora`
                self.check(lora_request)
                self.accepted[adapter_id] = self.pending.pop(adapter_id)
            else:
                model = self.lora_copies.load(lora_request, path, super()._load_adapter, replacing, check_lora_values)
                self.accepted.pop(adapter_id, None)
                self.replacing.discard(adapter_id)
                return model
        self.replacing.discard(adapter_id)
        return self.accepted[adapter_id].clone(adapter_id)

    def remove_adapter(self, adapter_id: int) -> bool:
        self.accepted.pop(adapter_id, None)
        self.pending.pop(adapter_id, None)
        self.lora_copies.drop(adapter_id)
        return super().remove_adapter(adapter_id)


def _at(lora_request: LoRARequest, path: str) -> LoRARequest:
    """The same request, reading the adapter from `path`."""
    moved = copy.copy(lora_request)
    moved.lora_path = path
    return moved


class PrivateCopies:
    """Private copies of the LoRA adapter directories a worker accepted, so vLLM's reloads of an evicted
    adapter read what was accepted, not whatever the user's directory holds by then.

    vLLM keeps at most `--max-cpu-loras` adapters in memory and reads an evicted one again from its
    directory; a directory changed or damaged since would make that reload fail inside a step, which
    stops the engine for every request. The copy (the directory's top-level files, the size of the
    adapter on disk) is made before the first load, in a temporary folder of this worker, and
    deleted when the engine removes the adapter or the worker exits.
    """

    def __init__(self) -> None:
        self.root: Optional[str] = None
        self.copies: dict[int, str] = {}  # adapter id -> its copy

    def load(
        self,
        lora_request: LoRARequest,
        path: str,
        load: Callable[[LoRARequest], LoRAModel],
        fresh: bool = False,
        check: Callable[[LoRAModel, str], None] = lambda model, path: None,
    ) -> LoRAModel:
        """`load` the adapter from its private copy, made first (and `check`ed) if it has none or `fresh`
        asks for the directory's new contents (an in-place reload); the old copy stays if that fails."""
        adapter_id = lora_request.lora_int_id
        if adapter_id in self.copies and not fresh:
            return load(_at(lora_request, self.copies[adapter_id]))
        if not os.path.isdir(path):  # nothing to copy: vLLM says what is missing
            return load(lora_request)
        copied = self._copy(path)
        try:
            model = load(_at(lora_request, copied))
        except Exception:
            shutil.rmtree(copied, ignore_errors=True)
            return load(lora_request)  # the error names the user's directory, not the copy
        try:
            check(model, path)
        except Exception:
            shutil.rmtree(copied, ignore_errors=True)
            raise
        self.drop(adapter_id)
        self.copies[adapter_id] = copied
        return model

    def _copy(self, path: str) -> str:
        if self.root is None:
            self.root = tempfile.mkdtemp(prefix="roadkit-lora-")
            weakref.finalize(self, shutil.rmtree, self.root, ignore_errors=True)
        target = tempfile.mkdtemp(dir=self.root)
        for name in os.listdir(path):
            if os.path.isfile(os.path.join(path, name)):
                shutil.copy2(os.path.join(path, name), os.path.join(target, name))
        return target

    def drop(self, adapter_id: int) -> None:
        """Delete the copy of an adapter the engine no longer holds."""
        kept = self.copies.pop(adapter_id, None)
        if kept is not None:
            shutil.rmtree(kept, ignore_errors=True)


def check_lora_values(model: LoRAModel, path: str) -> None:
    """Refuse a LoRA adapter with NaN or infinite weights: served, it turns other requests' answers into
    empty text through the shared KV cache, as a RoAd adapter would."""
    bad = total = 0
    for weights in model.loras.values():
        for name in ("lora_a", "lora_b", "bias"):
            value = getattr(weights, name, None)
            for tensor in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    bad += int((~torch.isfinite(tensor)).sum())
                    total += tensor.numel()
    if bad:
        raise RoadAdapterError(
            f"LoRA adapter {path!r}: {bad} of its {total} weights are NaN or infinite; the training that wrote "
            "it probably diverged. Retrain it or serve an earlier checkpoint."
        )


def _worker_manager(worker: Any) -> RoadWorkerLoRAManager:
    return getattr(worker, "worker", worker).model_runner.lora_manager


def adapter_memory_on_worker(worker: Any) -> dict[str, int]:
    """Bytes of adapter state in a worker's model (`LLM.collective_rpc(adapter_memory_on_worker)`): vLLM's
    LoRA tensors (the `lora_*` and `embeddings_*` tensors of its LoRA layers) and the RoAd slot tables."""
    seen: set[int] = set()
    lora = road = 0
    for module in worker.model_runner.model.modules():
        for name, value in vars(module).items():
            if isinstance(value, SlotTable):
                road += sum(t.numel() * t.element_size() for t in (value.c, value.s, value.k, value.w, value.half))
            elif name.startswith(("lora_", "embeddings_")):
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor) and id(t) not in seen:
                        seen.add(id(t))
                        lora += t.numel() * t.element_size()
    return {"lora_tensors": lora, "road_tables": road}


def check_on_worker(worker: Any, lora_request: LoRARequest) -> Optional[str]:
    """Run on every worker before an adapter is added: why this rank cannot serve it, or None.

    It returns the problem instead of raising: with several workers, vLLM's executor stops reading
    replies at the first worker error, and the other workers' replies would answer later calls.
    """
    try:
        _worker_manager(worker).check(lora_request)
    except RoadAdapterError as err:
        return str(err)
    return None


def drop_pending_on_worker(worker: Any, adapter_id: int) -> None:
    """Forget a checked adapter (or an in-place reload) that another worker, or vLLM, refused."""
    manager = _worker_manager(worker)
    manager.pending.pop(adapter_id, None)
    manager.replacing.discard(adapter_id)


def replacing_on_worker(worker: Any, adapter_id: int) -> None:
    """The engine reloads this adapter in place: its next load reads the directory anew."""
    _worker_manager(worker).replacing.add(adapter_id)


def checked_add_lora(add_lora: Callable[[Any, LoRARequest], bool]) -> Callable[[Any, LoRARequest], bool]:
    """Wrap an executor's `add_lora`: a RoAd directory is read and checked on every worker, and a
    problem is raised here, in the engine, as one `RoadAdapterError` before any worker changes."""

    @functools.wraps(add_lora)
    def wrapped(executor: Any, lora_request: LoRARequest) -> bool:
        path = get_adapter_absolute_path(lora_request.lora_path)
        if is_road_directory(path):
            problems = [p for p in executor.collective_rpc(check_on_worker, args=(lora_request,)) if p]
            if problems:
                executor.collective_rpc(drop_pending_on_worker, args=(lora_request.lora_int_id,))
                raise RoadAdapterError(problems[0])
            if not read_base_fingerprint(path):  # else the workers compared the base's weights
                warn_if_other_base(path, lora_request.lora_name, executor.vllm_config.model_config)
        if lora_request.load_inplace:
            executor.collective_rpc(replacing_on_worker, args=(lora_request.lora_int_id,))
        try:
            return add_lora(executor, lora_request)
        except Exception:
            executor.collective_rpc(drop_pending_on_worker, args=(lora_request.lora_int_id,))
            raise

    wrapped.roadkit_wrapped = True  # type: ignore[attr-defined]
    return wrapped


def warn_if_other_base(path: str, lora_name: str, model_config: Any) -> None:
    """Log a warning when the adapter records a base model other than the one served (for adapters with
    no base fingerprint: saved by PEFT or an older roadkit)."""
    recorded = recorded_base(path)
    served = [model_config.model, getattr(model_config, "served_model_name", None)]
    if recorded is None or any(same_model(recorded, m) for m in served if isinstance(m, str)):
        return
    logger.warning(
        "roadkit: RoAd adapter %r records base model %r, but this server serves %r; unless that is the same "
        "model (a copy, or an export of a GGUF file), the adapter's answers are wrong here.",
        lora_name,
        recorded,
        model_config.model,
    )


def deferred_remove_lora(remove_lora: Callable[[Any, int], bool]) -> Callable[[Any, int], bool]:
    """Wrap `EngineCore.remove_lora`: an adapter that queued or running requests still use is removed
    once they are done (`flush_removals`), so removing it cannot make them reload it from disk."""

    @functools.wraps(remove_lora)
    def wrapped(engine: Any, lora_id: int) -> bool:
        if lora_id in _adapters_in_use(engine):
            engine.__dict__.setdefault("roadkit_removals", set()).add(lora_id)
            return True
        return remove_lora(engine, lora_id)

    wrapped.roadkit_wrapped = True  # type: ignore[attr-defined]
    return wrapped


def _adapters_in_use(engine: Any) -> set[int]:
    return {r.lora_request.lora_int_id for r in engine.scheduler.requests.values() if r.lora_request is not None}


def removing_after(step: Callable[..., Any], remove_lora: Callable[[Any, int], bool]) -> Callable[..., Any]:
    """Wrap an `EngineCore` step: after it, remove the deferred adapters no request uses any more."""

    @functools.wraps(step)
    def wrapped(engine: Any, *args: Any, **kwargs: Any) -> Any:
        result = step(engine, *args, **kwargs)
        pending = engine.__dict__.get("roadkit_removals")
        if pending:
            for lora_id in sorted(pending - _adapters_in_use(engine)):
                pending.discard(lora_id)
                remove_lora(engine, lora_id)
        return result

    wrapped.roadkit_wrapped = True  # type: ignore[attr-defined]
    return wrapped
