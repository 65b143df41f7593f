"""The one path from an image file (or uploaded bytes) to what a model sees.

* :func:`decode_image` is the only place that opens images: a file path or the bytes of an upload,
  decoded fully into 8-bit RGB (grayscale, palette, RGBA, CMYK, 16-bit and EXIF-rotated files are
  normalised here), or a one-line :class:`ImageDecodeError` naming the file.
* :class:`Preprocess` is built from a model's config (``Preprocess.from_config(model.config)`` or
  :func:`preprocess_for`), as open_clip builds its transforms from the model. It turns a decoded image
  into the model's uint8 array (``to_array``: today the whole image, bicubic, at ``image_size``; the
  decoded-image cache stores training images at a larger storage size the same way) and uint8 arrays
  into normalised tensors (``eval_transform``, ``train_transform``, ``batch``).

Training (cache, then train transform), ``describe``, ``index build``/``search``, ``serve``,
``evaluate`` and every study go through it. What it does is the model config's ``preprocess`` field
(stored in checkpoints; empty = the defaults in :data:`PREPROCESS_OPTIONS`), so a later step such as
finding the cell in a larger field (``"locate": "cells"``) or colour standardisation is added here and
in that field, without touching callers. A checkpoint saved before the field existed loads with the
defaults, i.e. exactly the preprocessing it was trained with.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hemaclip.constants import IMAGENET_MEAN, IMAGENET_STD
from hemaclip.errors import DataError, HemaclipError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "PREPROCESS_OPTIONS",
    "CellView",
    "ConfiguredModel",
    "ImageConfig",
    "ImageDecodeError",
    "PREPROCESS_NUMBERS",
    "Preprocess",
    "check_preprocess",
    "as_rgb",
    "decode_image",
    "is_image_file",
    "skipped_files_message",
    "preprocess_for",
]

# Refuse decompression bombs: far above any cell crop or smear tile a user would embed.
MAX_IMAGE_PIXELS = 64_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MIN_SIDE = 8

# The options of a model config's `preprocess` field and their allowed values; the first is the default.
PREPROCESS_OPTIONS: dict[str, tuple[str, ...]] = {
    # Which part of the image the model sees: the whole image, or each white cell found in it
    # (:mod:`hemaclip.data.cells`) centred in a square of `frame` x its diameter.
    "locate": ("whole", "cell"),
    "resize": ("bicubic",),  # how that part is brought to the model's size
    # "grey": luma only (ITU-R 601, as 3 equal channels), so a model cannot use stain colour at all;
    # the leukaemia study's stain-blind twins are trained and read this way.
    "colour": ("rgb", "grey"),
}
# Numeric options: (default, lowest, highest). `frame` = crop side / cell diameter; 2.5 matches how large
# white cells sit in the training lab's (PBC) crops (mean diameter 0.41 of the side, measured).
PREPROCESS_NUMBERS: dict[str, tuple[float, float, float]] = {"frame": (2.5, 1.5, 4.0)}


class ImageDecodeError(DataError):
    """An image that cannot be decoded; `kind` says why (for callers that map it, e.g. to HTTP statuses):
    missing, empty, not_image, format, too_large, corrupt or too_small."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def is_image_file(path: Path) -> bool:
    """True for file names with a common raster-image suffix (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


SKIPPED_NAMES_SHOWN = 3  # names quoted in the one-line note on skipped files


def skipped_files_message(skipped: Sequence[Path]) -> str:
    """One line on the files a folder walk left out because their names carry no image suffix (GIFs,
    names without a suffix, notes): how many, and the first few names."""
    names = ", ".join(Path(p).name for p in skipped[:SKIPPED_NAMES_SHOWN])
    more = f" and {len(skipped) - SKIPPED_NAMES_SHOWN} more" if len(skipped) > SKIPPED_NAMES_SHOWN else ""
    return (f"note: skipped {len(skipped)} file(s) without an image suffix ({', '.join(IMAGE_SUFFIXES)}): "
            f"{names}{more}")


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


def as_rgb(image: Image.Image) -> Image.Image:
    """An in-memory PIL image as :func:`decode_image` reads it from a file (EXIF orientation applied, 8-bit
    RGB, transparency on white): a picture handed over as an object must read as its file does."""
    return _to_rgb(ImageOps.exif_transpose(image))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def decode_image(
    source: str | Path | bytes, name: str | None = None, formats: Sequence[str] | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode a file (path) or an upload (bytes) fully into an 8-bit RGB PIL image.

    `name` names an upload in messages (default "upload"); `formats` (PIL format names) restricts what
    is accepted, judged by the content, not the file name; `max_pixels` (default :data:`MAX_IMAGE_PIXELS`)
    refuses larger images from their header, before any pixel is decoded (thread-safe: a caller's own
    limit, not PIL's global one). Raises :class:`ImageDecodeError` (a `DataError`, one line naming the
    file) for a missing, empty, unreadable, too large, corrupt or truncated image, or one under 8 pixels
    on a side.
    """
    from_bytes = isinstance(source, (bytes, bytearray, memoryview))
    if from_bytes:
        label = name or "upload"
        if not source:
            raise ImageDecodeError(f"{label}: empty body, not an image", "empty")
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise ImageDecodeError(f"{path}: image file not found", "missing")
        if path.stat().st_size == 0:
            raise ImageDecodeError(f"{path}: empty file (0 bytes), not an image", "empty")
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(source)) if from_bytes else path) as opened:
                if formats is not None and opened.format not in formats:
                    names = [{"WEBP": "WebP"}.get(f, f) for f in formats]
                    accepted = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
                    raise ImageDecodeError(f"{label}: image format {opened.format} is not accepted; send {accepted}", "format")
                width, height = opened.size
                if max_pixels is not None and width * height > max_pixels:
                    raise ImageDecodeError(
                        f"{label}: image is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), "
                        f"more than the limit of {max_pixels / 1e6:g} megapixels", "too_large")
                opened.load()
                image = as_rgb(opened)
                image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if from_bytes:
            raise ImageDecodeError(f"{label}: image has too many pixels (limit {MAX_IMAGE_PIXELS})", "too_large") from None
        raise ImageDecodeError(
            f"{label}: image too large ({exc.__class__.__name__}); limit is {MAX_IMAGE_PIXELS} pixels", "too_large"
        ) from None
    except UnidentifiedImageError:
        if from_bytes:
            raise ImageDecodeError(f"{label}: not an image (content is not JPEG, PNG, BMP, TIFF, WebP or GIF)", "not_image") from None
        raise ImageDecodeError(f"{label}: not a readable image file", "not_image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"{label}: corrupt or truncated image ({_first_line(exc)})", "corrupt") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    if min(image.size) < MIN_SIDE:
        raise ImageDecodeError(
            f"{label}: image is {image.size[0]}x{image.size[1]} pixels, too small to be a cell image", "too_small"
        )
    return image


def check_preprocess(spec: Mapping[str, Any] | None, source: str = "model config") -> dict[str, str]:
    """A `preprocess` field checked against :data:`PREPROCESS_OPTIONS` (one-line error for an unknown
    option or value); returned as given, defaults left implicit."""
    spec = dict(spec or {})
    known = [*PREPROCESS_OPTIONS, *PREPROCESS_NUMBERS]
    unknown = sorted(str(k) for k in spec if k not in known)
    if unknown:
        raise HemaclipError(f"{source}: unknown preprocess option(s) {', '.join(unknown)} (known: {', '.join(known)})")
    for key, value in spec.items():
        if key in PREPROCESS_NUMBERS:
            _, low, high = PREPROCESS_NUMBERS[key]
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise HemaclipError(f"{source}: preprocess {key}={value!r} is not a number") from None
            if not low <= number <= high:
                raise HemaclipError(f"{source}: preprocess {key}={number} is outside [{low}, {high}]")
            spec[key] = f"{number:g}"
            continue
        if value not in PREPROCESS_OPTIONS[key]:
            raise HemaclipError(f"{source}: preprocess {key}={value!r} is not supported (choose from {', '.join(PREPROCESS_OPTIONS[key])})")
    return {str(k): str(v) for k, v in spec.items()}


def _defaults() -> dict[str, str]:
    return {**{k: v[0] for k, v in PREPROCESS_OPTIONS.items()}, **{k: f"{v[0]:g}" for k, v in PREPROCESS_NUMBERS.items()}}


@dataclass(frozen=True)
class CellView:
    """One cell as the model sees it: its uint8 array, its box (x0, y0, x1, y1) in the original
    picture's pixels, whether a white cell was found there (False: the whole picture, no cell found)
    and whether the cell is cut by the picture's edge."""

    array: np.ndarray
    box: tuple[int, int, int, int]
    found: bool = True
    touches_border: bool = False


class ImageConfig(Protocol):
    """What preprocessing reads of a model config (:class:`hemaclip.models.config.ModelConfig` has it;
    its optional ``preprocess`` field is read with a default)."""

    @property
    def image_size(self) -> int: ...

    @property
    def image_mean(self) -> Sequence[float]: ...

    @property
    def image_std(self) -> Sequence[float]: ...


class ConfiguredModel(Protocol):
    """A model carrying its config (:class:`hemaclip.models.model.DualEncoder`): data/ sits below models/,
    so it names the one attribute it reads instead of importing the class."""

    @property
    def config(self) -> ImageConfig: ...


@dataclass(frozen=True)
class Preprocess:
    """Decoded image -> the model's uint8 array -> normalised tensor, as one model config says.

    `image_size`, `mean` and `std` are the model's input size and normalisation; `spec` the non-default
    options of its ``preprocess`` field (empty: the whole image, bicubic).
    """

    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    spec: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_config(cls, config: ImageConfig) -> Preprocess:
        """The preprocessing of a model config (`ModelConfig` or anything with its fields)."""
        spec = check_preprocess(getattr(config, "preprocess", None))
        defaults = _defaults()
        return cls(
            image_size=int(config.image_size),
            mean=tuple(float(v) for v in config.image_mean),
            std=tuple(float(v) for v in config.image_std),
            spec=tuple(sorted((k, v) for k, v in spec.items() if v != defaults[k])),
        )

    @property
    def options(self) -> dict[str, str]:
        """Every option with its value (defaults filled in)."""
        return {**_defaults(), **dict(self.spec)}

    @property
    def locates_cells(self) -> bool:
        return self.options["locate"] == "cell"

    @property
    def frame(self) -> float:
        return float(self.options["frame"])

    @property
    def cache_id(self) -> str:
        """What sets the uint8 arrays apart from the default path ("" for the default), for cache keys;
        with cell finding, the segmenter's weights are part of it."""
        parts = [f"{k}={v}" for k, v in self.spec]
        if self.locates_cells:
            from hemaclip.data.cells import segmenter_id

            parts.append(f"segmenter={segmenter_id()}")
        return ";".join(parts)

    # -- uint8 arrays ------------------------------------------------------------------------------

    def to_array(self, image: Image.Image | np.ndarray, size: int | None = None) -> np.ndarray:
        """uint8 [S, S, 3] of a decoded image (PIL, or a uint8 HxWx3 RGB array) at `size` (default
        `image_size`). With ``locate=whole`` the whole image resized, bicubic (an array already at that
        size is returned as is); with ``locate=cell`` the cell the picture is about (the one at its
        centre, else the largest), framed; the whole image if no white cell is found."""
        if self.locates_cells:
            return self.views(image, size, primary_only=True)[0].array
        return self._whole(image, size)

    def views(self, image: Image.Image | np.ndarray, size: int | None = None, primary_only: bool = False) -> list[CellView]:
        """What the model sees of a picture: one :class:`CellView` per white cell found (``locate=cell``;
        several for a field, sorted by position), or one view of the whole image (``locate=whole``, or no
        cell found, then with ``found=False``)."""
        width, height = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
        whole = CellView(self._whole(image, size), (0, 0, width, height), found=not self.locates_cells)
        if not self.locates_cells:  # no full-size array: a 12-megapixel field would copy 36 MB for its shape
            return [whole]
        rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        from hemaclip.data.cells import crop_cell, locate_cells

        cells, primary = locate_cells(rgb)
        if not cells:
            return [whole]
        chosen = [cells[primary]] if primary_only else sorted(cells, key=lambda c: (c.box[1], c.box[0]))
        side = int(size or self.image_size)
        return [
            CellView(self._whole(crop_cell(rgb, cell, self.frame), side), tuple(int(v) for v in cell.box), True, cell.touches_border)
            for cell in chosen
            if cell is not None
        ]

    def _whole(self, image: Image.Image | np.ndarray, size: int | None = None) -> np.ndarray:
        """The whole image resized to `size`, bicubic (as is when already that size)."""
        size = int(size or self.image_size)
        if isinstance(image, np.ndarray):
            array = np.asarray(image)
            if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
                raise DataError(f"expected a uint8 HxWx3 RGB array, got {array.dtype} {array.shape}")
            if array.shape[:2] == (size, size):
                return self._colour(array)
            image = Image.fromarray(array)
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return self._colour(np.asarray(image))

    @property
    def grey(self) -> bool:
        """True when the model sees luma only (the `colour` option is "grey")."""
        return self.options["colour"] == "grey"

    def _colour(self, array: np.ndarray) -> np.ndarray:
        if not self.grey:
            return array
        luma = np.asarray(Image.fromarray(array).convert("L"))
        return np.repeat(luma[..., None], 3, axis=2)

    def load(self, source: str | Path | bytes, size: int | None = None) -> np.ndarray:
        """:func:`decode_image` then :meth:`to_array`."""
        return self.to_array(decode_image(source), size)

    # -- tensors -----------------------------------------------------------------------------------

    def eval_transform(self) -> Any:
        """uint8 CHW tensor (or PIL image) -> normalised float tensor at `image_size`."""
        from hemaclip.data.transforms import eval_transform

        return eval_transform(self.image_size, self.mean, self.std)

    def train_transform(self, augment: Any = None) -> Any:
        """The training augmentation (:class:`hemaclip.data.transforms.AugmentConfig`) ending at `image_size`.
        A grey model (``colour=grey``) always takes the augmentation's grey step (``grey_p = 1``, after the
        HED and colour jitter), so no augmentation can bring colour back."""
        import dataclasses

        from hemaclip.data.transforms import AugmentConfig, train_transform

        if self.grey:
            augment = dataclasses.replace(augment or AugmentConfig(), grey_p=1.0)
        return train_transform(self.image_size, augment, self.mean, self.std)

    def batch(self, arrays: Sequence[np.ndarray] | np.ndarray, transform: Any = None) -> Any:
        """Normalised float tensor [N, 3, S, S] of uint8 arrays [N, H, W, 3] (resized to `image_size`)."""
        import torch

        transform = transform or self.eval_transform()
        # The colour step again (idempotent): arrays changed after `to_array` (corruptions, raw images) stay grey.
        return torch.stack([transform(torch.from_numpy(np.array(self._colour(np.asarray(a)))).permute(2, 0, 1)) for a in arrays])


def preprocess_for(model: ConfiguredModel) -> Preprocess:
    """The preprocessing of a model (built from ``model.config``)."""
    return Preprocess.from_config(model.config)
