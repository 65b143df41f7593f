"""Image transforms: a mild, morphology-preserving training augmentation and a plain eval transform.

Cells have no canonical orientation, so flips and 90-degree rotations are free augmentations;
colour jitter is kept small because colour *is* a labelled attribute (granule and cytoplasm colour).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2 as T

from hemaclip.data.stain import hed_jitter
from hemaclip.errors import HemaclipError

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
    stain_jitter: float = 0.0  # HED stain jitter strength (see hemaclip.data.stain.hed_jitter); 0 = off

    def __post_init__(self) -> None:
        if self.stain_jitter < 0:
            raise HemaclipError(f"stain_jitter must be >= 0, got {self.stain_jitter}")


class RandomRot90(torch.nn.Module):
    """Rotate a CHW tensor by a random multiple of 90 degrees (lossless, no interpolation)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        turns = int(torch.randint(0, 4, ()).item())
        return image if turns == 0 else torch.rot90(image, turns, dims=(-2, -1))


class RandomHEDJitter(torch.nn.Module):
    """Random haematoxylin/eosin/DAB concentration jitter of a uint8 CHW image (Tellez et al., 2018).

    Draws from torch's generator, so a per-image `torch.manual_seed` makes it reproducible like the
    other augmentations here.
    """

    def __init__(self, strength: float) -> None:
        super().__init__()
        if strength < 0:
            raise ValueError(f"stain jitter strength must be >= 0, got {strength}")
        self.strength = float(strength)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.strength == 0:
            return image
        alphas = 1.0 + (torch.rand(3, dtype=torch.float64) * 2 - 1) * self.strength
        betas = (torch.rand(3, dtype=torch.float64) * 2 - 1) * self.strength / 20.0
        hwc = image.as_subclass(torch.Tensor).permute(1, 2, 0).numpy()
        out = hed_jitter(hwc, None, self.strength, alphas=alphas.numpy(), betas=betas.numpy())
        return tv_tensors.Image(torch.from_numpy(out).permute(2, 0, 1).contiguous())


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
    image_size: int, config: AugmentConfig | None = None, mean: Stats = IMAGENET_MEAN, std: Stats = IMAGENET_STD, grey: bool = False
) -> T.Compose:
    """Optional HED stain jitter, random resized crop, flips, 90-degree rotations and mild colour jitter.

    Takes a PIL image or a uint8 CHW tensor. `grey` (a model that sees luma only) ends with a grey
    conversion, so no augmentation (HED jitter, hue) can bring colour back.
    """
    check_resolution(image_size)
    config = config or AugmentConfig()
    steps: list = [
        T.ToImage(),
        *([RandomHEDJitter(config.stain_jitter)] if config.stain_jitter > 0 else []),
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
    if grey:
        steps.append(T.Grayscale(num_output_channels=3))
    steps += _to_normalised_float(mean, std)
    return T.Compose(steps)
