"""Training configuration: one dataclass, read from a small JSON/YAML file, saved resolved in the run folder."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hemaclip.errors import HemaclipError
from hemaclip.data.transforms import AugmentConfig
from hemaclip.io import Rule, apply_overrides, at_least, between, check_values, config_from_dict, greater_than, one_of, packaged_configs, read_config

LOSS_NAMES = ("clip", "soft", "multipos")  # hemaclip.models.losses.LOSSES (a test keeps the two equal)
AMP_MODES = ("auto", "off", "bf16")


@dataclass
class TextMix:
    """How the sentence paired with an image is drawn each epoch (probabilities, renormalised).

    Images without attributes always get a class sentence.
    """

    caption: float = 0.55  # a full 11-attribute caption (one of `captions_per_image` phrasings)
    attribute: float = 0.2  # a single-attribute statement ("a cell whose nucleus is bilobed")
    klass: float = 0.25  # a class sentence or class prompt

    RULES: ClassVar[dict[str, Rule]] = {"caption": at_least(0), "attribute": at_least(0), "klass": at_least(0)}

    def __post_init__(self) -> None:
        check_values(self, "training config text_mix", self.RULES)
        if self.caption + self.attribute + self.klass <= 0:
            from hemaclip.errors import HemaclipError

            raise HemaclipError("training config text_mix: at least one of caption, attribute, klass must be > 0")


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

    # What each value may be beyond its type (checked with the types in __post_init__, before a run writes
    # anything). A batch needs two images: the contrastive loss contrasts them and BatchNorm needs two.
    RULES: ClassVar[dict[str, Rule]] = {
        "model": ("a packaged model config (see `hemaclip models`) or an existing JSON/YAML file", lambda v: _model_exists(v)),
        "init_checkpoint": ("'default' or an existing checkpoint file", lambda v: v == "default" or Path(v).is_file()),
        "dataset": ("a dataset name", lambda v: _dataset_known(v)),
        "val_dataset": ("a dataset name", lambda v: _dataset_known(v)),
        "prompts": ("an existing prompt file", lambda v: Path(v).is_file()),
        "epochs": at_least(1),
        "batch_size": at_least(2),
        "lr": greater_than(0),
        "backbone_lr": at_least(0),
        "weight_decay": at_least(0),
        "warmup_steps": at_least(0),
        "grad_clip": at_least(0),  # 0 = no clipping
        "loss": one_of(LOSS_NAMES),
        "soft_target_temperature": greater_than(0),
        "contrastive_weight": at_least(0),
        "attribute_head_weight": at_least(0),
        "class_head_weight": at_least(0),
        "captions_per_image": at_least(1),
        "freeze_image_fraction": between(0, 1),
        "stain_jitter": between(0, 1),
        "extra_datasets": ("a list of dataset names", lambda v: all(isinstance(x, str) and _dataset_known(x) for x in v)),
        "preprocess": ("preprocess options: locate (whole or cell), resize (bicubic), frame (1.5 to 4)", lambda v: _preprocess_ok(v)),
        "amp": one_of(AMP_MODES),
        "seed": at_least(0),
        "max_train_images": at_least(1),
        "max_val_images": at_least(1),
        "save_every_steps": at_least(0),  # 0 = only at epoch ends
        "device": ("'auto', 'cpu', 'cuda' or 'cuda:N'", lambda v: _device_ok(v)),
    }

    def __post_init__(self) -> None:
        check_values(self, "training config", self.RULES)
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


def _model_exists(name_or_path: str) -> bool:
    return name_or_path in packaged_configs("models") or Path(name_or_path).is_file()  # what get_model_config reads


def _dataset_known(name: str) -> bool:
    from hemaclip.data.datasets import DATASETS

    return name in DATASETS


def _preprocess_ok(spec: dict[str, Any]) -> bool:
    from hemaclip.data.preprocess import check_preprocess
    from hemaclip.errors import HemaclipError

    try:
        check_preprocess(spec)
    except HemaclipError:
        return False
    return True


def _device_ok(name: str) -> bool:
    import torch

    if name == "auto":
        return True
    try:
        return torch.device(name).type in ("cpu", "cuda", "mps")
    except RuntimeError:
        return False


def load_train_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training config by packaged name (e.g. 'default') or path; apply `overrides` on top."""
    path, payload = read_config(name_or_path, "train", "training config")
    return TrainConfig.from_dict(apply_overrides(payload, overrides), source=str(path))


def saved_train_config(path: str | Path) -> dict[str, Any]:
    """The training options a run folder's config.json holds (what `train --resume` continues with); a
    damaged or foreign file is a one-line error naming it, never a JSONDecodeError traceback."""
    path, payload = read_config(path, "train", "run config")
    saved = payload.get("train")
    if not isinstance(saved, dict):
        raise HemaclipError(f"{path}: not a hemaclip run config (no 'train' block of options); "
                            "restore it or start a new run in another --out")
    return saved
