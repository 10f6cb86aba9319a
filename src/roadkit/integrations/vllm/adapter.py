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

PARAMS = ("road_theta", "road_alpha")
LIST_LIMIT = 5  # names quoted in one error message; the rest are counted


class RoadAdapterError(ValueError):
    """An adapter directory that cannot be served; the message names the directory and the problem."""


def quote_some(names: list[str]) -> str:
    """The first few names, and how many more there are (errors stay one readable line)."""
    shown = ", ".join(names[:LIST_LIMIT])
    return shown + (f" and {len(names) - LIST_LIMIT} more" if len(names) > LIST_LIMIT else "")


def peft_type_of(directory: str) -> str | None:
    """The `peft_type` an adapter directory declares, or None when it has no readable config."""
    try:
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data.get("peft_type") if isinstance(data, dict) else None


def is_road_directory(directory: str) -> bool:
    """Whether `directory` holds a RoAd adapter (its config says peft_type ROAD)."""
    return peft_type_of(directory) == PEFT_TYPE


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


def read_road_adapter(directory: str) -> RoadAdapter:
    """Read and check a RoAd adapter directory (PEFT's layout, saved by roadkit or PEFT).

    Raises `RoadAdapterError` naming the directory for: a missing or broken config or weights
    file, `modules_to_save` (whole trained modules, which the engine's layers cannot swap per
    request), keys that are not RoAd parameters, and parameters whose size does not fit the
    variant and group size.
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
    if foreign:
        raise RoadAdapterError(
            f"{where}: {len(foreign)} tensors are not RoAd parameters "
            f"(base_model.model.<module>.road_theta/road_alpha): {quote_some(sorted(foreign))}."
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
        c, s = F.coefficients(config.variant, config.group_size, theta, alpha)
        rotations[path] = ModuleRotation(c.contiguous(), s.contiguous(), config.group_size)
    return RoadAdapter(directory, config, rotations)
