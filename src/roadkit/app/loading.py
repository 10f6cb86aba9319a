"""Base models and tokenizers from a local directory, a GGUF file or a Hugging Face Hub id, with short errors.

A `.gguf` file is read by transformers (through the `gguf` package, the `gguf` extra), dequantized to
float weights, and rebuilt as an ordinary transformers model, so it trains, merges and saves like any
other base model.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.parse
from typing import Any, Optional, Union

import torch

from ..errors import InputError, StorageError
from ..extras import MissingExtraError, require

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class LoadError(StorageError):
    """A model or tokenizer could not be loaded; the message says which and why, on one line."""


def one_line(err: BaseException) -> str:
    """An exception's message on a single line (library messages often span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def quiet_transformers() -> None:
    """Silence transformers', huggingface_hub's and bitsandbytes' progress bars and log lines
    (download retries, bitsandbytes' optional CPU kernels, which transformers' Trainer imports): a
    command reports its own progress, and its errors on one line."""
    import logging as std_logging

    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    std_logging.getLogger("bitsandbytes").setLevel(std_logging.ERROR)


def is_local(name_or_path: Union[str, os.PathLike]) -> bool:
    """Whether `name_or_path` names a local path (it exists, or is written like one) rather than a Hub id."""
    name = os.fspath(name_or_path)
    return os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def is_gguf(name_or_path: Union[str, os.PathLike]) -> bool:
    """Whether `name_or_path` names a GGUF model file (by its `.gguf` suffix)."""
    return os.fspath(name_or_path).lower().endswith(".gguf")


def _existing(name_or_path: Union[str, os.PathLike]) -> str:
    name = os.fspath(name_or_path)
    if is_gguf(name):
        if not os.path.isfile(name):
            raise LoadError(f"GGUF model file {name!r} does not exist.")
        require("gguf", f"loading {name!r}")  # transformers reads GGUF files with the gguf package
        return name
    if is_local(name) and not os.path.isdir(name):
        if os.path.isfile(name):
            raise LoadError(f"model {name!r} is a file, not a model directory (or a .gguf file).")
        raise LoadError(f"model directory {name!r} does not exist.")
    if not is_local(name):
        _check_hub(name)
    return name


def _check_hub(name: str) -> None:
    """Fail fast on a Hub id that is neither in the local Hugging Face cache nor reachable: huggingface_hub
    would retry for most of a minute, silently, before giving up. Offline mode (HF_HUB_OFFLINE=1) is
    left to transformers, which then reads the cache alone and fails at once."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    url = urllib.parse.urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=5).close()
    except OSError as err:
        raise LoadError(
            f"{_not_local(name)}it is not in the local Hugging Face cache, and the Hub "
            f"({constants.ENDPOINT}) cannot be reached ({one_line(err)}); give a local model "
            "directory or .gguf file, or connect to the network."
        ) from err


def _gguf_kwargs(name: str) -> tuple[str, dict[str, Any]]:
    """`from_pretrained`'s directory argument and extra keyword arguments for a model reference."""
    if is_gguf(name):
        directory, file = os.path.split(os.path.abspath(name))
        return directory, {"gguf_file": file}
    return name, {}


def _rebuilt(model: Any) -> Any:
    """A model read from GGUF rebuilt from its config and dequantized state dict: same logits, but an
    ordinary model (transformers refuses to save_pretrained one marked GGUF-quantized)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config).to(model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain


def _not_local(name: str) -> str:
    """For an error message: a name that is no local path was tried as a Hub id; say so first."""
    if os.path.exists(name):
        return ""
    return f"no local directory {name!r} exists, so it was tried as a Hugging Face Hub id: "


def same_model(a: Union[str, os.PathLike], b: Union[str, os.PathLike]) -> bool:
    """Whether two model references name the same model: local directories and files by their resolved
    absolute paths, Hub ids by their text."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.exists(a) or os.path.exists(b):
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    return a.rstrip("/") == b.rstrip("/")


QUANTIZATIONS = ("4bit", "8bit")


def _quantized_kwargs(quantize: str, dtype: torch.dtype, device: Union[str, torch.device, None]) -> dict[str, Any]:
    """`from_pretrained`'s keywords for a base quantized by bitsandbytes as it loads, on `device`: 4 bits as QLoRA
    (nf4, double quantization, computing in `dtype`) or LLM.int8()."""
    from transformers import BitsAndBytesConfig

    if quantize not in QUANTIZATIONS:
        raise InputError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}.")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingExtraError(f"--load-in-{quantize} needs bitsandbytes: pip install bitsandbytes")
    if quantize == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    target = torch.device(device if device is not None else "cpu")
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return {"quantization_config": config, "device_map": {"": target}}


def load_causal_lm(
    name_or_path: Union[str, os.PathLike],
    dtype: Union[torch.dtype, str, None] = None,
    device: Union[str, torch.device, None] = None,
    quantize: Optional[str] = None,
) -> Any:
    """`AutoModelForCausalLM.from_pretrained`, in eval mode; `dtype=None` means float32. `quantize` ("4bit",
    "8bit") quantizes the linear layers with bitsandbytes as they load, straight onto `device`."""
    import transformers
    from transformers import AutoModelForCausalLM

    name = _existing(name_or_path)
    if quantize is not None and is_gguf(name):
        raise InputError(
            f"--load-in-{quantize}: {name!r} is a .gguf file, which loads dequantized; quantize a model directory "
            "(roadkit export-base writes one)."
        )
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    source, extra = _gguf_kwargs(name)
    if quantize is not None:
        extra.update(_quantized_kwargs(quantize, dtype if isinstance(dtype, torch.dtype) else torch.float32, device))
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **{dtype_key: dtype or torch.float32}, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise LoadError(
            f"cannot load a causal language model from {name!r}: {_not_local(name)}{one_line(err)}"
        ) from err
    if is_gguf(name):
        model = _rebuilt(model)
        model.config._name_or_path = os.path.abspath(name)  # what adapters trained on it record as their base
    if device is not None and quantize is None:  # a quantized model is on its device already, and cannot move
        model.to(device)  # type: ignore[arg-type]  # transformers' decorated PreTrainedModel.to is mistyped
    return model.eval()


def load_tokenizer(name_or_path: Union[str, os.PathLike], required: bool = True) -> Optional[Any]:
    """`AutoTokenizer.from_pretrained`; without `required`, None when the model ships no tokenizer."""
    from transformers import AutoTokenizer

    name = _existing(name_or_path)
    source, extra = _gguf_kwargs(name)
    if not extra and is_local(name) and not any(os.path.isfile(os.path.join(name, f)) for f in TOKENIZER_FILES):
        if required:
            raise LoadError(f"{name!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}).")
        return None
    try:
        return AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        if required:
            raise LoadError(f"cannot load a tokenizer from {name!r}: {_not_local(name)}{one_line(err)}") from err
        return None


def pick_device(requested: Optional[str] = None) -> torch.device:
    """The requested device, else CUDA when available, else the CPU. InputError for a device name torch
    does not know, or a device this machine (or this build of torch) does not have."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError) as err:
        raise InputError(f"--device {requested!r} is not a device name (cpu, cuda, cuda:1, mps, ...).") from err
    if device.type == "cpu" or device.type == "meta":
        return device
    backend = getattr(torch, device.type, None) if device.type != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise InputError(
            f"--device {requested!r}: this machine (or this build of torch) has no {device.type} "
            "device; use --device cpu."
        )
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise InputError(f"--device {requested!r}: there are only {count()} {device.type} devices.")
    return device
