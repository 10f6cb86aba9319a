"""Adapter directories on disk, in PEFT's layout.

<dir>/adapter_config.json
<dir>/adapter_model.safetensors      keys: base_model.model.<module path>.road_theta / .road_alpha
                                           base_model.model.<module path>.<param>  (modules_to_save)
<dir>/<other adapter>/...            every adapter but "default" in a subfolder named after it
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from safetensors.torch import load_file, save

from .config import CONFIG_NAME, RoadConfig
from .extras import MissingExtraError, require
from .fileio import PathLike, atomic_write_bytes

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
DEFAULT_ADAPTER = "default"


def adapter_key(module_path: str, param: str) -> str:
    """The tensor key PEFT uses for `param` of the module at `module_path` (no adapter name in it)."""
    return f"{KEY_PREFIX}{module_path}.{param}"


def adapter_subdir(directory: PathLike, adapter_name: str) -> str:
    """Where `adapter_name` lives inside a saved directory: the root for "default", else a subfolder."""
    root = os.fspath(directory)
    return root if adapter_name == DEFAULT_ADAPTER else os.path.join(root, adapter_name)


def write_adapter(directory: PathLike, config: RoadConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Write one adapter (weights first, then config, each file atomically)."""
    os.makedirs(directory, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(os.path.join(directory, WEIGHTS_NAME), save(plain, metadata={"format": "pt"}))
    config.save_pretrained(directory)


def _resolve(model_id: PathLike, subfolder: Optional[str], revision: Optional[str]) -> str:
    """A local directory holding the adapter: `model_id` itself, or a Hub snapshot of it."""
    local = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    if os.path.isdir(local):
        return local
    if os.path.exists(os.fspath(model_id)) or os.path.isabs(os.fspath(model_id)):
        raise FileNotFoundError(f"adapter directory {local!r} does not exist.")
    try:
        require("hf", "reading it as a Hugging Face Hub id")
    except MissingExtraError as err:  # most often a mistyped local path
        raise FileNotFoundError(f"adapter directory {local!r} does not exist; {err}") from None
    from huggingface_hub import snapshot_download

    pattern = f"{subfolder}/*" if subfolder else "*"
    try:
        root = snapshot_download(os.fspath(model_id), revision=revision, allow_patterns=[pattern])
    except Exception as err:  # network, auth, or unknown repo: say what was looked for
        raise FileNotFoundError(
            f"{os.fspath(model_id)!r} is neither a local adapter directory nor a reachable Hub repository: {err}"
        ) from err
    return os.path.join(root, subfolder) if subfolder else root


def read_adapter(
    model_id: PathLike, subfolder: Optional[str] = None, revision: Optional[str] = None
) -> tuple[RoadConfig, dict[str, torch.Tensor]]:
    """Read one adapter's config and tensors (on CPU) from a directory or a Hub repository id."""
    directory = _resolve(model_id, subfolder, revision)
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        inner = sorted(n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n, CONFIG_NAME)))
        if inner:
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {directory!r}, but its subfolders {', '.join(inner[:5])}"
                f"{' ...' if len(inner) > 5 else ''} hold adapters: give one of them, e.g. "
                f"{os.path.join(directory, inner[0])!r}."
            )
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}: not an adapter directory.")
    config = RoadConfig.from_pretrained(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(weights):
        path, read = weights, lambda: load_file(weights, device="cpu")
    elif os.path.isfile(legacy):
        path, read = legacy, lambda: torch.load(legacy, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory!r}.")
    try:
        tensors = read()
    except Exception as err:  # truncated or corrupt: SafetensorError, RuntimeError, EOFError, UnpicklingError...
        message = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"{path}: cannot read the adapter weights ({message}); the file is damaged.") from err
    return config, tensors
