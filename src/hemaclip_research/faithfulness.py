"""Is what `hemaclip describe` says true of the cell? Statement-level checks against WBCAtt annotations.

Three measurements, all on the sentences `describe` actually writes (see
:func:`hemaclip.text.sentences.statements_for_rows`):

* **Statement agreement**: of all attribute statements made, the fraction that match the ground-truth
  annotation, with a percentile bootstrap interval over images (the ratio of sums is resampled, so an
  image with many statements weighs more, as it does for a reader). **Coverage** is statements made
  divided by statements possible (11 per annotated image): a higher threshold trades coverage for
  agreement, so both are always reported together, also as a threshold sweep.
* **Human ceiling**: WBCAtt ships a second, independent annotation of 1,000 images
  (``pbc_attr_reannotations.csv``); the same agreement (coverage 1) and the mean over the 11
  attributes of the macro F1 between the two annotators tell what "good" can mean.
* **Equal coverage**: the model's agreement at 0.7 states ~91 % of attributes while the annotator
  states all of them, so the two are not comparable as such. The model is also scored with every
  attribute stated (its most probable value, coverage 1) on all evaluated images, and on exactly the
  re-annotated images that lie in the evaluated split, beside the second annotator on those same images.
* **Textbook test**: on misclassified cells, does the sentence follow the *predicted* class's textbook
  (the per-class modal value on WBCAtt train) instead of the cell? Reported as two fractions of the
  statements: matching the predicted class's textbook, matching the cell's own annotation; and the
  same on the statements where those two disagree (the informative ones).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hemaclip.data.attributes import ATTRIBUTE_NAMES, ATTRIBUTES, validate_attributes
from hemaclip.errors import DataError
from hemaclip.metrics.classification import macro_f1
from hemaclip.metrics.statistics import bootstrap_ci

__all__ = [
    "DEFAULT_THRESHOLDS",
    "REANNOTATION_CSV",
    "all_statements",
    "annotator_agreement",
    "equal_coverage",
    "reannotation_pairs",
    "statement_agreement",
    "textbook_agreement",
    "textbook_attributes",
    "textbook_test",
    "threshold_sweep",
]

REANNOTATION_CSV = "pbc_attr_reannotations.csv"
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)

Statements = Sequence[Mapping[str, str]]
Truth = Sequence[Mapping[str, str] | None]


def _ratio(agree: np.ndarray, stated: np.ndarray) -> float:
    total = float(np.sum(stated))
    return float(np.sum(agree)) / total if total > 0 else float("nan")


def _counts(statements: Statements, truth: Truth) -> tuple[np.ndarray, np.ndarray, Counter, Counter]:
    if len(statements) != len(truth):
        raise ValueError(f"{len(statements)} statement sets but {len(truth)} annotations")
    agree, stated = [], []
    per_attr_made: Counter = Counter()
    per_attr_agree: Counter = Counter()
    for said, true in zip(statements, truth):
        if true is None:
            continue
        hits = [name for name, value in said.items() if true.get(name) == value]
        agree.append(len(hits))
        stated.append(len(said))
        per_attr_made.update(said.keys())
        per_attr_agree.update(hits)
    return np.asarray(agree, dtype=np.float64), np.asarray(stated, dtype=np.float64), per_attr_made, per_attr_agree


def statement_agreement(statements: Statements, truth: Truth, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Fraction of statements matching the annotation, with a bootstrap interval over images, and coverage.

    `statements[i]` is {attribute: value} said of image i; `truth[i]` its annotation (None = not
    annotated, left out). Returns ``agreement`` (point/low/high; None if nothing was stated), ``n_images``, ``n_statements``,
    ``coverage`` (statements / (11 x images)) and ``per_attribute`` {name: {"n", "agreement"}}.
    """
    agree, stated, made, hits = _counts(statements, truth)
    n_images = int(len(stated))
    n_statements = int(stated.sum())
    if n_statements == 0:
        agreement: dict[str, Any] | None = None  # nothing was said: agreement is undefined, not 0 or 1
    elif n_boot < 1:
        agreement = {"point": _ratio(agree, stated), "low": None, "high": None, "n_resamples": 0}
    else:
        agreement = bootstrap_ci(_ratio, agree, stated, n_resamples=n_boot, seed=seed, stratified=False)
    return {
        "agreement": agreement,
        "n_images": n_images,
        "n_statements": n_statements,
        "coverage": n_statements / (len(ATTRIBUTE_NAMES) * n_images) if n_images else float("nan"),
        "per_attribute": {n: {"n": int(made[n]), "agreement": hits[n] / made[n] if made[n] else None}
                          for n in ATTRIBUTE_NAMES},
    }


