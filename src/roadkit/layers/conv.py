"""RoAd on convolutions: rotate the output channels of `nn.Conv1d` / `nn.Conv2d` / `nn.Conv3d`."""

from __future__ import annotations

from typing import Any, Union, cast

from torch import nn

from .base import RoadLayer, delegated

_ConvNd = Union[nn.Conv1d, nn.Conv2d, nn.Conv3d]


class Conv(RoadLayer):
    """A convolution whose output channels are rotated by the active RoAd adapters.

    Channels sit at axis -(spatial dims + 1) of the output, so batched and unbatched inputs both
    work; merging rotates the output-channel rows of the kernel and the bias.
    """

    base_type = "torch.nn.Conv1d / Conv2d / Conv3d"
    linear_like = False
    in_channels = delegated("in_channels")
    out_channels = delegated("out_channels")
    kernel_size = delegated("kernel_size")
    stride = delegated("stride")
    padding = delegated("padding")
    dilation = delegated("dilation")
    groups = delegated("groups")

    def __init__(self, base_layer: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, *args, **kwargs)
        self.feature_dim = -(cast(_ConvNd, base_layer).weight.dim() - 1)  # channels precede the 1, 2 or 3 spatial axes

    @staticmethod
    def wraps(module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    @staticmethod
    def features_of(module: nn.Module) -> int:
        return cast(_ConvNd, module).out_channels

    @staticmethod
    def in_features_of(module: nn.Module) -> int:
        return cast(_ConvNd, module).in_channels
