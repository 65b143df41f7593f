"""One classification task summarised with 95 % bootstrap intervals: accuracy, balanced accuracy,
macro and weighted F1, per-class numbers and confusion matrices (labels as names)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hemaclip.errors import DataError
from hemaclip.metrics.classification import (
    accuracy,
    balanced_accuracy,
    classification_report_dict,
    encode_labels,
    macro_f1_codes,
    row_normalize,
    weighted_f1,
)
from hemaclip.metrics.statistics import bootstrap_ci, bootstrap_macro_f1

__all__ = ["CLASS_CIS", "classification_metrics", "fold_scores", "point_only", "stratified_chunks"]

CLASS_CIS = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1")


def point_only(value: float) -> dict[str, Any]:
    """A metric without an interval, in the shape :func:`bootstrap_ci` returns."""
    return {"point": float(value), "low": None, "high": None, "n_resamples": 0}


def _metric_ci(name: str, t: np.ndarray, p: np.ndarray, n: int, n_boot: int, seed: int) -> dict[str, Any]:
    fns: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "accuracy": accuracy,
        "balanced_accuracy": lambda a, b: balanced_accuracy(a, b, n),
        "weighted_f1": lambda a, b: weighted_f1(a, b, n),
        "macro_f1": lambda a, b: macro_f1_codes(a, b, n),
    }
    if n_boot < 1:
        return point_only(fns[name](t, p))
    if name == "macro_f1":
        return bootstrap_macro_f1(t, p, n, n_resamples=n_boot, seed=seed)
    return bootstrap_ci(fns[name], t, p, n_resamples=n_boot, seed=seed)


def classification_metrics(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    labels: Sequence[str],
    n_boot: int = 2000,
    seed: int = 0,
    cis: Sequence[str] = CLASS_CIS,
) -> dict[str, Any]:
    """Metrics of one classification task on label names, with bootstrap intervals for `cis`.

    `labels` is the task's label set (a true label outside it is an error; a prediction outside it
    is wrong). ``accuracy``, ``balanced_accuracy``, ``macro_f1`` and ``weighted_f1`` are dicts
    (``point``, ``low``, ``high``, ... as :func:`hemaclip.metrics.statistics.bootstrap_ci` returns;
    ``low``/``high`` are None for metrics not in `cis` or with ``n_boot=0``). Macro F1 follows
    :data:`hemaclip.metrics.classification.MACRO_F1_CONVENTION`: ``labels_evaluated`` lists the
    labels it averages (those of `labels` in the truth). ``per_class`` covers every label that occurs
    in the truth or the predictions; the confusion matrices cover all `labels` (plus any predicted
    label outside them).
    """
    y_true, y_pred = [str(y) for y in y_true], [str(y) for y in y_pred]
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not y_true:
        raise DataError("no images to compute metrics on")
    labels = [str(c) for c in labels]
    t, p, n = encode_labels(y_true, y_pred, labels)
    truth = set(y_true)
    present = truth | set(y_pred)
    shown = [c for c in labels if c in present] + sorted(present - set(labels))
    shown_index = {c: i for i, c in enumerate(shown)}
    report = classification_report_dict([shown_index[y] for y in y_true], [shown_index[y] for y in y_pred], shown)
    out: dict[str, Any] = {"n": report["n"], "labels": list(labels), "labels_evaluated": [c for c in labels if c in truth]}
    for name in CLASS_CIS:
        if name in cis:
            out[name] = _metric_ci(name, t, p, n, n_boot, seed)
        else:
            out[name] = point_only(report[name])
    out["per_class"] = report["per_class"]
    full = list(labels) + [c for c in shown if c not in set(labels)]
    index = {c: i for i, c in enumerate(full)}
    cm = np.zeros((len(full), len(full)), dtype=np.int64)
    np.add.at(cm, (np.array([index[y] for y in y_true]), np.array([index[y] for y in y_pred])), 1)
    out["confusion_labels"] = full
    out["confusion_matrix"] = cm.tolist()
    out["confusion_matrix_normalized"] = row_normalize(cm).tolist()
    return out


def stratified_chunks(y_true: Sequence[str], n_folds: int = 5) -> np.ndarray:
    """Fold index of each row: the rows of each class, in the given order, cut into `n_folds` contiguous
    chunks whose sizes differ by at most one (earlier folds take the remainder). This is how the
    cytomorphology LVLM audit reports mean ± sd over 5 folds of its 50-per-class samples."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    y = [str(v) for v in y_true]
    folds = np.zeros(len(y), dtype=np.int64)
    for label in dict.fromkeys(y):
        rows = [i for i, v in enumerate(y) if v == label]
        size, remainder = divmod(len(rows), n_folds)
        start = 0
        for k in range(n_folds):
            end = start + size + (1 if k < remainder else 0)
            folds[rows[start:end]] = k
            start = end
    return folds


def fold_scores(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str], n_folds: int = 5) -> dict[str, Any]:
    """Weighted and macro F1 on each of `n_folds` stratified chunks (:func:`stratified_chunks`), with their
    mean and sample standard deviation (ddof 1) across folds."""
    y_true, y_pred = [str(v) for v in y_true], [str(v) for v in y_pred]
    folds = stratified_chunks(y_true, n_folds)
    per: dict[str, list[float]] = {"weighted_f1": [], "macro_f1": []}
    for k in range(n_folds):
        rows = np.flatnonzero(folds == k)
        if not len(rows):
            continue
        t, p, n = encode_labels([y_true[i] for i in rows], [y_pred[i] for i in rows], labels)
        per["weighted_f1"].append(weighted_f1(t, p, n))
        per["macro_f1"].append(macro_f1_codes(t, p, n))
    out: dict[str, Any] = {"n_folds": len(per["macro_f1"])}
    for name, values in per.items():
        arr = np.asarray(values, dtype=np.float64)
        out[name] = {"mean": float(arr.mean()) if len(arr) else float("nan"),
                     "sd": float(arr.std(ddof=1)) if len(arr) > 1 else float("nan"), "folds": arr.tolist()}
    return out
