"""Reading a RoAd adapter directory for serving: per-module rotations, checked before any slot changes.

Everything the engine needs comes from the directory itself (variant, group size, targets), so a
server needs no RoAd-specific flags. Model-independent problems are found here; whether the
modules exist in the served model and fit its tensor-parallel shards is checked by the engine's
adapter manager against its layers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from ... import checkpoint as ckpt
from ... import functional as F
from ...config import CONFIG_NAME, PEFT_TYPE, RoadConfig
from ...messages import some_of

PARAMS = ("road_theta", "road_alpha")
LIST_LIMIT = 5  # names quoted in one error message; the rest are counted


class RoadAdapterError(ValueError):
    """An adapter directory that cannot be served; the message names the directory and the problem."""


def peft_type_of(directory: str) -> str | None:
    """The `peft_type` an adapter directory declares, or None when it has no readable config."""
    peft_type = (_read_config(directory) or {}).get("peft_type")
    return peft_type if isinstance(peft_type, str) else None


def _read_config(directory: str) -> dict | None:
    """The directory's parsed `adapter_config.json` when it is a regular file holding a JSON object, else None."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):  # a pipe there would block the reader
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def is_road_directory(directory: str) -> bool:
    """Whether `directory` holds a RoAd adapter (its config says peft_type ROAD)."""
    return peft_type_of(directory) == PEFT_TYPE


class RoadAdapterNotFoundError(RoadAdapterError):
    """An adapter path with no adapter in it, but with adapters in its subfolders (answered with a 404)."""


def _holds_road_parameters(directory: str) -> bool:
    """Whether the directory's safetensors file has RoAd keys (reads the header only)."""
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(directory, ckpt.WEIGHTS_NAME), framework="pt") as fh:
            return any(key.endswith(f".{PARAMS[0]}") for key in fh.keys())
    except Exception:  # missing or damaged: not evidence of a RoAd adapter
        return False


def check_directory(directory: str) -> None:
    """Refuse, before the engine sees it, an adapter path that is a RoAd adapter gone wrong.

    Raises `RoadAdapterError` for: a file where a directory is expected, an `adapter_config.json`
    that is not a JSON object, a config whose `peft_type` is not ROAD over RoAd parameters (so vLLM
    would read it as a broken LoRA), and a RoAd config without the fields RoAd needs;
    `RoadAdapterNotFoundError` for a directory with no config whose subfolders hold adapters. A path
    that does not exist, or any other adapter (LoRA), is left to vLLM. Reads the config and, for
    a non-RoAd config, the weights file's header: no tensors.
    """
    where = f"RoAd adapter {directory!r}"
    if os.path.isfile(directory):
        raise RoadAdapterError(
            f"adapter path {directory!r} is a file; give the adapter's directory (the folder that holds {CONFIG_NAME})."
        )
    if not os.path.isdir(directory):
        return
    config_path = os.path.join(directory, CONFIG_NAME)
    for name in (CONFIG_NAME, ckpt.WEIGHTS_NAME):  # a pipe or device there would block whoever reads it
        if os.path.lexists(os.path.join(directory, name)) and not os.path.isfile(os.path.join(directory, name)):
            raise RoadAdapterError(f"adapter {directory!r}: {name} is not a regular file.")
    if not os.path.isfile(config_path):
        inner = sorted(n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n, CONFIG_NAME)))
        if inner:
            raise RoadAdapterNotFoundError(
                f"adapter path {directory!r} has no {CONFIG_NAME}, but its subfolders "
                f"{some_of(inner, shown=LIST_LIMIT)} hold adapters: give one of them, "
                f"e.g. {os.path.join(directory, inner[0])!r}."
            )
        return
    try:
        with open(config_path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError, RecursionError) as err:
        raise RoadAdapterError(f"adapter {directory!r}: {CONFIG_NAME} is not valid JSON ({err}).") from err
    if not isinstance(data, dict):
        raise RoadAdapterError(
            f"adapter {directory!r}: {CONFIG_NAME} holds a {type(data).__name__}, not a JSON object."
        )
    if data.get("peft_type") == PEFT_TYPE:
        try:
            RoadConfig.from_dict(data)
        except (ValueError, TypeError) as err:
            raise RoadAdapterError(f"{where}: {CONFIG_NAME} is not a valid RoAd config: {err}") from err
    elif _holds_road_parameters(directory):
        raise RoadAdapterError(
            f"{where}: {CONFIG_NAME} says peft_type={data.get('peft_type')!r}, but the weights are RoAd "
            f'parameters (road_theta, road_alpha); set "peft_type": "{PEFT_TYPE}" in {CONFIG_NAME}.'
        )


@dataclass(frozen=True)
class ModuleRotation:
    """One module's rotation over its full output: per-feature (c, s) float32 and the group size."""

    c: torch.Tensor
    s: torch.Tensor
    group_size: int

    @property
    def features(self) -> int:
        return self.c.shape[0]


