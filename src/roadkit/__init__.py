"""roadkit: RoAd (2D rotary adaptation) adapters for PyTorch and Hugging Face models."""

from .composition import SavedAdapter, compose, compose_adapters
from .config import RoadConfig
from .errors import RoadkitError
from .extras import MissingExtraError, require
from .layers import (
    Conv,
    Embedding,
    Linear,
    Linear4bit,
    Linear8bitLt,
    ModulesToSaveWrapper,
    RoadLayer,
    Routing,
    TransformersConv1D,
)
from .model import RoadModel, TensorParallelIssue, check_tensor_parallel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "Conv",
    "Embedding",
    "Linear",
    "Linear4bit",
    "Linear8bitLt",
    "MissingExtraError",
    "ModulesToSaveWrapper",
    "RoadConfig",
    "RoadLayer",
    "RoadModel",
    "RoadkitError",
    "Routing",
    "SavedAdapter",
    "TensorParallelIssue",
    "TransformersConv1D",
    "check_tensor_parallel",
    "compose",
    "compose_adapters",
    "get_peft_model",
]


def __getattr__(name: str) -> object:
    """`RoadTrainer` and `road_trainer` are imported on first use: `transformers.Trainer` takes seconds to import and
    comes with the `hf` extra (so they stay out of `__all__`: `from roadkit import *` works without it)."""
    if name in ("RoadTrainer", "road_trainer"):
        require("hf", f"roadkit.{name}")
        from .integrations.trainer import RoadTrainer, road_trainer

        return RoadTrainer if name == "RoadTrainer" else road_trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
