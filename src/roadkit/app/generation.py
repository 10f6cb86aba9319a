"""Greedy generation for a batch of prompts, each with its own adapter, in one `generate` call.

A prompt is plain text to continue, or (`chat=True`) the content of a user turn, rendered with the
tokenizer's chat template and its generation prompt: the ids an OpenAI-style chat server sends the model.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ..errors import InputError
from ..layers import BASE
from .data import chat_prompt_ids, has_chat_template, pad_token_id, prompt_ids

BASE_ALIASES = ("base", BASE)  # what a user may write for "no adapter"


def context_length(model: Any) -> Optional[int]:
    """The most positions the model takes (`max_position_embeddings` or `n_positions` of its config), or None
    when its config does not say."""
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = getattr(model.get_base_model(), "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def left_padded(tokenizer: Any, prompts: Sequence[str], chat: bool = False) -> dict[str, torch.Tensor]:
    """Tokenize prompts (with `chat`, as user turns of a conversation) padded on the left, so every row's last
    prompt token sits at the end and a decoder-only model continues all rows in step."""
    pad = pad_token_id(tokenizer)
    if chat and not has_chat_template(tokenizer):
        raise InputError("the tokenizer has no chat template to render chat prompts with; leave out --chat.")
    rows = [chat_prompt_ids(tokenizer, p) if chat else prompt_ids(tokenizer, p) for p in prompts]
    empty = [i + 1 for i, r in enumerate(rows) if not r]
    if empty:  # a row of padding only: the model has nothing to continue (and fails, or makes up text)
        raise InputError(
            f"prompt {', '.join(map(str, empty))} of {len(rows)} is empty (the tokenizer adds no "
            "beginning-of-sequence token to it); give every prompt some text."
        )
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def stop_ids(model: Any, tokenizer: Any) -> Optional[list[int]]:
    """The token ids that end a generation: the tokenizer's end-of-sequence token and the generation config's
    (None when there are none)."""
    config = getattr(model, "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    ids = [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]
    return list(dict.fromkeys(int(i) for i in ids if i is not None)) or None


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    adapter_names: Optional[Sequence[str]] = None,
    max_new_tokens: int = 32,
    chat: bool = False,
) -> list[str]:
    """Greedy continuations of `prompts` (new text only, special tokens dropped); with `chat`, the answers to
    `prompts` as user turns. Generation stops at the tokenizer's end-of-sequence token and at those of the
    model's generation config (where chat templates' end-of-turn tokens are listed).

    With `adapter_names` (one per prompt: an adapter name, or "base" / "__base__" for none), the
    whole batch runs in one `RoadModel.generate` call with per-row adapters.
    """
    if not prompts:
        return []
    batch = left_padded(tokenizer, prompts, chat)
    context = context_length(model)
    if context is not None and batch["input_ids"].shape[1] + max_new_tokens > context:
        raise InputError(
            f"the longest prompt ({batch['input_ids'].shape[1]} tokens) plus {max_new_tokens} new "
            f"tokens exceeds the model's context of {context} tokens; shorten the prompt or generate "
            "fewer tokens."
        )
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    kwargs: dict[str, Any] = {}
    if adapter_names is not None:
        if len(adapter_names) != len(prompts):
            raise InputError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts.")
        kwargs["adapter_names"] = [BASE if n in BASE_ALIASES else n for n in adapter_names]
    out = model.generate(
        **batch,
        **kwargs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id(tokenizer),
        eos_token_id=stop_ids(model, tokenizer),
    )
    new = out[:, batch["input_ids"].shape[1] :]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
