"""roadkit: RoAd (2D rotary adaptation) adapters for PyTorch and Hugging Face models."""

from .config import RoadConfig
from .layers import Conv, Embedding, Linear, ModulesToSaveWrapper, RoadLayer, TransformersConv1D
from .model import RoadModel, TensorParallelIssue, check_tensor_parallel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "Conv",
    "Embedding",
    "Linear",
    "ModulesToSaveWrapper",
    "RoadConfig",
    "RoadLayer",
    "RoadModel",
    "TensorParallelIssue",
    "TransformersConv1D",
    "check_tensor_parallel",
    "get_peft_model",
]
