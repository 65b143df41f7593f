"""Shortcut baselines: how far do colour and coarse layout alone go, with no cell morphology at all?

A set acquired class by class can give each class its own stain, lamp and camera cast. These readers see
only that: 15 colour statistics per image, a colour histogram, or the image shrunk to 8x8 pixels. If one
comes close to a trained model, the model's number says little about morphology.

Protocol (no choice on the test split): features from the decoded-image cache (default preprocessing,
the whole image, bicubic); a standardised logistic regression fitted on the **train** split only; its
inverse regularisation ``C`` chosen on the **val** split (accuracy, then macro F1, then the smaller C);
the model of that C (fitted on train) predicts val and test. The same image statistics also place images
into acquisition-like clusters (k-means) for a grouped split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hemaclip.data.image_cache import decoded_images

__all__ = [
    "SHORTCUTS",
    "Shortcut",
    "acquisition_clusters",
    "cluster_features",
    "colour_histogram",
    "colour_statistics",
    "fit_shortcut",
    "shortcut_features",
    "tiny_pixels",
]

C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 4, 17))
MAX_ITER = 5000
HISTOGRAM_BINS = 8  # per channel: an 8x8x8 joint RGB histogram


def colour_statistics(images: np.ndarray) -> np.ndarray:
    """[N, 15]: mean, sd and the 10/50/90th percentiles of R, G and B of each uint8 image [N, H, W, 3]."""
    pixels = np.asarray(images, dtype=np.float64).reshape(len(images), -1, 3) / 255.0
    percentiles = np.percentile(pixels, [10, 50, 90], axis=1)  # [3, N, 3]
    return np.concatenate([pixels.mean(axis=1), pixels.std(axis=1), *percentiles], axis=1)


def colour_histogram(images: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """[N, bins^3]: the joint RGB histogram of each image as pixel shares, square-rooted (Hellinger), so a
    linear model weighs rare colours (stained nuclei) beside the dominant background."""
    codes = (np.asarray(images, dtype=np.int64).reshape(len(images), -1, 3) * bins) // 256
    flat = (codes[..., 0] * bins + codes[..., 1]) * bins + codes[..., 2]
    hist = np.stack([np.bincount(row, minlength=bins**3) for row in flat]).astype(np.float64)
    return np.sqrt(hist / hist.sum(axis=1, keepdims=True))


def tiny_pixels(images: np.ndarray) -> np.ndarray:
    """[N, 192]: the 8x8 RGB pixel values (images decoded at 8 px), scaled to [0, 1]."""
    return np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 255.0


def background_statistics(images: np.ndarray) -> np.ndarray:
    """[N, 6]: mean and sd of R, G, B over the brighter half of each image's pixels (the slide
    background between cells, whose tint follows lamp, camera and stain batch rather than the cells)."""
    pixels = np.asarray(images, dtype=np.float64).reshape(len(images), -1, 3) / 255.0
    brightness = pixels.mean(axis=2)
    bright = brightness >= np.median(brightness, axis=1, keepdims=True)
    out = []
    for row, mask in zip(pixels, bright):
        part = row[mask]
        out.append(np.concatenate([part.mean(axis=0), part.std(axis=0)]))
    return np.stack(out)


@dataclass(frozen=True)
class Shortcut:
    """One shortcut reader: the size images are decoded at and the features computed from them."""

    name: str
    size: int
    features: Callable[[np.ndarray], np.ndarray]
    description: str


SHORTCUTS: dict[str, Shortcut] = {
    s.name: s
    for s in (
        Shortcut("colour-stats", 32, colour_statistics, "15 colour statistics (mean, sd, 10/50/90th percentiles of R, G, B) at 32x32"),
        Shortcut("colour-hist", 64, colour_histogram, f"joint RGB histogram ({HISTOGRAM_BINS}^3 bins, square-rooted shares) at 64x64"),
        Shortcut("pixels-8x8", 8, tiny_pixels, "the image shrunk to 8x8 (192 RGB values)"),
    )
}


def shortcut_features(name: str, paths: Sequence[Path], progress: bool = False) -> np.ndarray:
    """Features of shortcut `name` for image files (through the decoded-image cache)."""
    shortcut = SHORTCUTS[name]
    return shortcut.features(np.asarray(decoded_images(list(paths), shortcut.size, progress=progress)))


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    from hemaclip.metrics.classification import macro_f1

    return macro_f1(y_true, y_pred, list(range(n_classes)))


def fit_shortcut(
    features: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray], n_classes: int, grid: Sequence[float] = C_GRID
) -> dict[str, Any]:
    """Fit on ``features["train"]`` only, choose C on val, predict val and test.

    `labels` needs "train" and "val" (the test labels are never read here). Returns ``predictions``
    (split -> class indices), ``C``, ``val_by_C`` (C -> [val accuracy, val macro F1]), ``n_train`` and
    the fitted ``model`` (a scikit-learn pipeline).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = features["train"], np.asarray(labels["train"])
    y_val = np.asarray(labels["val"])
    fitted, scores = {}, {}
    for c in grid:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER))
        model.fit(X, y)
        val_pred = model.predict(features["val"])
        fitted[c] = model
        scores[c] = [float(np.mean(val_pred == y_val)), _macro_f1(y_val, val_pred, n_classes)]
    best = max(grid, key=lambda c: (scores[c][0], scores[c][1], -c))
    model = fitted[best]
    return {
        "predictions": {split: model.predict(features[split]).astype(np.int64) for split in ("val", "test") if split in features},
        "C": float(best),
        "val_by_C": {f"{c:g}": v for c, v in scores.items()},
        "n_train": int(len(X)),
        "model": model,
    }


def cluster_features(paths: Sequence[Path], progress: bool = False) -> np.ndarray:
    """[N, 21] standardised per feature: the 15 colour statistics plus the 6 background statistics at 32x32."""
    images = np.asarray(decoded_images(list(paths), 32, progress=progress))
    raw = np.concatenate([colour_statistics(images), background_statistics(images)], axis=1)
    return (raw - raw.mean(axis=0)) / np.where(raw.std(axis=0) > 0, raw.std(axis=0), 1.0)


def acquisition_clusters(features: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means cluster of each row (scikit-learn, 10 restarts, seeded): a stand-in for acquisition batches."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features).astype(np.int64)
