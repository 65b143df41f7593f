"""Training the cell segmenter (:class:`hemaclip.data.cells.TinyUNet`) on images with expert masks.

Why it is here: cell finding frames every field before the model reads it, so the segmenter's weights decide
what other labs' cells look like to hemaclip; its training must be in the open and re-runnable, and it must be
possible to train it on some images and score it on others (bench/train_segmenter.py trains on the Zheng 2018
val parts, bench/cell_finding_out_of_sample.py scores on the test parts).

Targets are the three classes `cells.py` reads (background incl. red cells, cytoplasm, nucleus), from masks as
:func:`hemaclip.data.other_labs.load_mask` reads them. Each step draws crops at a random working scale (the cell
25-120 working pixels wide, the range `find_cells` brings cells to), flipped and rotated, with strong colour, blur
and noise augmentation: the net is meant for labs whose stain it has never seen. Pixels added to fill a crop
smaller than the window carry no loss. Adam with a cosine-decayed learning rate, cross-entropy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from hemaclip.data.cells import CLASSES, TinyUNet, normalise
from hemaclip.data.other_labs import load_mask
from hemaclip.data.preprocess import decode_image, is_image_file
from hemaclip.errors import HemaclipError
from hemaclip.io import Rule, at_least, atomic_write, between, check_values

__all__ = ["MaskedImage", "SegmenterTrainConfig", "pairs_from_folders", "save_segmenter", "train_segmenter"]

IGNORE = -1  # target value of pixels that only pad a crop (no loss)


@dataclass(frozen=True)
class SegmenterTrainConfig:
    """How the segmenter is trained; the defaults are the recipe of bench/results/cell_finding_out_of_sample.json."""

    steps: int = 3000
    batch_size: int = 8
    crop: int = 128  # side of the training window, working pixels (a multiple of the net's stride)
    diameter_range: tuple[float, float] = (25.0, 120.0)  # cell width in working pixels, drawn log-uniformly
    lr: float = 2e-3
    weight_decay: float = 1e-4
    widths: tuple[int, ...] = (16, 32, 64, 128)
    seed: int = 0
    # colour and optics augmentation (strong on purpose: the net must hold on stains it never saw)
    brightness: float = 0.15  # additive, in [0, 1] units
    contrast: float = 0.3  # factor drawn in [1 - c, 1 + c]
    saturation: float = 0.5
    hue: float = 0.08  # fraction of the hue circle
    channel_gain: float = 0.15  # independent gain per RGB channel in [1 - g, 1 + g]
    gamma: float = 0.3  # gamma drawn log-uniformly in [exp(-g), exp(g)]
    grey_p: float = 0.1
    blur_p: float = 0.3
    blur_sigma: float = 1.5  # largest blur sigma, working pixels
    noise: float = 0.03  # largest Gaussian noise std

    RULES: ClassVar[dict[str, Rule]] = {
        "steps": at_least(1),
        "batch_size": at_least(1),
        "crop": ("a positive multiple of 16", lambda v: v > 0 and v % 16 == 0),
        "diameter_range": ("two increasing positive numbers", lambda v: len(v) == 2 and 0 < v[0] <= v[1]),
        "lr": ("above 0", lambda v: v > 0),
        "weight_decay": at_least(0),
        "widths": ("one to six positive widths", lambda v: 1 <= len(v) <= 6 and all(int(w) > 0 for w in v)),
        "brightness": at_least(0),
        "contrast": between(0, 1),
        "saturation": between(0, 1),
        "hue": between(0, 0.5),
        "channel_gain": between(0, 1),
        "gamma": at_least(0),
        "grey_p": between(0, 1),
        "blur_p": between(0, 1),
        "blur_sigma": at_least(0),
        "noise": at_least(0),
    }

    def __post_init__(self) -> None:
        check_values(self, "segmenter training config", self.RULES)
        if self.crop % 2 ** len(self.widths):
            raise HemaclipError(f"segmenter training config: crop {self.crop} is not a multiple of the net's stride "
                                f"{2 ** len(self.widths)}")


@dataclass
class MaskedImage:
    """One training picture: RGB uint8 [H, W, 3] and its class map uint8 [H, W] (indices of cells.CLASSES)."""

    image: np.ndarray
    target: np.ndarray
    name: str = ""
    diameter: float = field(init=False)

    def __post_init__(self) -> None:
        if self.image.shape[:2] != self.target.shape:
            raise HemaclipError(f"{self.name or 'image'}: mask {self.target.shape} does not match image {self.image.shape[:2]}")
        cell_px = int((self.target > 0).sum())
        # no cell in the mask: treat the whole side as one cell's width, so scale draws stay sensible
        self.diameter = 2.0 * math.sqrt(cell_px / math.pi) if cell_px else float(max(self.target.shape))


def pairs_from_folders(images: str | Path, masks: str | Path) -> list[MaskedImage]:
    """Every image of `images` that has a mask of the same file stem in `masks` (grey levels 0 / 128 / 255)."""
    images, masks = Path(images), Path(masks)
    for folder, what in ((images, "image"), (masks, "mask")):
        if not folder.is_dir():
            raise HemaclipError(f"{folder}: {what} folder not found")
    mask_of = {p.stem: p for p in sorted(masks.iterdir()) if p.is_file() and is_image_file(p)}
    if not mask_of:
        raise HemaclipError(f"{masks}: no masks (image files) in the mask folder; the segmenter needs one per image")
    pairs = [(p, mask_of[p.stem]) for p in sorted(images.iterdir()) if p.is_file() and is_image_file(p) and p.stem in mask_of]
    if not pairs:
        raise HemaclipError(f"{images}: no image has a mask of the same name in {masks}")
    return [load_pair(image, mask) for image, mask in pairs]


def load_pair(image: str | Path, mask: str | Path) -> MaskedImage:
    """An image file and its mask file as a :class:`MaskedImage`."""
    return MaskedImage(np.asarray(decode_image(image)), load_mask(mask), name=Path(image).name)


def _sample(item: MaskedImage, config: SegmenterTrainConfig, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One augmented training window: normalised float [3, C, C] and long targets [C, C] (IGNORE on padding)."""
    low, high = config.diameter_range
    scale = math.exp(rng.uniform(math.log(low), math.log(high))) / item.diameter
    x = torch.from_numpy(np.array(item.image[..., :3])).permute(2, 0, 1).float()[None] / 255.0
    y = torch.from_numpy(item.target.astype(np.int64))[None, None]
    h, w = item.target.shape
    size = (max(8, round(h * scale)), max(8, round(w * scale)))
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
    y = F.interpolate(y.float(), size=size, mode="nearest").long()
    crop = config.crop
    ph, pw = max(0, crop - size[0]), max(0, crop - size[1])
    if ph or pw:  # a small picture: replicate its edge (as inference pads to the stride), no loss there
        top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
        x = F.pad(x, (left, pw - left, top, ph - top), mode="replicate")
        y = F.pad(y, (left, pw - left, top, ph - top), value=IGNORE)
    y0 = int(rng.integers(0, x.shape[-2] - crop + 1))
    x0 = int(rng.integers(0, x.shape[-1] - crop + 1))
    x, y = x[0, :, y0:y0 + crop, x0:x0 + crop], y[0, 0, y0:y0 + crop, x0:x0 + crop]
    k = int(rng.integers(0, 4))
    x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
    if rng.random() < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    return normalise(_colour(x, config, rng)), y