def threshold_sweep(
    statements_at: Callable[[float], Statements], truth: Truth, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> list[dict[str, float]]:
    """Agreement and coverage at each threshold; `statements_at(t)` returns the statements at threshold t."""
    rows = []
    for t in thresholds:
        agree, stated, _, _ = _counts(statements_at(float(t)), truth)
        rows.append({"threshold": float(t), "agreement": _ratio(agree, stated),
                     "coverage": float(stated.sum() / (len(ATTRIBUTE_NAMES) * len(stated))) if len(stated) else float("nan"),
                     "n_statements": int(stated.sum())})
    return rows


def textbook_attributes(labels: Sequence[str], attributes: Truth) -> dict[str, dict[str, str]]:
    """Per class, the modal value of each attribute (ties: the value listed first in ATTRIBUTES)."""
    counts: dict[str, dict[str, Counter]] = {}
    for label, attrs in zip(labels, attributes):
        if attrs is None:
            continue
        per = counts.setdefault(label, {n: Counter() for n in ATTRIBUTE_NAMES})
        for n in ATTRIBUTE_NAMES:
            per[n][attrs[n]] += 1
    return {
        label: {n: max(ATTRIBUTES[n], key=lambda v, c=per[n]: (c[v], -ATTRIBUTES[n].index(v))) for n in ATTRIBUTE_NAMES}
        for label, per in sorted(counts.items())
    }


def textbook_test(
    statements: Statements,
    truth: Truth,
    true_labels: Sequence[str],
    predicted_labels: Sequence[str | None],
    textbook: Mapping[str, Mapping[str, str]],
) -> dict[str, Any]:
    """On misclassified, annotated cells whose predicted class has a textbook: how the statements split
    between the predicted class's textbook and the cell's own annotation (all statements, and those
    where textbook and annotation differ)."""
    n_cells = 0
    made = match_book = match_truth = 0
    d_made = d_book = d_truth = 0
    for said, true, label, pred in zip(statements, truth, true_labels, predicted_labels):
        if true is None or pred is None or pred == label or pred not in textbook:
            continue
        n_cells += 1
        book = textbook[pred]
        for name, value in said.items():
            made += 1
            match_book += value == book[name]
            match_truth += value == true[name]
            if book[name] != true[name]:
                d_made += 1
                d_book += value == book[name]
                d_truth += value == true[name]

    def frac(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "n_misclassified": n_cells,
        "n_statements": made,
        "match_predicted_textbook": frac(match_book, made),
        "match_own_annotation": frac(match_truth, made),
        "n_discriminating_statements": d_made,
        "discriminating_match_predicted_textbook": frac(d_book, d_made),
        "discriminating_match_own_annotation": frac(d_truth, d_made),
    }


def textbook_agreement(
    statements: Statements, predicted_labels: Sequence[str | None], textbook: Mapping[str, Mapping[str, str]]
) -> dict[str, Any]:
    """Of the statements made about cells whose predicted class has a textbook (annotated or not), the
    fraction that match the predicted class's textbook values: how much of what is said could have been
    said without looking at the cell."""
    made = match = cells = 0
    for said, pred in zip(statements, predicted_labels):
        if pred is None or pred not in textbook:
            continue
        cells += 1
        made += len(said)
        match += sum(value == textbook[pred][name] for name, value in said.items())
    return {"n_cells": cells, "n_statements": made, "match_predicted_textbook": match / made if made else None}


def all_statements(attribute_probs: Mapping[str, np.ndarray], attribute_values: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """Every attribute stated as its most probable value (coverage 1): the model at the annotators' coverage."""
    names = [n for n in ATTRIBUTE_NAMES if n in attribute_probs]
    if not names:
        return []
    best = {n: np.argmax(attribute_probs[n], axis=1) for n in names}
    count = len(best[names[0]])
    return [{n: attribute_values[n][int(best[n][i])] for n in names} for i in range(count)]


def reannotation_pairs(data_root: str | Path | None = None) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]], int, Path]:
    """WBCAtt's published labels and second annotation of the same images, keyed by image name.

    Returns (published, second, re-annotated images not in any split, path of the re-annotation CSV).
    Raises DataError if the files are missing or no re-annotated image is in the splits.
    """
    from hemaclip.data.datasets import WBCATT_CSV, WBCATT_DIR, read_csv_rows
    from hemaclip.data.paths import resolve_data_root
    from hemaclip.data.splits import SPLIT_NAMES

    folder = resolve_data_root(data_root) / WBCATT_DIR
    required = ("img_name", *ATTRIBUTE_NAMES)
    published_all: dict[str, dict[str, str]] = {}
    for split in SPLIT_NAMES:
        path = folder / WBCATT_CSV.format(split=split)
        for line, row in enumerate(read_csv_rows(path, required), start=2):
            published_all[row["img_name"]] = validate_attributes(row, f"{path}:{line}")
    path = folder / REANNOTATION_CSV
    published: dict[str, dict[str, str]] = {}
    second: dict[str, dict[str, str]] = {}
    missing = 0
    for line, row in enumerate(read_csv_rows(path, required), start=2):
        if row["img_name"] not in published_all:
            missing += 1
            continue
        second[row["img_name"]] = validate_attributes(row, f"{path}:{line}")
        published[row["img_name"]] = published_all[row["img_name"]]
    if not second:
        raise DataError(f"{path}: no re-annotated image is in the published WBCAtt splits")
    return published, second, missing, path


