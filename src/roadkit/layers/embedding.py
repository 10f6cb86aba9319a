"""RoAd on `nn.Embedding`: rotate the embedding vectors it returns."""

from __future__ import annotations

from typing import cast

from torch import nn

from .base import RoadLayer, delegated


class Embedding(RoadLayer):
    """An `nn.Embedding` whose output vectors are rotated by the active RoAd adapters.

    Merging rotates every row of the table (the features are the table's columns). A table tied
    to an output head cannot be merged: the model wrapper refuses that before touching it.
    """

    base_type = "torch.nn.Embedding"
    weight_feature_dim = 1
    num_embeddings = delegated("num_embeddings")
    embedding_dim = delegated("embedding_dim")
    padding_idx = delegated("padding_idx")

    @staticmethod
    def wraps(module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @staticmethod
    def features_of(module: nn.Module) -> int:
        return cast(nn.Embedding, module).embedding_dim

    @staticmethod
    def in_features_of(module: nn.Module) -> int:
        return cast(nn.Embedding, module).num_embeddings
