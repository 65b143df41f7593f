"""Image corruptions for robustness tests of blood-cell models (MedMNIST-C / ImageNet-C style).

Each corruption maps a uint8 RGB image [H, W, 3] to a corrupted uint8 image of the same shape, at
five severities (1 = mild, 5 = strong). Randomness comes only from a generator seeded by
(seed, corruption, severity, image index), so a benchmark is exactly repeatable and every image
gets its own draw. Sizes (blur radii, occluder side) are fractions of the image side, so a 128 px
and a 192 px copy of a cell are corrupted alike.

The parameters per severity are in `SEVERITY_PARAMS` (one table, easy to read and change). They
are chosen so that severity 1 is a plausible acquisition variation and severity 5 is a clearly
degraded but still recognisable cell; they are not calibrated against real lab data.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hemaclip.data.stain import hed_jitter

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# Per corruption, the parameter at severities 1..5 (meaning given in each function's docstring).
SEVERITY_PARAMS: dict[str, tuple[float, ...]] = {
    "stain_shift": (0.1, 0.2, 0.3, 0.45, 0.6),  # HED concentration scale change (+-) per stain
    "brightness": (0.05, 0.1, 0.15, 0.22, 0.3),  # added to HSV value (0-1)
    "contrast": (0.8, 0.65, 0.5, 0.38, 0.25),  # contrast factor around the mean
    "gaussian_noise": (0.02, 0.04, 0.06, 0.08, 0.11),  # noise std (0-1 scale)
    "shot_noise": (250, 120, 60, 30, 15),  # photons per unit intensity (lower = noisier)
    "defocus_blur": (0.006, 0.01, 0.015, 0.022, 0.03),  # disk radius / image side
    "motion_blur": (0.03, 0.05, 0.07, 0.1, 0.13),  # streak length / image side
    "jpeg": (35, 22, 14, 9, 6),  # JPEG quality
    "resolution_drop": (0.7, 0.5, 0.35, 0.25, 0.18),  # down-sampling factor before up-sampling back
    "occlusion": (0.04, 0.08, 0.13, 0.2, 0.28),  # occluded share of the image area
    "rotation": (10, 20, 30, 45, 60),  # rotation angle in degrees (random sign)
}
CORRUPTION_NAMES: tuple[str, ...] = tuple(SEVERITY_PARAMS)

Corruption = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def _to_float(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) / 255.0


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _border_colour(image: np.ndarray) -> tuple[int, int, int]:
    """Median colour of the outer ring of pixels: the slide background around a centred cell."""
    ring = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return tuple(int(v) for v in np.median(ring, axis=0))


def _convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve each channel with `kernel` (normalised), reflecting at the borders."""
    kernel = kernel / kernel.sum()
    x = torch.from_numpy(_to_float(image)).permute(2, 0, 1).unsqueeze(1)  # [3, 1, H, W]
    kh, kw = kernel.shape
    x = F.pad(x, (kw // 2, kw - 1 - kw // 2, kh // 2, kh - 1 - kh // 2), mode="reflect")
    out = F.conv2d(x, torch.from_numpy(kernel.astype(np.float32))[None, None])
    return _to_uint8(out.squeeze(1).permute(1, 2, 0).numpy())


def stain_shift(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Scale each of the haematoxylin, eosin, DAB concentrations by 1 +- level (random sign per stain),
    plus a small offset: a different staining batch or protocol."""
    alphas = 1.0 + level * rng.choice((-1.0, 1.0), size=3) * rng.uniform(0.75, 1.0, size=3)
    betas = rng.uniform(-level, level, size=3) / 20.0
    return hed_jitter(image, rng, level, alphas=alphas, betas=betas)


def brightness(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Add `level` (random sign) to the HSV value channel: over/under-exposure."""
    hsv = np.asarray(Image.fromarray(image).convert("HSV")).astype(np.float32) / 255.0
    hsv[..., 2] = np.clip(hsv[..., 2] + level * rng.choice((-1.0, 1.0)), 0.0, 1.0)
    return np.asarray(Image.fromarray(_to_uint8(hsv), mode="HSV").convert("RGB"))


def contrast(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Scale deviations from the mean intensity by `level` (< 1 lowers contrast)."""
    x = _to_float(image)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _to_uint8((x - mean) * level + mean)


def gaussian_noise(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of standard deviation `level`: sensor read noise."""
    return _to_uint8(_to_float(image) + rng.normal(0.0, level, size=image.shape))


def shot_noise(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson (photon) noise with `level` photons per unit intensity: low light."""
    return _to_uint8(rng.poisson(_to_float(image) * level) / level)


def defocus_blur(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Disk kernel of radius `level` x image side: the focal plane missed the cell."""
    radius = max(0.75, level * image.shape[0])  # below ~0.75 px the disk is a single pixel (no blur)
    half = int(np.ceil(radius))
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    # Anti-aliased disk: a pixel's weight is the share of it inside the radius (approximately).
    kernel = np.clip(radius + 0.5 - np.sqrt(xx**2 + yy**2), 0.0, 1.0)
    return _convolve(image, kernel)


def motion_blur(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """A straight streak of length `level` x image side at a random angle: stage or camera movement."""
    length = max(2.0, level * image.shape[0])
    half = int(np.ceil(length / 2))
    angle = rng.uniform(0.0, np.pi)
    size = 2 * half + 1
    kernel = np.zeros((size, size), dtype=np.float64)
    for t in np.linspace(-length / 2, length / 2, num=int(4 * length) + 1):
        x, y = half + t * np.cos(angle), half + t * np.sin(angle)
        kernel[int(round(y)), int(round(x))] += 1.0
    return _convolve(image, kernel)


def jpeg(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Re-encode as JPEG at quality `level`: aggressive compression by a scanner or upload."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(level))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


def resolution_drop(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Down-sample by `level` (area averaging), then up-sample back (bicubic): a lower-power objective."""
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((max(4, round(w * level)), max(4, round(h * level))), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.BICUBIC))


def occlusion(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """A dark rectangle covering `level` of the image area near the centre: debris, dust, overlap."""
    h, w = image.shape[:2]
    aspect = rng.uniform(0.6, 1.6)
    oh = int(np.clip(round(np.sqrt(level * h * w * aspect)), 1, h))
    ow = int(np.clip(round(level * h * w / max(oh, 1)), 1, w))
    # The centre falls in the middle half of the image, where the (centred) cell is, so it hits the cell.
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    top = int(np.clip(round(cy - oh / 2), 0, h - oh))
    left = int(np.clip(round(cx - ow / 2), 0, w - ow))
    out = image.copy()
    out[top : top + oh, left : left + ow] = (40, 40, 40)
    return out


def rotation(image: np.ndarray, level: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate by `level` degrees (random sign), bicubic, corners filled with the background colour.

    Training uses lossless 90-degree turns only, so this tests interpolation and corner fill.
    """
    angle = float(level) * float(rng.choice((-1.0, 1.0)))
    rotated = Image.fromarray(image).rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=_border_colour(image))
    return np.asarray(rotated)


CORRUPTIONS: dict[str, Corruption] = {
    "stain_shift": stain_shift,
    "brightness": brightness,
    "contrast": contrast,
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "jpeg": jpeg,
    "resolution_drop": resolution_drop,
    "occlusion": occlusion,
    "rotation": rotation,
}


def _check(name: str, severity: int) -> None:
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTION_NAMES)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity}")


def corruption_rng(name: str, severity: int, seed: int, index: int) -> np.random.Generator:
    """The generator of one (corruption, severity, seed, image index): stable across runs and machines."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode()), int(severity), int(index)])


def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0, index: int = 0) -> np.ndarray:
    """Apply corruption `name` at `severity` (1-5) to one uint8 RGB image; deterministic in (seed, index).

    Example: ``noisy = corrupt(np.asarray(decode_image(path)), "gaussian_noise", 3, seed=0, index=7)``.
    """
    _check(name, severity)
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 image, got {image.dtype} {image.shape}")
    out = CORRUPTIONS[name](np.ascontiguousarray(image), SEVERITY_PARAMS[name][severity - 1], corruption_rng(name, severity, seed, index))
    return np.ascontiguousarray(out, dtype=np.uint8)


def corrupt_batch(
    images: np.ndarray, name: str, severity: int, seed: int = 0, indices: Sequence[int] | None = None
) -> np.ndarray:
    """Corrupt every image of [N, H, W, 3] uint8; image i uses index `indices[i]` (default i)."""
    _check(name, severity)
    indices = range(len(images)) if indices is None else indices
    if len(indices) != len(images):
        raise ValueError(f"{len(indices)} indices for {len(images)} images")
    out = np.empty((len(images), *images.shape[1:]), dtype=np.uint8)
    for row, index in enumerate(indices):
        out[row] = corrupt(np.asarray(images[row]), name, severity, seed=seed, index=int(index))
    return out
