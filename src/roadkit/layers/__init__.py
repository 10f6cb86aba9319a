"""One wrapper class per wrapped layer type, all sharing `RoadLayer`."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .base import BASE, AdapterParameters, RoadLayer, Routing
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
    "out_features_of",
    "wrapper_for",
]
