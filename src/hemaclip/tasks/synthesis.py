"""Class-balanced samples of a trained GAN (`hemaclip synth sample`); training is `hemaclip.train.gan`."""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hemaclip.errors import HemaclipError
from hemaclip.io import atomic_write
from hemaclip.models.gan import Generator, generate
from hemaclip.train.gan import write_png

__all__ = ["sample_counts", "sample_images", "write_sample_folder"]


def sample_counts(classes: Sequence[str], per_class: int, only: Sequence[str] | None = None) -> dict[str, int]:
    """{class: per_class} for the asked classes (all by default); unknown names are an error."""
    if per_class < 0:
        raise HemaclipError(f"--per-class must be >= 0, got {per_class}")
    chosen = list(only) if only else list(classes)
    unknown = [c for c in chosen if c not in classes]
    if unknown:
        raise HemaclipError(f"class(es) {', '.join(unknown)} not in this GAN (classes: {', '.join(classes)})")
    return {c: per_class for c in dict.fromkeys(chosen)}


def sample_images(generator: Generator, classes: Sequence[str], counts: Mapping[str, int], seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Exactly counts[c] images of each class c: (uint8 [N, S, S, 3], labels)."""
    index = {c: i for i, c in enumerate(classes)}
    labels = [c for c, n in counts.items() for _ in range(int(n))]
    images = generate(generator, [index[c] for c in labels], seed=seed).numpy()
    return images, labels


def write_sample_folder(out: Path, images: np.ndarray, labels: Sequence[str], progress: bool = True) -> Path:
    """PNGs as ``OUT/<class>/<class>_00000.png`` plus ``OUT/index.csv`` (path relative to OUT, label)."""
    out = Path(out)
    rows = []
    counters: dict[str, int] = {}
    show = progress and sys.stderr.isatty()
    for image, label in tqdm(list(zip(images, labels)), desc="writing samples", unit="img", disable=not show):
        k = counters.get(label, 0)
        counters[label] = k + 1
        rel = f"{label}/{label}_{k:05d}.png"
        write_png(out / rel, image)
        rows.append((rel, label))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label"])
    writer.writerows(rows)
    with atomic_write(out / "index.csv") as handle:
        handle.write(buffer.getvalue())
    return out / "index.csv"
