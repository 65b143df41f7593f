"""Build `DualEncoder`s from named configs (open_clip's `create_model`, offline only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hemaclip.models.config import ModelConfig, get_model_config
from hemaclip.models.image import ImageTower, build_trunk
from hemaclip.models.model import DualEncoder, build_projection
from hemaclip.models.text import TextTower


def build_model(config: ModelConfig, load_image_weights: bool = True) -> DualEncoder:
    """Model for a config. `load_image_weights=False` skips `image_pretrained` (checkpoints supply weights)."""
    trunk, num_features = build_trunk(
        config.image_backend,
        config.image_tower,
        config.image_size,
        pretrained=config.image_pretrained if load_image_weights else None,
        tower_kwargs=config.image_tower_kwargs,
    )
    visual = ImageTower(trunk, build_projection(config.proj_type, num_features, config.embed_dim), num_features)
    text = TextTower(
        config.text_tower, trainable_layers=config.text_trainable_layers, max_length=config.text_max_length
    )
    return DualEncoder(config, visual, text)


def create_model(name_or_path: str | Path, **overrides: Any) -> DualEncoder:
    """Model from a bundled config name (see `list_models()`) or a JSON path, with field overrides.

    Example: `create_model("effnet-lite0-128", image_size=64, text_trainable_layers=2)`.
    """
    return build_model(get_model_config(name_or_path, **overrides))
