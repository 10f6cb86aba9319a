"""Base models and tokenizers from a local directory or a Hugging Face Hub id, with short errors."""

from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class LoadError(OSError):
    """A model or tokenizer could not be loaded; the message says which and why, on one line."""


def one_line(err: BaseException) -> str:
    """An exception's message on a single line (library messages often span several)."""
    return " ".join(str(err).split()) or type(err).__name__


def quiet_transformers() -> None:
    """Silence transformers' and huggingface_hub's progress bars and log lines (download retries
    included): a command reports its own progress, and its errors on one line."""
    from huggingface_hub.utils import logging as hub_logging
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    hub_logging.set_verbosity_error()


def is_local(name_or_path: Union[str, os.PathLike]) -> bool:
    """Whether `name_or_path` names a local path (it exists, or is written like one) rather than a Hub id."""
    name = os.fspath(name_or_path)
    return os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def _existing(name_or_path: Union[str, os.PathLike]) -> str:
    name = os.fspath(name_or_path)
    if is_local(name) and not os.path.isdir(name):
        raise LoadError(f"model directory {name!r} does not exist.")
    return name


def _not_local(name: str) -> str:
    """For an error message: a name that is no local path was tried as a Hub id; say so first."""
    if os.path.exists(name):
        return ""
    return f"no local directory {name!r} exists, so it was tried as a Hugging Face Hub id: "


def same_model(a: Union[str, os.PathLike], b: Union[str, os.PathLike]) -> bool:
    """Whether two model references name the same model: local directories by their resolved absolute
    paths, Hub ids by their text."""
    a, b = os.fspath(a), os.fspath(b)
    if os.path.isdir(a) or os.path.isdir(b):
        return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))
    return a.rstrip("/") == b.rstrip("/")


def load_causal_lm(name_or_path: Union[str, os.PathLike], dtype: Union[torch.dtype, str, None] = None,
                   device: Union[str, torch.device, None] = None) -> Any:
    """`AutoModelForCausalLM.from_pretrained`, in eval mode; `dtype=None` means float32."""
    import transformers
    from transformers import AutoModelForCausalLM

    name = _existing(name_or_path)
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **{dtype_key: dtype or torch.float32})
    except (OSError, ValueError, KeyError) as err:
        raise LoadError(f"cannot load a causal language model from {name!r}: {_not_local(name)}{one_line(err)}"
                        ) from err
    if device is not None:
        model.to(device)
    return model.eval()


def load_tokenizer(name_or_path: Union[str, os.PathLike], required: bool = True) -> Optional[Any]:
    """`AutoTokenizer.from_pretrained`; without `required`, None when the model ships no tokenizer."""
    from transformers import AutoTokenizer

    name = _existing(name_or_path)
    if is_local(name) and not any(os.path.isfile(os.path.join(name, f)) for f in TOKENIZER_FILES):
        if required:
            raise LoadError(f"{name!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}).")
        return None
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as err:
        if required:
            raise LoadError(f"cannot load a tokenizer from {name!r}: {_not_local(name)}{one_line(err)}") from err
        return None


def pick_device(requested: Optional[str] = None) -> torch.device:
    """The requested device, else CUDA when available, else the CPU. ValueError for a device name torch
    does not know, or a device this machine (or this build of torch) does not have."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(f"--device {requested!r} is not a device name (cpu, cuda, cuda:1, mps, ...).") from err
    if device.type == "cpu" or device.type == "meta":
        return device
    backend = getattr(torch, device.type, None) if device.type != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"--device {requested!r}: this machine (or this build of torch) has no {device.type} "
                         "device; use --device cpu.")
    count = getattr(backend, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise ValueError(f"--device {requested!r}: there are only {count()} {device.type} devices.")
    return device
