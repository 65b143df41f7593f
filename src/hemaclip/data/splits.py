"""Seeded, stratified, saved splits for datasets that ship none.

A split is made once, written as CSV beside the run (never into the data folder), and read back
on later runs, so every experiment on the same run folder sees the same images in the same split.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hemaclip.errors import DataError
from hemaclip.io import atomic_write

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of each class sent to val and test; the rest is train."""

    val: float = 0.1
    test: float = 0.2

    def __post_init__(self) -> None:
        if not (0 <= self.val < 1 and 0 <= self.test < 1 and self.val + self.test < 1):
            raise ValueError(f"split fractions must leave a non-empty train part, got val={self.val} test={self.test}")


def stratified_split(keys: Sequence[str], labels: Sequence[str], fractions: SplitFractions, seed: int) -> dict[str, str]:
    """Assign each key to train/val/test, class by class, deterministically for a given seed.

    Keys are sorted within each class before shuffling, so the result does not depend on the
    order in which files were listed.
    """
    by_label: dict[str, list[str]] = defaultdict(list)
    for key, label in zip(keys, labels, strict=True):
        by_label[label].append(key)
    assignment: dict[str, str] = {}
    for label in sorted(by_label):
        members = sorted(by_label[label])
        rng = np.random.default_rng([seed, len(members), sum(map(ord, label))])
        order = rng.permutation(len(members))
        n_test = int(round(len(members) * fractions.test))
        n_val = int(round(len(members) * fractions.val))
        for rank, index in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            assignment[members[index]] = split
    return assignment


def grouped_split(keys: Sequence[str], labels: Sequence[str], groups: Sequence[str], fractions: SplitFractions, seed: int) -> dict[str, str]:
    """Assign whole groups to train/val/test, keeping each split's class mix close to the stratified one.

    No group ever spans two splits; stratification is then only approximate (a group brings all its
    images, of whatever classes). Groups are placed largest first (ties broken by a seeded shuffle), each
    into the split where it fills the most of the per-class shortfall against the targets
    (fraction x class size) net of what it overfills.
    """
    keys, labels, groups = list(keys), list(labels), list(groups)
    if not len(keys) == len(labels) == len(groups):
        raise ValueError(f"keys, labels and groups must have the same length, got {len(keys)}, {len(labels)}, {len(groups)}")
    classes = sorted(set(labels))
    column = {c: i for i, c in enumerate(classes)}
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    names = sorted(members)
    counts = np.zeros((len(names), len(classes)))
    for row, group in enumerate(names):
        for index in members[group]:
            counts[row, column[labels[index]]] += 1
    shares = {"train": 1.0 - fractions.val - fractions.test, "val": fractions.val, "test": fractions.test}
    totals = counts.sum(axis=0)
    target = {split: share * totals for split, share in shares.items()}
    filled = {split: np.zeros(len(classes)) for split in SPLIT_NAMES}
    tiebreak = np.random.default_rng([seed, len(names)]).permutation(len(names))
    assignment: dict[str, str] = {}
    for row in sorted(range(len(names)), key=lambda r: (-counts[r].sum(), tiebreak[r])):
        def gain(split: str) -> float:
            shortfall = np.clip(target[split] - filled[split], 0, None)
            fill = np.minimum(counts[row], shortfall).sum()
            return float(fill - np.clip(counts[row] - shortfall, 0, None).sum())

        best = max(SPLIT_NAMES, key=lambda split: (gain(split), shares[split]))
        filled[best] += counts[row]
        for index in members[names[row]]:
            assignment[keys[index]] = best
    return assignment


def save_split(path: Path, assignment: dict[str, str], labels: dict[str, str]) -> None:
    """Write the split as CSV (key, label, split) atomically.

    File names that are not valid UTF-8 (undecodable bytes, held as surrogate escapes) are written
    back as their original bytes, so `load_split` reads the same keys.
    """
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["key", "label", "split"])
    for key in sorted(assignment):
        writer.writerow([key, labels[key], assignment[key]])
    with atomic_write(path, "wb") as handle:
        handle.write(text.getvalue().encode("utf-8", errors="surrogateescape"))


def load_split(path: Path, expected_keys: set[str]) -> dict[str, str]:
    """Read a saved split, refusing one that no longer matches the files on disk."""
    try:
        with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise DataError(f"{path}: cannot read saved split ({exc.strerror})") from None
    if rows and not {"key", "split"} <= set(rows[0]):
        raise DataError(f"{path}: saved split lacks the columns 'key' and 'split'")
    assignment = {row["key"]: row["split"] for row in rows}
    bad = {split for split in assignment.values() if split not in SPLIT_NAMES}
    if bad:
        raise DataError(f"{path}: unknown split name(s) {sorted(bad)}; expected {', '.join(SPLIT_NAMES)}")
    if set(assignment) != expected_keys:
        missing = len(expected_keys - set(assignment))
        extra = len(set(assignment) - expected_keys)
        raise DataError(
            f"{path}: saved split does not match the data ({missing} files not in it, {extra} listed but absent); "
            "delete it to make a new split"
        )
    return assignment


def saved_or_new_split(
    split_file: Path | None, keys: Sequence[str], labels: Sequence[str], fractions: SplitFractions, seed: int
) -> dict[str, str]:
    """Reuse `split_file` if it exists, else make a stratified split and save it there (if given)."""
    if split_file is not None and split_file.exists():
        return load_split(split_file, set(keys))
    assignment = stratified_split(keys, labels, fractions, seed)
    if split_file is not None:
        save_split(split_file, assignment, dict(zip(keys, labels, strict=True)))
    return assignment
