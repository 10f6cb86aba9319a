"""Greedy generation for a batch of prompts, each with its own adapter, in one `generate` call."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .layers import BASE

BASE_ALIASES = ("base", BASE)  # what a user may write for "no adapter"


def left_padded(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenize prompts padded on the left, so every row's last prompt token sits at the end and a
    decoder-only model continues all rows in step."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token to pad prompts with.")
    rows = [tokenizer(p).input_ids for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], adapter_names: Optional[Sequence[str]] = None,
             max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations of `prompts` (new text only, special tokens dropped).

    With `adapter_names` (one per prompt: an adapter name, or "base" / "__base__" for none), the
    whole batch runs in one `RoadModel.generate` call with per-row adapters.
    """
    if not prompts:
        return []
    batch = left_padded(tokenizer, prompts)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    kwargs: dict[str, Any] = {}
    if adapter_names is not None:
        if len(adapter_names) != len(prompts):
            raise ValueError(f"{len(adapter_names)} adapter names for {len(prompts)} prompts.")
        kwargs["adapter_names"] = [BASE if n in BASE_ALIASES else n for n in adapter_names]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**batch, **kwargs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)
