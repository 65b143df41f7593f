"""Seeded, stratified, saved splits for datasets that ship none.

A split is made once, written as CSV beside the run (never into the data folder), and read back
on later runs, so every experiment on the same run folder sees the same images in the same split.
"""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hemaclip.errors import DataError
from hemaclip.io import atomic_write

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of each class sent to val and test; the rest is train. A test lab (no train part) has
    val + test == 1."""

    val: float = 0.1
    test: float = 0.2

    def __post_init__(self) -> None:
        if not (0 <= self.val <= 1 and 0 <= self.test <= 1 and self.val + self.test <= 1 + 1e-9):
            raise ValueError(f"split fractions must lie in [0, 1] and sum to at most 1, got val={self.val} test={self.test}")

    @property
    def no_train(self) -> bool:
        return abs(self.val + self.test - 1) < 1e-9


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
        n_val = len(members) - n_test if fractions.no_train else int(round(len(members) * fractions.val))
        for rank, index in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            assignment[members[index]] = split
    return assignment


def grouped_stratified_split(
    keys: Sequence[str], labels: Sequence[str], groups: Sequence[str], fractions: SplitFractions, seed: int
) -> dict[str, str]:
    """Like :func:`stratified_split`, but whole groups (near-duplicate crops of one source cell) go to one
    split together, so no source cell is on both sides.

    A group is stratified under its most common label. Within a label its groups are shuffled
    (seeded) and handed to test, then val, then train until each has its share of the *images*.
    """
    members: dict[str, list[str]] = defaultdict(list)
    group_labels: dict[str, list[str]] = defaultdict(list)
    for key, label, group in zip(keys, labels, groups, strict=True):
        members[group].append(key)
        group_labels[group].append(label)
    by_label: dict[str, list[str]] = defaultdict(list)
    for group, names in group_labels.items():
        counts = Counter(names)
        by_label[min(counts, key=lambda name: (-counts[name], name))].append(group)
    assignment: dict[str, str] = {}
    for label in sorted(by_label):
        label_groups = sorted(by_label[label])
        total = sum(len(members[g]) for g in label_groups)
        rng = np.random.default_rng([seed, len(label_groups), sum(map(ord, label))])
        taken = 0
        for index in rng.permutation(len(label_groups)):
            share = taken / total
            split = "test" if share < fractions.test else "val" if share < fractions.test + fractions.val else "train"
            for key in members[label_groups[index]]:
                assignment[key] = split
            taken += len(members[label_groups[index]])
    return assignment


def save_split(path: Path, assignment: dict[str, str], labels: dict[str, str], groups: dict[str, str] | None = None) -> None:
    """Write the split as CSV (key, label, split[, group]) atomically.

    File names that are not valid UTF-8 (undecodable bytes, held as surrogate escapes) are written
    back as their original bytes, so `load_split` reads the same keys.
    """
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["key", "label", "split", *(["group"] if groups is not None else [])])
    for key in sorted(assignment):
        writer.writerow([key, labels[key], assignment[key], *([groups[key]] if groups is not None else [])])
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


def check_groups_within_splits(assignment: dict[str, str], groups: dict[str, str], source: str) -> None:
    """Raise a `DataError` if any group has members in two splits (a saved split edited by hand, say)."""
    seen: dict[str, str] = {}
    for key, split in assignment.items():
        group = groups[key]
        if seen.setdefault(group, split) != split:
            raise DataError(f"{source}: group {group} lies in both {seen[group]} and {split}; delete the split to make a new one")


def saved_or_new_split(
    split_file: Path | None,
    keys: Sequence[str],
    labels: Sequence[str],
    fractions: SplitFractions,
    seed: int,
    groups: Sequence[str] | None = None,
) -> dict[str, str]:
    """Reuse `split_file` if it exists, else make a stratified split and save it there (if given).

    With `groups`, whole groups stay in one split (:func:`grouped_stratified_split`), checked again
    when a saved split is read back.
    """
    by_key = dict(zip(keys, groups, strict=True)) if groups is not None else None
    if split_file is not None and split_file.exists():
        assignment = load_split(split_file, set(keys))
    elif by_key is not None:
        assignment = grouped_stratified_split(keys, labels, list(groups or []), fractions, seed)
    else:
        assignment = stratified_split(keys, labels, fractions, seed)
    if by_key is not None:
        check_groups_within_splits(assignment, by_key, str(split_file or "split"))
    if split_file is not None and not split_file.exists():
        save_split(split_file, assignment, dict(zip(keys, labels, strict=True)), by_key)
    return assignment