def annotator_agreement(data_root: str | Path | None = None, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The human ceiling: WBCAtt's second annotation of 1,000 images against the published one.

    Statement agreement counts all 11 statements per image (coverage 1), with a bootstrap interval
    over images; ``mean_macro_f1`` averages over attributes the macro F1 of annotator 2 against the
    published labels (hemaclip's macro F1, the published labels as truth). Raises DataError if the files are missing.
    """
    from hemaclip.data.datasets import WBCATT_DIR

    published, second_by_name, missing, _path = reannotation_pairs(data_root)
    names = list(second_by_name)  # CSV order, as this ceiling has always been computed
    first = [published[n] for n in names]
    second = [second_by_name[n] for n in names]
    result = statement_agreement(second, first, n_boot=n_boot, seed=seed)
    # Values averaged in sorted order, as this ceiling has always been computed (same number to the last bit).
    per_f1 = {n: macro_f1([f[n] for f in first], [s[n] for s in second], sorted(ATTRIBUTES[n])) for n in ATTRIBUTE_NAMES}
    return {
        "source": f"{WBCATT_DIR}/{REANNOTATION_CSV} (under the data root)",
        "n_images": len(second),
        "n_not_in_splits": missing,
        "statement_agreement": result["agreement"],
        "coverage": result["coverage"],
        "per_attribute_agreement": {n: v["agreement"] for n, v in result["per_attribute"].items()},
        "per_attribute_macro_f1": per_f1,
        "mean_macro_f1": float(np.mean(list(per_f1.values()))),
    }


def equal_coverage(
    model: Mapping[str, Mapping[str, str]],
    published: Mapping[str, Mapping[str, str]],
    second: Mapping[str, Mapping[str, str]],
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The model and the second annotator against the published labels on the same images and attributes.

    `model` is {image name: statements} for the evaluated images (every attribute stated, see
    :func:`all_statements`); `published` / `second` the two annotations of the re-annotated images
    (:func:`reannotation_pairs`). Only images in both `model` and `second` count, and only the
    attributes both stated; both sides use the same bootstrap seed, so resamples pick the same images.
    Returns ``images`` (sorted names), ``n_images``, ``n_statements`` and per side (``model``,
    ``annotators``) ``agreement`` and ``coverage``. Raises DataError when no image is shared.
    """
    images = sorted(set(model) & set(second))
    if not images:
        raise DataError("no re-annotated WBCAtt image is among the evaluated images: no equal-coverage comparison")
    truth = [published[n] for n in images]
    said_model, said_human = [], []
    for n in images:
        shared = sorted(set(model[n]) & set(second[n]))
        said_model.append({a: model[n][a] for a in shared})
        said_human.append({a: second[n][a] for a in shared})
    m = statement_agreement(said_model, truth, n_boot=n_boot, seed=seed)
    h = statement_agreement(said_human, truth, n_boot=n_boot, seed=seed)
    return {
        "images": images,
        "n_images": len(images),
        "n_statements": m["n_statements"],
        "model": {"agreement": m["agreement"], "coverage": m["coverage"]},
        "annotators": {"agreement": h["agreement"], "coverage": h["coverage"]},
    }
