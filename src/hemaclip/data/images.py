"""Image decoding that fails with a one-line error naming the file, and normalises odd modes to RGB.

Blood-smear images from other labs arrive as grayscale, palette, RGBA, CMYK, 16-bit or EXIF-rotated
files; each is converted to 8-bit RGB here so nothing downstream needs to care.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hemaclip.errors import DataError

# Refuse decompression bombs: far above any cell crop or smear tile a user would embed.
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = np.zeros_like(array) if high <= low else (array - low) / (high - low) * 255.0
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode `path` fully into an 8-bit RGB PIL image, or raise `DataError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not an image")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)
                image = _to_rgb(image)
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: image too large ({exc.__class__.__name__}); limit is {MAX_IMAGE_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not a readable image file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or truncated image ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    if min(image.size) < 8:
        raise DataError(f"{path}: image is {image.size[0]}x{image.size[1]} pixels, too small to be a cell image")
    return image


def is_image_file(path: Path) -> bool:
    """True for file names with a common raster-image suffix (case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES
