"""Fused RoAd kernels; `rotate` picks the implementation for the tensor's device."""

from .torch_ops import rotate, rotate_values

__all__ = ["rotate", "rotate_values"]
