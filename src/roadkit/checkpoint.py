"""Adapter directories on disk, in PEFT's layout.

<dir>/adapter_config.json
<dir>/adapter_model.safetensors      keys: base_model.model.<module path>.road_theta / .road_alpha
                                           base_model.model.<module path>.<param>  (modules_to_save)
<dir>/<other adapter>/...            every adapter but "default" in a subfolder named after it
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from .config import CONFIG_NAME, RoadConfig
from .errors import InputError, MissingFileError
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


BaseFingerprint = dict[str, list[float]]  # module path -> the first values of its weight's first row
FINGERPRINT_KEY = "roadkit.base_fingerprint"  # in the safetensors header's metadata, which PEFT ignores
FINGERPRINT_VALUES = 8
FINGERPRINT_MODULES = 4  # a server reads them back through the layers: a few forwards of a few rows


def weight_fingerprint(weight: torch.Tensor) -> Optional[list[float]]:
    """The first values of row 0 of an (out_features, in_features) floating-point weight, or None for a
    weight that has no such plain values (quantized, or sharded across processes)."""
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) or not weight.is_floating_point() or weight.dim() != 2:
        return None
    return [float(v) for v in weight[0, :FINGERPRINT_VALUES].detach().float().cpu()]


def fingerprint_differs(recorded: list[float], weight_row: torch.Tensor) -> bool:
    """Whether a served weight's first values differ from the recorded ones by more than rounding the
    same weights to bfloat16 (or float16) can explain."""
    served = weight_row.detach().float().cpu()[: len(recorded)]
    expected = torch.tensor(recorded, dtype=torch.float32)
    return served.shape != expected.shape or not torch.allclose(served, expected, rtol=2**-7, atol=1e-6)


def write_adapter(
    directory: PathLike,
    config: RoadConfig,
    tensors: dict[str, torch.Tensor],
    base_fingerprint: Optional[BaseFingerprint] = None,
) -> None:
    """Write one adapter (weights first, then config, each file atomically); `base_fingerprint` goes
    into the weights file's metadata."""
    os.makedirs(directory, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata = {"format": "pt"}
    if base_fingerprint:
        metadata[FINGERPRINT_KEY] = json.dumps(base_fingerprint, separators=(",", ":"))
    atomic_write_bytes(os.path.join(directory, WEIGHTS_NAME), _sorted_metadata(save(plain, metadata=metadata)))
    config.save_pretrained(directory)


def _sorted_metadata(data: bytes) -> bytes:
    """The same safetensors file with its metadata entries in sorted order. safetensors writes them in
    hash order, which changes from one save to the next, and two saves of the same adapter should be
    the same bytes. The header keeps its length, so the tensor data is untouched."""
    length = int.from_bytes(data[:8], "little")
    text = data[8 : 8 + length].decode("utf-8")
    header = json.loads(text)
    metadata = header.get("__metadata__") or {}
    if len(metadata) < 2:
        return data
    header["__metadata__"] = dict(sorted(metadata.items()))
    rewritten = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    if len(rewritten.encode("utf-8")) != len(text.rstrip(" ").encode("utf-8")):
        return data  # a formatting this code does not reproduce: keep safetensors' own bytes
    return data[:8] + rewritten.encode("utf-8").ljust(length, b" ") + data[8 + length :]


def read_base_fingerprint(directory: PathLike) -> BaseFingerprint:
    """The base fingerprint an adapter directory recorded ({} for adapters saved by PEFT or without one)."""
    try:
        with safe_open(os.path.join(directory, WEIGHTS_NAME), framework="pt") as fh:
            text = (fh.metadata() or {}).get(FINGERPRINT_KEY)
        data = json.loads(text) if text else {}
    except Exception:  # no or unreadable file, or a malformed entry: nothing to compare against
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(k): [float(x) for x in v]
        for k, v in data.items()
        if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)
    }


def adapter_directory(model_id: PathLike, subfolder: Optional[str] = None, revision: Optional[str] = None) -> str:
    """A local directory holding the adapter: `model_id` itself, or a Hub snapshot of it."""
    local = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    if os.path.isdir(local):
        return local
    if os.path.exists(os.fspath(model_id)) or os.path.isabs(os.fspath(model_id)):
        raise MissingFileError(f"adapter directory {local!r} does not exist.")
    try:
        require("hf", "reading it as a Hugging Face Hub id")
    except MissingExtraError as err:  # most often a mistyped local path
        raise MissingFileError(f"adapter directory {local!r} does not exist; {err}") from None
    from huggingface_hub import snapshot_download

    pattern = f"{subfolder}/*" if subfolder else "*"
    try:
        root = snapshot_download(os.fspath(model_id), revision=revision, allow_patterns=[pattern])
    except Exception as err:  # network, auth, or unknown repo: say what was looked for
        raise MissingFileError(
            f"{os.fspath(model_id)!r} is neither a local adapter directory nor a reachable Hub repository: {err}"
        ) from err
    return os.path.join(root, subfolder) if subfolder else root


def read_adapter(
    model_id: PathLike, subfolder: Optional[str] = None, revision: Optional[str] = None
) -> tuple[RoadConfig, dict[str, torch.Tensor]]:
    """Read one adapter's config and tensors (on CPU) from a directory or a Hub repository id."""
    directory = adapter_directory(model_id, subfolder, revision)
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)):
        inner = sorted(n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n, CONFIG_NAME)))
        if inner:
            raise MissingFileError(
                f"no {CONFIG_NAME} in {directory!r}, but its subfolders {', '.join(inner[:5])}"
                f"{' ...' if len(inner) > 5 else ''} hold adapters: give one of them, e.g. "
                f"{os.path.join(directory, inner[0])!r}."
            )
        raise MissingFileError(f"no {CONFIG_NAME} in {directory!r}: not an adapter directory.")
    config = RoadConfig.from_pretrained(directory)
    weights = os.path.join(directory, WEIGHTS_NAME)
    legacy = os.path.join(directory, LEGACY_WEIGHTS_NAME)
    if os.path.isfile(weights):
        path, read = weights, lambda: load_file(weights, device="cpu")
    elif os.path.isfile(legacy):
        path, read = legacy, lambda: torch.load(legacy, map_location="cpu", weights_only=True)
    else:
        raise MissingFileError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory!r}.")
    try:
        tensors = read()
    except Exception as err:  # truncated or corrupt: SafetensorError, RuntimeError, EOFError, UnpicklingError...
        message = " ".join(str(err).split()) or type(err).__name__
        raise InputError(f"{path}: cannot read the adapter weights ({message}); the file is damaged.") from err
    return config, tensors
