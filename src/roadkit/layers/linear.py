"""RoAd on linear layers: `nn.Linear` and transformers' `Conv1D` (GPT-2's linear with a transposed weight)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, cast

from torch import nn

from .base import RoadLayer

if TYPE_CHECKING:
    from transformers.pytorch_utils import Conv1D


class Linear(RoadLayer):
    """An `nn.Linear` whose outputs are rotated by the active RoAd adapters."""

    base_type = "torch.nn.Linear"
    linear_like = True  # selected by target_modules="all-linear"

    @staticmethod
    def wraps(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @staticmethod
    def features_of(module: nn.Module) -> int:
        return cast(nn.Linear, module).out_features

    @staticmethod
    def in_features_of(module: nn.Module) -> int:
        return cast(nn.Linear, module).in_features


class TransformersConv1D(Linear):
    """transformers' `Conv1D` (GPT-2, GPT-BigCode): y = x W + b with W of shape (in, out)."""

    base_type = "transformers.pytorch_utils.Conv1D"
    weight_feature_dim = 1

    @staticmethod
    def wraps(module: nn.Module) -> bool:
        # A Conv1D instance exists only once transformers defined it: no import needed to check.
        utils = sys.modules.get("transformers.pytorch_utils")
        return utils is not None and isinstance(module, utils.Conv1D)

    @staticmethod
    def features_of(module: nn.Module) -> int:
        return cast("Conv1D", module).nf

    @staticmethod
    def in_features_of(module: nn.Module) -> int:
        return cast("Conv1D", module).weight.shape[0]
