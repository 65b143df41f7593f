"""Image transforms: a mild, morphology-preserving training augmentation and a plain eval transform.

Cells have no canonical orientation, so flips and 90-degree rotations are free augmentations;
colour jitter is kept small because colour *is* a labelled attribute (granule and cytoplasm colour).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2 as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_RESOLUTION, MAX_RESOLUTION = 32, 384


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of the training augmentation; defaults are mild on purpose (see module docstring)."""

    crop_scale_min: float = 0.75
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.08
    hue: float = 0.02


class RandomRot90(torch.nn.Module):
    """Rotate a CHW tensor by a random multiple of 90 degrees (lossless, no interpolation)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        turns = int(torch.randint(0, 4, ()).item())
        return image if turns == 0 else torch.rot90(image, turns, dims=(-2, -1))


def check_resolution(image_size: int) -> int:
    if not MIN_RESOLUTION <= image_size <= MAX_RESOLUTION:
        raise ValueError(f"image size {image_size} outside the supported range {MIN_RESOLUTION}-{MAX_RESOLUTION} px")
    return image_size


Stats = tuple[float, float, float]


def _to_normalised_float(mean: Stats, std: Stats) -> list:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]


def eval_transform(image_size: int, mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD) -> T.Compose:
    """Resize the whole (square) cell crop to `image_size` and normalise with the tower's statistics.

    Accepts a PIL image or a uint8 CHW tensor (as held by the decoded-image cache).
    """
    check_resolution(image_size)
    return T.Compose(
        [
            T.ToImage(),
            T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            *_to_normalised_float(mean, std),
        ]
    )


def train_transform(
    image_size: int, config: AugmentConfig | None = None, mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD
) -> T.Compose:
    """Random resized crop, flips, 90-degree rotations and mild colour jitter (PIL or uint8 tensor in)."""
    check_resolution(image_size)
    config = config or AugmentConfig()
    steps: list = [
        T.ToImage(),
        T.RandomResizedCrop(
            image_size, scale=(config.crop_scale_min, 1.0), ratio=(0.9, 1.1), interpolation=T.InterpolationMode.BICUBIC, antialias=True
        )
    ]
    if config.hflip:
        steps.append(T.RandomHorizontalFlip())
    if config.vflip:
        steps.append(T.RandomVerticalFlip())
    if config.rot90:
        steps.append(RandomRot90())
    if any((config.brightness, config.contrast, config.saturation, config.hue)):
        steps.append(T.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue))
    steps += _to_normalised_float(mean, std)
    return T.Compose(steps)


def denormalize(batch: torch.Tensor, mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD) -> torch.Tensor:
    """Undo the normalisation (for plots and saliency overlays)."""
    mean = torch.tensor(mean, device=batch.device).view(-1, 1, 1)
    std = torch.tensor(std, device=batch.device).view(-1, 1, 1)
    return (batch * std + mean).clamp(0, 1)
