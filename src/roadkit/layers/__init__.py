"""One wrapper class per wrapped layer type, all sharing `RoadLayer`."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .base import BASE, RoadLayer, Routing
from .linear import Linear
from .saved import ModulesToSaveWrapper

# Base layer type -> RoAd wrapper class. The first isinstance match wins.
LAYER_TYPES: tuple[tuple[type, type[RoadLayer]], ...] = ((nn.Linear, Linear),)


def wrapper_for(module: nn.Module) -> Optional[type[RoadLayer]]:
    """The RoAd wrapper class for `module`, or None when RoAd cannot wrap it."""
    for base_type, wrapper in LAYER_TYPES:
        if isinstance(module, base_type):
            return wrapper
    return None


def out_features_of(module: nn.Module) -> int:
    """Number of output features a RoAd wrapper would rotate."""
    return module.out_features


__all__ = ["BASE", "LAYER_TYPES", "Linear", "ModulesToSaveWrapper", "RoadLayer", "Routing", "out_features_of",
           "wrapper_for"]
