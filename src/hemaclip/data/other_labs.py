"""Cells from other laboratories: LISC (Tehran) and the two Zheng 2018 sets (Jiangxi Tecom, CellaVision blog).

They exist to measure and improve how hemaclip behaves on other labs' stains, cameras and framings
(`hemaclip evaluate --dataset lisc|zheng1|zheng2`), never to tune on their test parts:

* ``lisc``: 1,287 labelled 224 px crops of 5 white-cell classes (the ``mixed`` folder of multi-cell
  fields has no single label and is left out). Each source cell appears as 4-6 shifted crops, so crops
  are grouped first (:mod:`hemaclip.data.near_duplicates`) and whole groups are split 50/20/30
  (train/val/test, stratified by class): the train groups can serve as a second training lab, val for
  choices, test for scores.
* ``zheng1`` (300 images, 120 px, rapid stain, yellow background) and ``zheng2`` (100 images, 300 px,
  CellaVision blog): a 30/70 val/test split per class; no train part, they are test labs. Each image has
  an expert mask (0 background, 128 cytoplasm, 255 nucleus), read by :func:`load_mask`; masks carry no
  class, so class scores stay valid when masks are used to check cell finding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from hemaclip.data.attributes import WBCATT_CLASSES
from hemaclip.data.datasets import CellDataset, CellRecord, LoadOptions, read_csv_rows, register_dataset
from hemaclip.data.dedupe import deduplicate
from hemaclip.data.near_duplicates import near_duplicate_groups
from hemaclip.data.splits import SplitFractions, saved_or_new_split
from hemaclip.errors import DataError

__all__ = ["LISC_DIR", "MASK_VALUES", "ZHENG_DIR", "load_lisc", "load_mask", "load_zheng1", "load_zheng2"]

LISC_DIR = "lisc"
ZHENG_DIR = "zheng2018"
LISC_FRACTIONS = SplitFractions(val=0.2, test=0.3)
ZHENG_FRACTIONS = SplitFractions(val=0.3, test=0.7)  # no train part: these are test labs
# Mask grey levels of the Zheng 2018 masks and the class index each stands for.
MASK_VALUES: dict[int, int] = {0: 0, 128: 1, 255: 2}  # background (red cells included), cytoplasm, nucleus
ZHENG_SUBSETS: dict[str, tuple[str, str]] = {
    "zheng1": ("dataset1_tecom", "zheng-tecom"),
    "zheng2": ("dataset2_cellavision", "zheng-cellavision"),
}


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found")
    return path


@register_dataset("lisc")
def load_lisc(options: LoadOptions) -> CellDataset:
    """LISC crops of 5 classes, near-duplicate crops grouped, whole groups split 50/20/30."""
    root = _require_dir(options.data_root / LISC_DIR, "LISC (lisc)")
    labels: dict[Path, str] = {}
    for cls in WBCATT_CLASSES:
        folder = _require_dir(root / cls, f"LISC class '{cls}'")
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"):
                labels[path] = cls
    kept, report = deduplicate(labels, labels)
    group_of = dict(zip(kept, (f"lisc-{g:04d}" for g in near_duplicate_groups(kept)), strict=True))
    keys = {p: str(p.relative_to(options.data_root)) for p in kept}
    split_file = options.split_dir / f"lisc_seed{options.seed}.csv" if options.split_dir else None
    assignment = saved_or_new_split(
        split_file, [keys[p] for p in kept], [labels[p] for p in kept], LISC_FRACTIONS, options.seed, [group_of[p] for p in kept]
    )
    records = [
        CellRecord(path=p, label=labels[p], split=assignment[keys[p]], lab="lisc-tehran", group=group_of[p]) for p in kept
    ]
    notes = [
        f"{len(set(group_of.values()))} groups of near-duplicate crops (phase correlation); whole groups split 50/20/30",
        "lisc/mixed (fields with several white cells) has no single label and is left out",
    ]
    return CellDataset(name="lisc", classes=WBCATT_CLASSES, records=records, files_found=len(labels), duplicates=report, notes=notes)


def _load_zheng(options: LoadOptions, name: str) -> CellDataset:
    subset, lab = ZHENG_SUBSETS[name]
    root = _require_dir(options.data_root / ZHENG_DIR, "Zheng 2018 (zheng2018)")
    csv_path = root / "labels.csv"
    rows = [r for r in read_csv_rows(csv_path, ("subset", "image", "mask", "label")) if r["subset"] == subset]
    if not rows:
        raise DataError(f"{csv_path}: no rows for subset {subset}")
    labels: dict[Path, str] = {}
    masks: dict[Path, Path] = {}
    for line, row in enumerate(rows, start=2):
        label = row["label"].lower()
        if label not in WBCATT_CLASSES:
            raise DataError(f"{csv_path}:{line}: unknown label {row['label']!r}")
        path, mask = root / row["image"], root / row["mask"]
        if not path.is_file():
            raise DataError(f"{path}: image listed in {csv_path.name} not found")
        labels[path], masks[path] = label, mask
    kept, report = deduplicate(labels, labels)
    keys = {p: str(p.relative_to(options.data_root)) for p in kept}
    split_file = options.split_dir / f"{name}_seed{options.seed}.csv" if options.split_dir else None
    assignment = saved_or_new_split(split_file, [keys[p] for p in kept], [labels[p] for p in kept], ZHENG_FRACTIONS, options.seed)
    records = [CellRecord(path=p, label=labels[p], split=assignment[keys[p]], lab=lab, mask_path=masks[p]) for p in kept]
    notes = [f"{subset}: a test lab (30/70 val/test per class); class labels partly added by the authors (noisy)"]
    return CellDataset(name=name, classes=WBCATT_CLASSES, records=records, files_found=len(labels), duplicates=report, notes=notes)


@register_dataset("zheng1")
def load_zheng1(options: LoadOptions) -> CellDataset:
    """Zheng 2018 dataset 1 (Jiangxi Tecom, 120 px, rapid stain), with expert masks."""
    return _load_zheng(options, "zheng1")


@register_dataset("zheng2")
def load_zheng2(options: LoadOptions) -> CellDataset:
    """Zheng 2018 dataset 2 (CellaVision blog, 300 px), with expert masks."""
    return _load_zheng(options, "zheng2")


def load_mask(path: str | Path) -> np.ndarray:
    """An expert mask as uint8 [H, W] class indices (0 background, 1 cytoplasm, 2 nucleus).

    Some masks were saved with lossy compression (grey levels such as 2, 3 or 126 appear), so each
    pixel is snapped to the nearest of the three levels.
    """
    path = Path(path)
    try:
        with Image.open(path) as opened:
            grey = np.asarray(opened.convert("L"), dtype=np.int16)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read mask ({exc})") from None
    levels = np.array(sorted(MASK_VALUES), dtype=np.int16)
    nearest = np.abs(grey[..., None] - levels).argmin(axis=-1)
    return np.array([MASK_VALUES[int(v)] for v in levels], dtype=np.uint8)[nearest]
