"""The API server side: bad RoAd adapters answered with HTTP 400, not 500.

vLLM's `/v1/load_lora_adapter` reports every failure of the engine to load an adapter as an
internal error. A RoAd directory that cannot be served is the client's mistake, so it is checked
here first (files, config, parameters: what needs no model), and what the engine refuses for the
model (unknown modules, shards that split groups) comes back as a 400 with the engine's message.
"""

from __future__ import annotations

import functools
from http import HTTPStatus
from typing import Any

from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.lora.utils import get_adapter_absolute_path

from .adapter import RoadAdapterError, is_road_directory, read_road_adapter

MARKER = "RoAd adapter "  # every RoadAdapterError message starts with it


def _bad_request(lora_name: str, message: str) -> Any:
    """A 400 naming the adapter: vLLM replaces file paths in error messages with '<path>', so the
    name the client gave is what tells several adapters apart."""
    return create_error_response(
        f"adapter {lora_name!r}: {message}", err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST
    )


def install() -> None:
    """Wrap `OpenAIServingModels.load_lora_adapter` (once per process)."""
    original = OpenAIServingModels.load_lora_adapter
    if getattr(original, "roadkit_wrapped", False):
        return

    @functools.wraps(original)
    async def load_lora_adapter(self: OpenAIServingModels, request: Any, base_model_name: str | None = None) -> Any:
        if request.lora_path and is_road_directory(get_adapter_absolute_path(request.lora_path)):
            try:
                read_road_adapter(get_adapter_absolute_path(request.lora_path))
            except RoadAdapterError as err:
                return _bad_request(request.lora_name, str(err))
        result = await original(self, request, base_model_name)
        error = getattr(result, "error", None)
        if error is not None and error.code == HTTPStatus.INTERNAL_SERVER_ERROR and MARKER in error.message:
            return _bad_request(request.lora_name, error.message)
        return result

    load_lora_adapter.roadkit_wrapped = True  # type: ignore[attr-defined]
    OpenAIServingModels.load_lora_adapter = load_lora_adapter  # type: ignore[method-assign, unused-ignore]  # typed only with vLLM installed
