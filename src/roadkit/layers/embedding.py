"""RoAd on `nn.Embedding`: rotate the embedding vectors it returns."""

from __future__ import annotations

from torch import nn

from .base import RoadLayer


class Embedding(RoadLayer):
    """An `nn.Embedding` whose output vectors are rotated by the active RoAd adapters.

    Merging rotates every row of the table (the features are the table's columns). A table tied
    to an output head cannot be merged: the model wrapper refuses that before touching it.
    """

    base_type = "torch.nn.Embedding"
    weight_feature_dim = 1

    def __init__(self, base_layer: nn.Embedding, adapter_name: str = "default", variant: str = "road_1",
                 group_size: int = 64, init_weights: bool = True) -> None:
        super().__init__(base_layer, self.features_of(base_layer))
        self.in_features = base_layer.num_embeddings
        self.update_layer(adapter_name, variant, group_size, init_weights)
        self.set_adapter(adapter_name)

    @staticmethod
    def wraps(module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @staticmethod
    def features_of(module: nn.Module) -> int:
        return module.embedding_dim
