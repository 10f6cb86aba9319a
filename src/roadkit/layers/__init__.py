"""One wrapper class per wrapped layer type, all sharing `RoadLayer`, and `ModulesToSaveWrapper` (whole
trained copies of a module, which is not a `RoadLayer`). `BASE`, `AdapterParameters` and `Routing` are
re-exported from the modules that define them (`routing`, `cache`)."""

from __future__ import annotations

from typing import Iterator, Optional

from torch import nn

from ..cache import AdapterParameters
from ..routing import BASE, Routing
from .base import RoadLayer
from .bnb import Linear4bit, Linear8bitLt
from .conv import Conv
from .embedding import Embedding
from .linear import Linear, TransformersConv1D
from .saved import ModulesToSaveWrapper

# Wrapper classes, each saying which base layers it `wraps`; the first match wins (bitsandbytes' layers
# subclass nn.Linear, so their wrappers come before `Linear`).
LAYER_TYPES: tuple[type[RoadLayer], ...] = (Linear8bitLt, Linear4bit, Linear, TransformersConv1D, Conv, Embedding)


def wrapper_for(module: nn.Module) -> Optional[type[RoadLayer]]:
    """The RoAd wrapper class for `module`, or None when RoAd cannot wrap it."""
    return next((wrapper for wrapper in LAYER_TYPES if wrapper.wraps(module)), None)


def out_features_of(module: nn.Module) -> int:
    """Number of output features a RoAd wrapper would rotate (TypeError if no RoAd wrapper fits `module`)."""
    wrapper = wrapper_for(module)
    if wrapper is None:
        raise TypeError(
            f"RoAd cannot wrap a {type(module).__module__}.{type(module).__qualname__}; "
            f"supported layer types: {', '.join(t.base_type for t in LAYER_TYPES)}."
        )
    return wrapper.features_of(module)


def base_of(module: nn.Module) -> nn.Module:
    """The module a RoAd layer wraps (any other module is its own base)."""
    return module.get_base_layer() if isinstance(module, RoadLayer) else module


def road_layers(model: nn.Module) -> Iterator[tuple[str, RoadLayer]]:
    """(path, layer) for every RoAd layer of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, RoadLayer):
            yield name, module


def saved_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    """(path, wrapper) for every modules-to-save wrapper of `model`."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


__all__ = [
    "BASE",
    "LAYER_TYPES",
    "AdapterParameters",
    "Conv",
    "Embedding",
    "Linear",
    "Linear4bit",
    "Linear8bitLt",
    "ModulesToSaveWrapper",
    "RoadLayer",
    "Routing",
    "TransformersConv1D",
    "base_of",
    "out_features_of",
    "road_layers",
    "saved_wrappers",
    "wrapper_for",
]
