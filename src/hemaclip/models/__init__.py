"""hemaclip.models: CLIP-style dual encoders, losses, checkpoints and ONNX export (offline weights only)."""

from hemaclip.models.config import ModelConfig, get_model_config, list_models
from hemaclip.models.factory import build_model, create_model
from hemaclip.models.image import ImageTower
from hemaclip.models.model import DualEncoder
from hemaclip.models.text import TextTower

__all__ = [
    "DualEncoder",
    "ImageTower",
    "ModelConfig",
    "TextTower",
    "build_model",
    "create_model",
    "get_model_config",
    "list_models",
]
