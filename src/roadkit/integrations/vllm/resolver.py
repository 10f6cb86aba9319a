"""Adapters on demand: vLLM's API server serves `model=` names from an adapter store, compositions included.

With `ROADKIT_ADAPTER_STORE=DIR` and vLLM's `VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`, a request whose
`model` the server does not know goes to `OpenAIServingModels.resolve_lora`, where vLLM asks its LoRA
resolver plugins. roadkit answers there, before them, from the store (`store`): a resolver plugin
can only return an adapter or nothing, and serving a store needs more:

- the adapter in DIR, or the composition the name describes, built on demand;
- a name that means the same composition as one already loaded (`b+a` after `a+b`) is served by that
  adapter, in the same slot (the name is kept as an alias of it; at most `store.MAX_ALIASES` aliases are
  kept, the oldest dropped first, and a dropped alias is resolved again when it comes back);
- a malformed composition gets a 400 that shows the grammar, a missing adapter vLLM's 404 (a 400 naming
  it when it is part of a composition), and adapters that cannot be composed (overlapping subspaces,
  other group sizes, other bases) or served (the engine's checks) a 400 with the reason, instead of
  vLLM's generic "could not be loaded";
- at most `store.MAX_COMPOSED` compositions stay loaded: the least recently requested one is unloaded
  (from the engine too, once no request uses it). The engine client marks each request's adapter as
  used (`frontend.recent_compositions`).
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections import OrderedDict
from http import HTTPStatus
from typing import Any, Callable

from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.lora.request import LoRARequest

from .frontend import recent_compositions
from .store import (
    MAX_ALIASES,
    MAX_COMPOSED,
    STORE_ENV,
    AdapterMissingError,
    AdapterStore,
    StoreError,
    looks_composed,
    parse,
)

logger = logging.getLogger(f"vllm.{__name__}")  # under vLLM's logger, whose handler prints it


def _bad_request(message: str) -> Any:
    return create_error_response(message, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST)


def _composing_resolve(original: Callable[..., Any], store: AdapterStore) -> Callable[..., Any]:
    @functools.wraps(original)
    async def resolve_lora(self: OpenAIServingModels, lora_name: str) -> Any:
        if lora_name in self.lora_requests:
            return self.lora_requests[lora_name]
        try:
            expression = parse(lora_name)
        except StoreError as err:
            if looks_composed(lora_name):
                return _bad_request(str(err))
            return await original(self, lora_name)  # not ours: other resolvers, or vLLM's 404
        canonical = expression.canonical
        composed = recent_compositions(self.engine_client)
        aliases: OrderedDict[str, int] = self.__dict__.setdefault("roadkit_aliases", OrderedDict())
        async with self.lora_resolver_lock[canonical]:
            known = self.lora_requests.get(canonical)
            if known is None:
                try:
                    path = store.resolve(expression)
                except AdapterMissingError as err:
                    if expression.mode is None:  # vLLM answers: the model does not exist (404)
                        return create_error_response(str(err), "NotFoundError", HTTPStatus.NOT_FOUND)
                    return _bad_request(f"{lora_name!r}: {err}")  # a component is missing: say which
                except StoreError as err:
                    return _bad_request(str(err) if lora_name == canonical else f"model {lora_name!r}: {err}")
                known = LoRARequest(lora_name=canonical, lora_int_id=self.lora_id_counter.inc(1), lora_path=path)
                try:
                    await self.engine_client.add_lora(known)
                except Exception as err:  # the engine's checks: values, modules, base
                    return _bad_request(f"adapter {lora_name!r}: {' '.join(str(err).split())}")
                self.lora_requests[canonical] = known
                logger.info("roadkit: serving %r from the adapter store (%s)", canonical, path)
            if lora_name != canonical:  # the serving code looks the request's own name up: an alias, same id
                alias = copy.copy(known)
                alias.lora_name = lora_name
                self.lora_requests[lora_name] = alias
                aliases[lora_name] = known.lora_int_id
                while len(aliases) > MAX_ALIASES:
                    name, lora_id = aliases.popitem(last=False)
                    if getattr(self.lora_requests.get(name), "lora_int_id", None) == lora_id:
                        del self.lora_requests[name]
            if expression.mode is not None:
                composed[known.lora_int_id] = canonical
                composed.move_to_end(known.lora_int_id)
        await _unload_past_limit(self, composed)
        return known

    return resolve_lora


async def _unload_past_limit(models: OpenAIServingModels, composed: OrderedDict[int, str]) -> None:
    """Unload the least recently requested compositions beyond `MAX_COMPOSED`."""
    while len(composed) > MAX_COMPOSED:
        lora_id, _ = composed.popitem(last=False)
        names = [n for n, r in models.lora_requests.items() if r.lora_int_id == lora_id]
        for name in names:  # the canonical name and its aliases
            del models.lora_requests[name]
        if names:
            await models.engine_client.remove_lora(lora_id)


def install() -> None:
    """With `ROADKIT_ADAPTER_STORE` set, register the store's resolver and wrap `resolve_lora` (once)."""
    root = os.environ.get(STORE_ENV)
    if not root or getattr(OpenAIServingModels.resolve_lora, "roadkit_wrapped", False):
        return
    wrapped = _composing_resolve(OpenAIServingModels.resolve_lora, AdapterStore(root))
    wrapped.roadkit_wrapped = True  # type: ignore[attr-defined]
    OpenAIServingModels.resolve_lora = wrapped  # type: ignore[method-assign, unused-ignore]
    if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() not in ("1", "true"):
        logger.warning(
            "roadkit: %s is set, but adapters are resolved by name only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1.",
            STORE_ENV,
        )