def _colour(x: torch.Tensor, config: SegmenterTrainConfig, rng: np.random.Generator) -> torch.Tensor:
    """Colour, optics and noise augmentation of a float RGB [3, H, W] image in [0, 1]."""
    c = config
    x = x * torch.tensor(rng.uniform(1 - c.channel_gain, 1 + c.channel_gain, 3), dtype=x.dtype)[:, None, None]
    x = x.clamp(0, 1) ** math.exp(rng.uniform(-c.gamma, c.gamma))
    x = TF.adjust_saturation(x, float(rng.uniform(1 - c.saturation, 1 + c.saturation)))
    if c.hue:
        x = TF.adjust_hue(x, float(rng.uniform(-c.hue, c.hue)))
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - c.contrast, 1 + c.contrast) + mean + rng.uniform(-c.brightness, c.brightness)
    if rng.random() < c.grey_p:
        x = TF.rgb_to_grayscale(x.clamp(0, 1), num_output_channels=3)
    if c.blur_sigma > 0 and rng.random() < c.blur_p:
        sigma = float(rng.uniform(0.3, c.blur_sigma))
        x = TF.gaussian_blur(x, [2 * math.ceil(2 * sigma) + 1] * 2, [sigma, sigma])
    if c.noise > 0:
        x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(int(rng.integers(2**31)))) * rng.uniform(0, c.noise)
    return x.clamp(0, 1)


def save_segmenter(model: TinyUNet, widths: Sequence[int], path: str | Path) -> Path:
    """Write the weights as `cells.load_model` reads them (fp16 state dict with a `_widths` entry), atomically."""
    state = {k: v.detach().half() for k, v in model.state_dict().items()}
    state["_widths"] = torch.tensor([int(w) for w in widths])
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)
    return Path(path)


def train_segmenter(
    pairs: Sequence[MaskedImage],
    out: str | Path,
    config: SegmenterTrainConfig = SegmenterTrainConfig(),
    progress: Callable[[int, float], None] | None = None,
) -> dict:
    """Train a TinyUNet on `pairs`, save it to `out` and return the run's record (config, images, loss curve, time).

    `progress(step, loss)` is called every 50 steps and at the last."""
    if not pairs:
        raise HemaclipError("the segmenter needs at least one image with a mask to train on")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = TinyUNet(config.widths, n_classes=len(CLASSES)).train()
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    start, losses, curve = time.perf_counter(), [], []
    for step in range(1, config.steps + 1):
        batch = [_sample(pairs[int(i)], config, rng) for i in rng.integers(0, len(pairs), config.batch_size)]
        x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
        loss = F.cross_entropy(model(x), y, ignore_index=IGNORE)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == config.steps:
            mean = float(np.mean(losses[-50:]))
            curve.append({"step": step, "loss": round(mean, 4), "seconds": round(time.perf_counter() - start, 1)})
            if progress:
                progress(step, mean)
    path = save_segmenter(model.eval(), config.widths, out)
    return {"config": asdict(config), "images": [p.name for p in pairs], "loss_curve": curve,
            "train_seconds": round(time.perf_counter() - start, 1), "weights": str(path), "threads": torch.get_num_threads()}
