"""RoAd on `nn.Linear`: rotate the output features of y = W h + b."""

from __future__ import annotations

from torch import nn

from .base import RoadLayer


class Linear(RoadLayer):
    """An `nn.Linear` whose outputs are rotated by the active RoAd adapters."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str = "default", variant: str = "road_1",
                 group_size: int = 64, init_weights: bool = True) -> None:
        super().__init__(base_layer, base_layer.out_features)
        self.in_features = base_layer.in_features
        self.update_layer(adapter_name, variant, group_size, init_weights)
        self.set_adapter(adapter_name)