@dataclass(frozen=True)
class RoadAdapter:
    """A RoAd adapter as the engine serves it: module path (as in the checkpoint) -> rotation."""

    directory: str
    config: RoadConfig
    rotations: dict[str, ModuleRotation]
    base_fingerprint: ckpt.BaseFingerprint  # first weights of the base it was trained on ({}: not recorded)


def read_road_adapter(directory: str) -> RoadAdapter:
    """Read and check a RoAd adapter directory (PEFT's layout, saved by roadkit or PEFT).

    Raises `RoadAdapterError` naming the directory for: a missing or broken config or weights
    file, `modules_to_save` (whole trained modules, which the engine's layers cannot swap per
    request), keys that are not RoAd parameters, and parameters whose size does not fit the
    variant and group size, non-finite values and degenerate rotations (`functional.value_problem`).
    """
    where = f"RoAd adapter {directory!r}"
    try:
        config, tensors = ckpt.read_adapter(directory)
    except (OSError, ValueError, TypeError) as err:
        raise RoadAdapterError(f"{where}: {err}") from err
    if config.modules_to_save:
        raise RoadAdapterError(
            f"{where} has modules_to_save={config.modules_to_save}: serving swaps only "
            "the rotations per request, not whole trained modules; serve a merged model "
            "instead, or train without modules_to_save."
        )
    params: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in tensors.items():
        path, _, param = key.removeprefix(ckpt.KEY_PREFIX).rpartition(".")
        if not key.startswith(ckpt.KEY_PREFIX) or param not in PARAMS or tensor.dim() != 1:
            foreign.append(key)
        else:
            params.setdefault(path, {})[param] = tensor
    integers = sorted(k for k, t in tensors.items() if not t.is_floating_point())
    if integers:
        raise RoadAdapterError(
            f"{where}: RoAd parameters are floating-point numbers, but {some_of(integers, shown=LIST_LIMIT)} hold "
            f"{tensors[integers[0]].dtype} values."
        )
    if foreign:
        raise RoadAdapterError(
            f"{where}: {len(foreign)} tensors are not RoAd parameters "
            f"(base_model.model.<module>.road_theta/road_alpha): {some_of(sorted(foreign), shown=LIST_LIMIT)}."
        )
    if not params:
        raise RoadAdapterError(f"{where} holds no RoAd parameters.")
    rotations = {}
    for path, pair in sorted(params.items()):
        if set(pair) != set(PARAMS) or pair["road_theta"].shape != pair["road_alpha"].shape:
            raise RoadAdapterError(
                f"{where}: module {path!r} needs road_theta and road_alpha of one shape, "
                f"got {sorted((k, tuple(v.shape)) for k, v in pair.items())}."
            )
        n_out = F.out_features_for(config.variant, pair["road_theta"].shape[0])
        if n_out % config.group_size or F.parameter_length(config.variant, n_out) != pair["road_theta"].shape[0]:
            raise RoadAdapterError(
                f"{where}: module {path!r} has {pair['road_theta'].shape[0]} parameters, "
                f"which no output size fits with variant={config.variant} and "
                f"group_size={config.group_size}."
            )
        theta, alpha = pair["road_theta"].float(), pair["road_alpha"].float()
        problem = F.value_problem(config.variant, config.group_size, theta, alpha)
        if problem:
            raise RoadAdapterError(
                f"{where}: module {path!r} cannot be served: {problem}. The training that wrote it "
                "probably diverged; retrain it or serve an earlier checkpoint."
            )
        c, s = F.coefficients(config.variant, config.group_size, theta, alpha)
        rotations[path] = ModuleRotation(c.contiguous(), s.contiguous(), config.group_size)
    return RoadAdapter(directory, config, rotations, ckpt.read_base_fingerprint(directory))


def recorded_base(directory: str) -> str | None:
    """The base model an adapter directory records (`base_model_name_or_path`), or None."""
    base = (_read_config(directory) or {}).get("base_model_name_or_path")
    return base if isinstance(base, str) and base else None


def same_model(recorded: str, served: str) -> bool:
    """Whether a recorded base and a served model name the same model: equal, the same directory, or
    the same final path component (a Hub id and its local download, a model copied elsewhere)."""
    if recorded == served:
        return True
    if os.path.exists(recorded) and os.path.exists(served):
        return os.path.realpath(recorded) == os.path.realpath(served)

    def last(name: str) -> str:
        return os.path.basename(os.path.normpath(name)).lower()

    return last(recorded) == last(served)


def adapts_output_head(directory: str) -> bool:
    """Whether a (LoRA) adapter directory trains the output head `lm_head`: by its config's
    `target_modules`, or by the keys of its safetensors file (read from the header only)."""
    targets = (_read_config(directory) or {}).get("target_modules")
    if isinstance(targets, str) and "lm_head" in targets or isinstance(targets, list) and "lm_head" in targets:
        return True
    from safetensors import safe_open

    try:
        with safe_open(os.path.join(directory, ckpt.WEIGHTS_NAME), framework="pt") as fh:
            return any(".lm_head." in key for key in fh.keys())
    except Exception:  # no safetensors file: the config decides
        return False
