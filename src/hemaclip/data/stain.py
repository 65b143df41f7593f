"""Stain normalisation (Macenko, Reinhard) and HED-space stain jitter for blood-smear images.

Smears from another lab, scanner or staining batch differ mostly in colour. Two remedies live here:

* **normalisation** at inference time maps an image's stain appearance onto a fixed reference
  (`get_normalizer("macenko" | "reinhard")`). The maths is torchstain's numpy backend; the
  reference is a small JSON of stain parameters fitted once on one PBC image
  (`configs/stain/reference.json`), not an image, so the package ships no data.
* **jitter** at training time (`hed_jitter`) perturbs haematoxylin, eosin and DAB concentrations
  (Tellez et al. 2018), so the model sees plausible stain variation; the stain-shift corruption of
  the robustness benchmark uses the same function.

A normaliser never crashes on a degenerate image (blank, single colour, almost no stained pixels):
it returns the input unchanged and warns once, because an unnormalised cell is still usable while
a crash in a batch job is not.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources

import numpy as np
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

from hemaclip.errors import DataError, HemaclipError

NORMALIZER_NAMES: tuple[str, ...] = ("none", "macenko", "reinhard")
Normalizer = Callable[[np.ndarray], np.ndarray]

# Colour-deconvolution matrix of Ruifrok & Johnston (the one scikit-image uses for rgb2hed):
# rows are the optical-density RGB vectors of haematoxylin, eosin and DAB.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_OD_EPS = 1e-6
# Macenko estimates two stain vectors from "stained" pixels (optical density above beta on every
# channel); with fewer than this fraction of them the estimate is noise, so the image is left as is.
MACENKO_MIN_STAINED_FRACTION = 0.01
MACENKO_IO, MACENKO_BETA = 240, 0.15


@dataclass(frozen=True)
class StainReference:
    """Stain parameters of a reference image: what every normalised image is mapped onto."""

    source: str  # which image the numbers were fitted on (a name, for provenance)
    macenko_he: list[list[float]]  # 3x2 optical-density vectors of haematoxylin and eosin
    macenko_max_c: list[float]  # 99th-percentile concentrations of the two stains
    reinhard_means: list[float]  # LAB means (L in 0-100, a, b centred on 0)
    reinhard_stds: list[float]


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB array, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    return image


def fit_reference(image: np.ndarray, source: str) -> StainReference:
    """Fit both normalisers on `image` and return their parameters (used to make the shipped JSON)."""
    image = _check_image(image)
    macenko = NumpyMacenkoNormalizer()
    macenko.fit(image)
    reinhard = NumpyReinhardNormalizer()
    reinhard.fit(image)
    return StainReference(
        source=source,
        macenko_he=np.round(macenko.HERef, 6).tolist(),
        macenko_max_c=np.round(macenko.maxCRef, 6).tolist(),
        reinhard_means=np.round(np.asarray(reinhard.target_means, dtype=float), 6).tolist(),
        reinhard_stds=np.round(np.asarray(reinhard.target_stds, dtype=float), 6).tolist(),
    )


def default_reference() -> StainReference:
    """The shipped reference (stain parameters of one PBC neutrophil image; see the JSON's `source`)."""
    text = resources.files("hemaclip").joinpath("configs/stain/reference.json").read_text(encoding="utf-8")
    return StainReference(**json.loads(text))


class _SafeNormalizer:
    """Wraps a torchstain normaliser: validates input, and falls back to identity on degenerate images."""

    def __init__(self, name: str, fn: Callable[[np.ndarray], np.ndarray], reference: StainReference) -> None:
        self.name = name
        self._fn = fn
        # Identifies method + reference, e.g. for feature caches keyed on what the model saw.
        digest = hashlib.sha1(json.dumps(asdict(reference), sort_keys=True).encode()).hexdigest()[:12]
        self.cache_id = f"{name}:{digest}"
        self.fallbacks = 0  # how many images were returned unchanged (reported by callers)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image = _check_image(image)
        try:
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out = self._fn(np.ascontiguousarray(image))
            out = np.asarray(out)
            if out.shape != image.shape or not np.all(np.isfinite(out)):
                raise ValueError("non-finite or misshapen output")
        except (ValueError, IndexError, np.linalg.LinAlgError, FloatingPointError) as exc:
            self.fallbacks += 1
            if self.fallbacks == 1:
                warnings.warn(
                    f"{self.name} stain normalisation failed on an image ({exc}); returning it unchanged "
                    "(blank or unstained images have no stain to normalise)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return image.copy()
        return out.astype(np.uint8, copy=False)

    def __repr__(self) -> str:
        return f"StainNormalizer({self.name!r})"


def _macenko(reference: StainReference) -> Normalizer:
    normalizer = NumpyMacenkoNormalizer()
    normalizer.HERef = np.asarray(reference.macenko_he, dtype=float)
    normalizer.maxCRef = np.asarray(reference.macenko_max_c, dtype=float)

    def run(image: np.ndarray) -> np.ndarray:
        optical_density = -np.log((image.reshape(-1, 3).astype(np.float64) + 1) / MACENKO_IO)
        stained = np.all(optical_density >= MACENKO_BETA, axis=1)
        if stained.mean() < MACENKO_MIN_STAINED_FRACTION or float(optical_density[stained].std(axis=0).max()) < 1e-3:
            raise ValueError("too few distinct stained pixels to estimate stain vectors")
        out, _, _ = normalizer.normalize(image, Io=MACENKO_IO, beta=MACENKO_BETA, stains=False)
        return out

    return run


def _reinhard(reference: StainReference) -> Normalizer:
    normalizer = NumpyReinhardNormalizer()
    normalizer.target_means = np.asarray(reference.reinhard_means, dtype=np.float32)
    normalizer.target_stds = np.asarray(reference.reinhard_stds, dtype=np.float32)

    def run(image: np.ndarray) -> np.ndarray:
        flat = image.reshape(-1, 3).astype(np.float32)
        if float(flat.std(axis=0).min()) < 1e-3:  # a single-colour channel: Reinhard divides by its std
            raise ValueError("image has a constant colour channel")
        return normalizer.normalize(image)

    return run


def get_normalizer(name: str | None, reference: np.ndarray | StainReference | None = None) -> Normalizer | None:
    """Return a uint8 HxWx3 -> uint8 HxWx3 stain normaliser, or None for "none"/None.

    The one check of a normaliser name (every `--stain-norm` option calls this): an unknown name is a
    one-line `HemaclipError`.

    `reference` is an RGB image to fit on, a `StainReference`, or None for the shipped PBC reference.
    Example: ``norm = get_normalizer("macenko"); out = norm(np.asarray(decode_image(path)))``.
    """
    key = (name or "none").strip().lower()
    if key not in NORMALIZER_NAMES:
        raise HemaclipError(f"unknown stain normaliser {name!r} (--stain-norm): choose one of {', '.join(NORMALIZER_NAMES)}")
    if key == "none":
        return None
    if reference is None:
        ref = default_reference()
    elif isinstance(reference, StainReference):
        ref = reference
    else:
        try:
            ref = fit_reference(np.asarray(reference), source="user reference image")
        except (ValueError, IndexError, np.linalg.LinAlgError) as exc:
            raise DataError(f"cannot fit a stain reference on this image ({exc})") from None
    return _SafeNormalizer(key, _macenko(ref) if key == "macenko" else _reinhard(ref), ref)


def normalizer_id(normalizer: Normalizer | None) -> str:
    """A short string naming a normaliser and its reference ("none" for None), for cache keys and reports."""
    if normalizer is None:
        return "none"
    return str(getattr(normalizer, "cache_id", None) or getattr(normalizer, "name", None) or repr(normalizer))


def normalize_batch(images: np.ndarray, normalizer: Normalizer | None) -> np.ndarray:
    """Apply `normalizer` to every image of an [N, H, W, 3] uint8 array (identity for None)."""
    if normalizer is None:
        return images
    out = np.empty(images.shape, dtype=np.uint8)
    for index in range(len(images)):
        out[index] = normalizer(np.asarray(images[index]))
    return out


# ---------------------------------------------------------------------------------------------------
# HED colour space and stain jitter


def rgb_to_hed(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float HED stain concentrations (Ruifrok & Johnston colour deconvolution).

    Unlike scikit-image's rgb2hed, negative concentrations are kept, so `hed_to_rgb` inverts it exactly.
    """
    rgb = np.maximum(np.asarray(image, dtype=np.float64) / 255.0, _OD_EPS)
    optical_density = np.log(rgb) / np.log(_OD_EPS)
    return optical_density @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Inverse of `rgb_to_hed`, clipped back to uint8 RGB."""
    optical_density = -(np.asarray(hed, dtype=np.float64) * -np.log(_OD_EPS)) @ RGB_FROM_HED
    rgb = np.exp(optical_density)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def hed_jitter(
    image: np.ndarray, rng: np.random.Generator | None, strength: float, alphas: np.ndarray | None = None, betas: np.ndarray | None = None
) -> np.ndarray:
    """Perturb each HED stain concentration: c' = alpha * c + beta (Tellez et al., 2018).

    alpha ~ U(1 - strength, 1 + strength) and beta ~ U(-strength, strength) / 20 per channel unless
    given explicitly (the concentration scale of a typical smear is ~0.05, so beta is scaled to it).
    strength 0 returns the image unchanged.
    """
    image = _check_image(image)
    if strength <= 0 and alphas is None and betas is None:
        return image.copy()
    if alphas is None:
        alphas = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    if betas is None:
        betas = rng.uniform(-strength, strength, size=3) / 20.0
    hed = rgb_to_hed(image)
    shifted = hed * np.asarray(alphas)[None, None, :] + np.asarray(betas)[None, None, :]
    return hed_to_rgb(shifted)
