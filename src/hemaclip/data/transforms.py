"""Image transforms: a morphology-preserving training augmentation and a plain eval transform.

Cells have no canonical orientation, so flips and 90-degree rotations are free augmentations. The
defaults keep colour jitter small because colour *is* a labelled attribute (granule and cytoplasm
colour); the other-lab levers (stain and colour shifts, grey, gamma, blur, JPEG, lower resolution,
zoom) are off by default and switched on by a training config's `augmentation` block, each measured
in the other-labs study (docs/research-log.md, "Other labs").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2 as T

from hemaclip.constants import IMAGENET_MEAN, IMAGENET_STD
from hemaclip.data.stain import hed_jitter
from hemaclip.io import Rule, at_least, between, check_values

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
    grey_p: float = 0.0  # probability of turning the image grey (3 equal channels)
    gamma: float = 0.0  # gamma drawn log-uniformly in [exp(-gamma), exp(gamma)]; 0 = off
    blur_p: float = 0.0  # probability of a Gaussian blur (defocus) with sigma up to `blur_sigma`
    blur_sigma: float = 1.5  # largest blur sigma, in pixels of the model's input
    lowres_p: float = 0.0  # probability of down- then up-sampling (a coarser camera), to 35-90 % of the side
    jpeg_p: float = 0.0  # probability of JPEG re-compression at quality 30-95
    zoom_out: float = 1.0  # the cell shrinks by up to this factor (frame padded with the background colour)

    # What each value may be beyond its type (checked with the types when the config is made, so
    # `train --set augmentation.grey_p=abc` is one line before a run writes anything).
    RULES: ClassVar[dict[str, Rule]] = {
        "crop_scale_min": ("within (0, 1]", lambda v: 0 < v <= 1),
        "brightness": at_least(0),
        "contrast": at_least(0),
        "saturation": at_least(0),
        "hue": between(0, 0.5),
        "stain_jitter": at_least(0),
        "grey_p": between(0, 1),
        "gamma": at_least(0),
        "blur_p": between(0, 1),
        "blur_sigma": at_least(0),
        "lowres_p": between(0, 1),
        "jpeg_p": between(0, 1),
        "zoom_out": between(1, 3),
    }

    def __post_init__(self) -> None:
        check_values(self, "augmentation", self.RULES)


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


def _background(image: torch.Tensor) -> list[float]:
    """Median colour of the brightest tenth of a uint8 CHW image's pixels: the smear's background."""
    flat = image.as_subclass(torch.Tensor).reshape(3, -1).float()
    bright = flat.sum(0) >= flat.sum(0).quantile(0.9)
    return flat[:, bright].median(dim=1).values.tolist()


class RandomZoomOut(torch.nn.Module):
    """Shrink the picture by a random factor in [1, `most`] inside a canvas of its own size, filled
    with its background colour: the same cell seen at a lower magnification (or framed more loosely)."""

    def __init__(self, most: float) -> None:
        super().__init__()
        self.most = float(most)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        factor = float(torch.empty(()).uniform_(1.0, self.most))
        if factor <= 1.0001:
            return image
        height, width = image.shape[-2:]
        small = T.functional.resize(image, [max(8, round(height / factor)), max(8, round(width / factor))], antialias=True)
        canvas = torch.empty_like(image.as_subclass(torch.Tensor))
        canvas[:] = torch.tensor(_background(image), dtype=torch.float32).round().to(image.dtype).view(3, 1, 1)
        top, left = (height - small.shape[-2]) // 2, (width - small.shape[-1]) // 2
        canvas[:, top : top + small.shape[-2], left : left + small.shape[-1]] = small
        return tv_tensors.Image(canvas)


class RandomApplyOne(torch.nn.Module):
    """Apply `transform` with probability `p` (torch's generator, so seeded per image like the rest)."""

    def __init__(self, transform: torch.nn.Module, p: float) -> None:
        super().__init__()
        self.transform, self.p = transform, float(p)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.transform(image) if float(torch.rand(())) < self.p else image


class RandomGamma(torch.nn.Module):
    """Gamma drawn log-uniformly in [exp(-spread), exp(spread)] (camera response / exposure)."""

    def __init__(self, spread: float) -> None:
        super().__init__()
        self.spread = float(spread)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        gamma = float(torch.empty(()).uniform_(-self.spread, self.spread).exp())
        return T.functional.adjust_gamma(image, gamma)


class RandomLowRes(torch.nn.Module):
    """Down-sample to 35-90 % of the side and back: a coarser camera or a smaller crop up-scaled."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        side = image.shape[-1]
        small = max(16, round(side * float(torch.empty(()).uniform_(0.35, 0.9))))
        down = T.functional.resize(image, [small, small], antialias=True)
        return T.functional.resize(down, [image.shape[-2], side], interpolation=T.InterpolationMode.BICUBIC, antialias=True)


class RandomJPEG(torch.nn.Module):
    """JPEG re-compression at a random quality in 30-95."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return T.functional.jpeg(image, int(torch.randint(30, 96, ())))


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
    """Optional HED stain jitter and zoom-out, random resized crop, flips, 90-degree rotations, colour
    jitter, then the optional gamma, grey, blur, lower resolution and JPEG steps (a camera's order).

    Takes a PIL image or a uint8 CHW tensor.
    """
    check_resolution(image_size)
    config = config or AugmentConfig()
    steps: list = [
        T.ToImage(),
        *([RandomHEDJitter(config.stain_jitter)] if config.stain_jitter > 0 else []),
        *([RandomZoomOut(config.zoom_out)] if config.zoom_out > 1 else []),
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
    if config.gamma > 0:
        steps.append(RandomGamma(config.gamma))
    if config.grey_p > 0:
        steps.append(RandomApplyOne(T.Grayscale(num_output_channels=3), config.grey_p))
    if config.blur_p > 0:
        steps.append(RandomApplyOne(T.GaussianBlur(7, sigma=(0.3, max(0.31, config.blur_sigma))), config.blur_p))
    if config.lowres_p > 0:
        steps.append(RandomApplyOne(RandomLowRes(), config.lowres_p))
    if config.jpeg_p > 0:
        steps.append(RandomApplyOne(RandomJPEG(), config.jpeg_p))
    steps += _to_normalised_float(mean, std)
    return T.Compose(steps)
