"""Standalone transformers model directories: a base with an adapter merged into its weights, or a
base model alone (a `.gguf` file, dequantized) in a form vLLM and transformers load.

The merged model computes what base + adapter computes, with no roadkit needed to load it. Its
logits are compared with the adapted model's on a probe batch before the merge is written.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import StorageError
from ..fileio import PathLike, current_umask
from ..model import RoadModel
from .loading import one_line


def probe_batch(model: Any, length: int = 16, rows: int = 2) -> torch.Tensor:
    """Fixed pseudo-random token ids for comparing two models' logits."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (rows, length), generator=generator)


@torch.no_grad()
def merge_adapter(base: Any, adapter_dir: PathLike) -> tuple[Any, float]:
    """Merge the adapter saved in `adapter_dir` into `base` (changed in place); returns the plain model
    and the largest absolute logit difference between it and base + adapter on a probe batch."""
    model = RoadModel.from_pretrained(base, adapter_dir)
    ids = probe_batch(base).to(next(base.parameters()).device)
    adapted = model(input_ids=ids).logits.float()
    merged = model.merge_and_unload()
    difference = float((merged(input_ids=ids).logits.float() - adapted).abs().max())
    return merged, difference


def save_merged(model: Any, tokenizer: Any, directory: PathLike) -> None:
    """Write a merged model as safetensors, with the tokenizer when there is one. A failed write (a full
    disk, say) is a StorageError (an OSError), whatever safetensors raised."""
    _save(model, tokenizer, directory, "the merged model")


def save_base(model: Any, tokenizer: Any, directory: PathLike) -> None:
    """Write a base model (one read from a GGUF file, say) as a transformers directory that vLLM
    serves: config.json, safetensors weights, generation_config.json and the tokenizer (tokenizer.json,
    tokenizer_config.json, and chat_template.jinja when it has a chat template). The model keeps its
    class and module names, so adapters trained on the GGUF file load on the directory."""
    _save(model, tokenizer, directory, "the base model")


def _save(model: Any, tokenizer: Any, directory: PathLike, what: str) -> None:
    from safetensors import SafetensorError

    try:
        model.save_pretrained(directory)  # safetensors: the default since transformers 4.35
    except SafetensorError as err:
        raise StorageError(f"cannot write {what} to {os.fspath(directory)!r}: {one_line(err)}") from err
    # safetensors creates its files 0600, which a server running as another user cannot read
    mode = 0o666 & ~current_umask()
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            os.chmod(os.path.join(directory, name), mode)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
