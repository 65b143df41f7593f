"""Training configuration: one dataclass, read from a small JSON/YAML file, saved resolved in the run folder."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hemaclip.errors import HemaclipError
from hemaclip.io import apply_overrides, config_from_dict, read_config
from hemaclip.data.transforms import AugmentConfig


@dataclass
class TextMix:
    """How the sentence paired with an image is drawn each epoch (probabilities, renormalised).

    Images without attributes always get a class sentence.
    """

    caption: float = 0.55  # a full 11-attribute caption (one of `captions_per_image` phrasings)
    attribute: float = 0.2  # a single-attribute statement ("a cell whose nucleus is bilobed")
    klass: float = 0.25  # a class sentence or class prompt


@dataclass
class TrainConfig:
    """Everything a training run depends on. Unknown keys in a config file are an error."""

    model: str = "effnet-lite0-128"  # model config name (see `hemaclip models`) or a JSON path
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # Start from a checkpoint's weights instead of `model` ("default" = the shipped model, or a .pt path);
    # its class head is replaced by a fresh one when the training classes differ (fine-tuning to a new set).
    init_checkpoint: str | None = None
    dataset: str = "pbc"  # training images: 'pbc' = WBCAtt train (with attributes) + other PBC classes
    val_dataset: str = "wbcatt"  # validation images (its val split); attributes give attribute metrics
    prompts: str | None = None  # prompt file (None = the packaged one)
    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3  # for new parameters (projections, heads)
    backbone_lr: float = 3e-4  # for the image tower
    weight_decay: float = 0.05
    warmup_steps: int = 100
    grad_clip: float = 1.0
    loss: str = "multipos"  # 'clip' (InfoNCE), 'soft' (WBC-CLIP soft targets) or 'multipos'
    soft_target_temperature: float = 10.0  # tau_t of the soft-target loss
    contrastive_weight: float = 1.0
    attribute_head_weight: float = 1.0  # auxiliary supervised heads (0 disables their loss)
    class_head_weight: float = 0.5
    captions_per_image: int = 8
    text_mix: TextMix = field(default_factory=TextMix)
    freeze_image_fraction: float = 0.0  # leading share of image-trunk parameters kept frozen (faster on CPU)
    augment: bool = True
    # HED-space stain jitter of training images (0 = off; 0.2 = stain concentrations scaled by up to
    # +-20 %), drawn per image from the same seed as the other augmentations; needs `augment`.
    stain_jitter: float = 0.0
    # The rest of the augmentation (:class:`hemaclip.data.transforms.AugmentConfig` fields: colour jitter,
    # grey_p, gamma, blur_p, lowres_p, jpeg_p, zoom_out, ...); empty = the mild defaults.
    augmentation: AugmentConfig = field(default_factory=AugmentConfig)
    # Further training sets, each a dataset name whose *train* split joins the images (e.g. "lisc", a second
    # lab); their cells carry class sentences only. Validation stays on `val_dataset`.
    extra_datasets: list[str] = field(default_factory=list)
    # The model's preprocessing (`ModelConfig.preprocess`, e.g. {"locate": "cell"}); None keeps the model's
    # own (a fresh model's config, or the init checkpoint's).
    preprocess: dict[str, Any] | None = None
    amp: str = "auto"  # 'auto' = bfloat16 autocast on CUDA, off on CPU; 'off'; 'bf16'
    seed: int = 0
    # Whole classes kept out of training (generalised zero-shot): their images leave the train and val sets,
    # their class sentences and prompts leave the text bank, as does every sentence naming them (class name or
    # a training synonym); the class head has no output for them. Each must be a class of `dataset`.
    holdout_classes: list[str] = field(default_factory=list)
    max_train_images: int | None = None  # a stratified subset, for tests and quick looks
    max_val_images: int | None = None
    save_every_steps: int = 200  # mid-epoch resumable checkpoint
    select_metric: str | None = None  # validation metric that picks best.pt (None = mean of the headline F1s)
    device: str = "auto"

    def __post_init__(self) -> None:
        names = self.holdout_classes
        if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
            raise ValueError(f"holdout_classes must be a list of class names, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"holdout_classes names a class twice: {names}")

    def seen_classes(self, classes: Sequence[str]) -> list[str]:
        """`classes` less the held-out ones; a held-out name that is not among `classes`, or holding out all
        but one, is a one-line error (a typo would otherwise hold out nothing)."""
        unknown = [n for n in self.holdout_classes if n not in classes]
        if unknown:
            raise HemaclipError(f"holdout_classes: {', '.join(unknown)} not a class of dataset '{self.dataset}' ({', '.join(classes)})")
        seen = [c for c in classes if c not in self.holdout_classes]
        if len(seen) < 2:
            raise HemaclipError(f"holdout_classes: at least two classes of '{self.dataset}' must stay seen, {len(seen)} left")
        return seen

    @classmethod
    def from_dict(cls, payload: dict[str, Any], source: str = "config") -> TrainConfig:
        return config_from_dict(cls, payload, "training config", source, nested={"text_mix": TextMix, "augmentation": AugmentConfig})

    def augment_config(self) -> AugmentConfig:
        """The training augmentation; the top-level `stain_jitter` (a shorthand kept for existing runs and
        `--set stain_jitter=0.2`) wins over `augmentation.stain_jitter` when it is set."""
        if self.stain_jitter:
            return dataclasses.replace(self.augmentation, stain_jitter=float(self.stain_jitter))
        return self.augmentation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_train_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training config by packaged name (e.g. 'default') or path; apply `overrides` on top."""
    path, payload = read_config(name_or_path, "train", "training config")
    return TrainConfig.from_dict(apply_overrides(payload, overrides), source=str(path))
