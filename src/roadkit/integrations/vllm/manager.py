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

import functools
from typing import Any, Callable, Optional

from vllm.lora.lora_model import LoRAModel
from vllm.lora.model_manager import LRUCacheLoRAModelManager
from vllm.lora.request import LoRARequest
from vllm.lora.utils import get_adapter_absolute_path, replace_submodule
from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

from .adapter import ModuleRotation, RoadAdapter, RoadAdapterError, is_road_directory, quote_some, read_road_adapter
from .layers import RoadLinear, is_servable
from .ops import SlotRouting

SUFFIX = ".road_theta"


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
        self.road_routings: dict[int, tuple[Any, SlotRouting]] = {}
        for name, module in list(self.modules.items()):
            if not is_servable(module):
                continue
            punica = module.punica_wrapper
            if id(punica) not in self.road_routings:
                routing = SlotRouting(self.max_num_batched_tokens, self.lora_slots, self.device)
                self.road_routings[id(punica)] = (punica, routing)
            road = RoadLinear(module, name, self.lora_slots, self.road_routings[id(punica)][1])
            replace_submodule(self.model, name, road)
            self.modules[name] = road

    def _road_layers(self) -> dict[str, RoadLinear]:
        return {name: m for name, m in self.modules.items() if isinstance(m, RoadLinear)}

    def _sub_names(self, name: str) -> list[str]:
        return self.packed_modules.get(name, [name])

    def check_road_adapter(self, adapter: RoadAdapter) -> dict[str, ModuleRotation]:
        """The adapter's rotations by vLLM module name; raises `RoadAdapterError` if any cannot be served."""
        where = f"RoAd adapter {adapter.directory!r}"
        mapper = getattr(self.model, "hf_to_vllm_mapper", None)
        mapper = mapper.get_rename_mapper() if mapper is not None else None  # renames only, as vLLM's LoRA
        rotations = {}
        for path, rotation in adapter.rotations.items():
            name = mapper.map_name(path + SUFFIX) if mapper is not None else path + SUFFIX
            if name is None:
                raise RoadAdapterError(f"{where}: module {path!r} has no counterpart in the served model.")
            rotations[name.removesuffix(SUFFIX)] = rotation
        layers = self._road_layers()
        servable = {sub for name in layers for sub in self._sub_names(name)}
        unknown = sorted(set(rotations) - servable)
        if unknown:
            raise RoadAdapterError(
                f"{where} targets {len(unknown)} modules that this server cannot adapt: {quote_some(unknown)}. "
                f"Served linear layers look like {quote_some(sorted(servable))}; RoAd on embeddings, the output "
                "head and MoE experts is not served."
            )
        for name, layer in layers.items():
            subs = [rotations.get(sub) for sub in self._sub_names(name)]
            if any(r is not None for r in subs):
                try:
                    layer.check_rotations(subs, where)
                except ValueError as err:
                    raise RoadAdapterError(str(err)) from err
        return rotations

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
    """vLLM's worker-side adapter manager: RoAd directories are read here, all others by vLLM."""

    _manager_cls = RoadLoRAModelManager

    def _load_adapter(self, lora_request: LoRARequest) -> LoRAModel:
        path = get_adapter_absolute_path(lora_request.lora_path)
        if not is_road_directory(path):
            return super()._load_adapter(lora_request)
        adapter = read_road_adapter(path)
        rotations = self._adapter_manager.check_road_adapter(adapter)
        return RoadAdapterModel(lora_request.lora_int_id, rotations)


def check_on_worker(worker: Any, lora_request: LoRARequest) -> Optional[str]:
    """Run on every worker before an adapter is added: why this rank cannot serve it, or None.

    It returns the problem instead of raising: with several workers, vLLM's executor stops reading
    replies at the first worker error, and the other workers' replies would answer later calls.
    """
    manager = getattr(worker, "worker", worker).model_runner.lora_manager
    path = get_adapter_absolute_path(lora_request.lora_path)
    try:
        manager._adapter_manager.check_road_adapter(read_road_adapter(path))
    except RoadAdapterError as err:
        return str(err)
    return None


def checked_add_lora(add_lora: Callable[[Any, LoRARequest], bool]) -> Callable[[Any, LoRARequest], bool]:
    """Wrap an executor's `add_lora`: RoAd adapters are checked on every worker first, and a problem
    is raised here, in the engine, as one `RoadAdapterError` before any worker changes."""

    @functools.wraps(add_lora)
    def wrapped(executor: Any, lora_request: LoRARequest) -> bool:
        if is_road_directory(get_adapter_absolute_path(lora_request.lora_path)):
            problems = [p for p in executor.collective_rpc(check_on_worker, args=(lora_request,)) if p]
            if problems:
                raise RoadAdapterError(problems[0])
        return add_lora(executor, lora_request)

    wrapped.roadkit_wrapped = True  # type: ignore[attr-defined]
    return wrapped
