"""Classification metrics from labels, returned as plain JSON-ready Python values (numpy and scikit-learn only).

**The macro F1 of hemaclip** (one definition, used by training-time validation, `evaluate`,
`compare`, robustness, faithfulness, leukaemia and synthesis): the unweighted mean of the per-class
F1 over the task's label set, which the caller passes explicitly (`labels`), restricted to the
labels that occur in the ground truth. A prediction outside the label set is simply wrong: it lowers
the recall of the true class and is never a class of its own. A label of the set that no image has
is left out of the mean, whether or not it was predicted (predicting it still lowers the recall of
the images' true classes). So the number does not depend on which absent classes a model happens to
predict, and training-time validation and `evaluate` give the same F1 on the same split.

On every split hemaclip reports on (WBCAtt, PBC 8/11-class, ALL; the robustness subset) every class
and attribute value occurs in the truth, where this equals both the "all labels" and the "labels in
truth or predictions" averages used before; see docs/architecture.md.

Labels are either names (any hashable) with ``labels`` the sequence of names, or integer codes with
``labels`` an int n (= ``range(n)``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

__all__ = [
    "MACRO_F1_CONVENTION",
    "accuracy",
    "as_label_array",
    "attribute_table",
    "balanced_accuracy",
    "check_label_pair",
    "class_f1",
    "classes_with_at_least",
    "classification_report_dict",
    "encode_labels",
    "f1_per_class",
    "format_attribute_table",
    "label_list",
    "macro_f1",
    "macro_f1_codes",
    "row_normalize",
    "weighted_f1",
]

MACRO_F1_CONVENTION = (
    "macro F1 = unweighted mean of per-class F1 over the task's label set, restricted to labels that occur "
    "in the ground truth; predictions outside the label set count as errors"
)

LabelSet = Sequence[Any] | int


def label_list(labels: LabelSet) -> list[Any]:
    """The label set as a list: ``range(n)`` for an int, else the given labels (which must be unique)."""
    if isinstance(labels, (int, np.integer)):
        if int(labels) < 1:
            raise ValueError(f"a label set needs at least one label, got n = {labels}")
        return list(range(int(labels)))
    out = list(labels)
    if not out:
        raise ValueError("a label set needs at least one label")
    if len(set(out)) != len(out):
        raise ValueError("labels must be unique")
    return out


def as_label_array(y: ArrayLike, name: str = "labels") -> np.ndarray:
    """Return `y` as a 1-D int64 array; reject floats with fractions, NaN and other shapes early."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    if arr.dtype.kind == "b" or arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer class indices, got non-integer floats")
    return arr.astype(np.int64)


def check_label_pair(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate integer codes: same non-zero length, truth in ``[0, n)``; a prediction outside
    ``[0, n)`` is kept as the code ``n`` (wrong for every image, never a class of its own)."""
    if int(n_classes) < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    t = as_label_array(y_true, "y_true")
    p = as_label_array(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise ValueError("cannot compute metrics on zero items")
    if t.min() < 0 or t.max() >= n_classes:
        raise ValueError(f"y_true has values outside [0, {n_classes}): min {t.min()}, max {t.max()}")
    p = np.where((p < 0) | (p >= n_classes), n_classes, p)
    return t, p


def encode_labels(y_true: Sequence[Any], y_pred: Sequence[Any], labels: LabelSet) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer codes of truth and predictions over `labels` (label order): ``(t, p, n)``.

    A true label outside the set is an error (the caller chose the wrong label set); a predicted
    label outside it gets the code ``n`` (wrong for every image, never a class of its own).
    """
    if isinstance(labels, (int, np.integer)):
        t, p = check_label_pair(y_true, y_pred, int(labels))
        return t, p, int(labels)
    names = label_list(labels)
    index = {label: i for i, label in enumerate(names)}
    truth, pred = list(y_true), list(y_pred)
    if len(truth) != len(pred):
        raise ValueError(f"{len(truth)} true labels but {len(pred)} predictions")
    if not truth:
        raise ValueError("cannot compute metrics on zero items")
    unknown = sorted({str(y) for y in truth if y not in index})
    if unknown:
        raise ValueError(f"true label(s) {', '.join(unknown)} are not in the label set ({', '.join(map(str, names))})")
    n = len(names)
    t = np.array([index[y] for y in truth], dtype=np.int64)
    p = np.array([index.get(y, n) for y in pred], dtype=np.int64)
    return t, p, n


def counts(t: np.ndarray, p: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(support, predicted, true positives) per class of integer codes (code n = outside the set)."""
    support = np.bincount(t, minlength=n)[:n]
    predicted = np.bincount(p, minlength=n + 1)[:n]
    tp = np.bincount(t[t == p], minlength=n)[:n]
    return support, predicted, tp


def f1_per_class(t: np.ndarray, p: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(F1 [n], support [n]) of integer codes; F1 = 2 TP / (true + predicted), 0 where both are 0."""
    support, predicted, tp = counts(t, p, n)
    denom = support + predicted
    f1 = np.zeros(n)
    np.divide(2.0 * tp, denom, out=f1, where=denom > 0)
    return f1, support


def macro_f1_codes(t: np.ndarray, p: np.ndarray, n: int) -> float:
    """:func:`macro_f1` on validated integer codes (the fast path for bootstrap loops)."""
    f1, support = f1_per_class(t, p, n)
    present = support > 0
    return float(f1[present].mean()) if present.any() else float("nan")


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, labels: LabelSet) -> float:
    """hemaclip's macro F1 (see :data:`MACRO_F1_CONVENTION` and the module docstring).

    `labels` is the task's label set: names, or an int n for integer codes ``0 .. n-1``.
    """
    t, p, n = encode_labels(y_true, y_pred, labels)
    return macro_f1_codes(t, p, n)


def class_f1(y_true: ArrayLike, y_pred: ArrayLike, label: Any) -> float:
    """F1 of one class: 2 TP / (true + predicted), 0 when the class is neither true nor predicted."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    tp = float(np.sum((t == label) & (p == label)))
    denom = float(np.sum(t == label) + np.sum(p == label))
    return 2 * tp / denom if denom else 0.0


def classes_with_at_least(y_true: Sequence[Any], labels: Sequence[Any], min_count: int) -> list[Any]:
    """The labels (in `labels` order) with at least `min_count` true items.

    A class with one or two items moves a macro F1 by a whole term on a single call, so small-class
    figures are reported beside a mean over the classes this returns.
    """
    support = Counter(y_true)
    return [label for label in labels if support[label] >= min_count]


def accuracy(t: np.ndarray, p: np.ndarray) -> float:
    """Share of items predicted right."""
    return float(np.mean(np.asarray(t) == np.asarray(p)))


def balanced_accuracy(t: np.ndarray, p: np.ndarray, n: int) -> float:
    """Mean recall over the classes that occur in the truth (scikit-learn's definition)."""
    support, _, tp = counts(t, p, n)
    has = support > 0
    return float(np.mean(tp[has] / support[has]))


def weighted_f1(t: np.ndarray, p: np.ndarray, n: int) -> float:
    """Per-class F1 weighted by support (classes absent from the truth weigh nothing)."""
    f1, support = f1_per_class(t, p, n)
    return float(np.sum(f1 * support) / max(1, support.sum()))


def row_normalize(counts_: np.ndarray) -> np.ndarray:
    """Divide each row by its sum; rows that sum to zero stay all-zero instead of becoming NaN."""
    counts_ = np.asarray(counts_, dtype=np.float64)
    sums = counts_.sum(axis=1, keepdims=True)
    out = np.zeros_like(counts_)
    np.divide(counts_, sums, out=out, where=sums > 0)
    return out


def classification_report_dict(y_true: ArrayLike, y_pred: ArrayLike, labels: Sequence[str]) -> dict[str, Any]:
    """Everything a results table needs for one classification task, as JSON-ready values.

    Keys: ``n``, ``labels``, ``accuracy``, ``balanced_accuracy`` (mean recall over classes that have
    support, as scikit-learn defines it), ``macro_f1``, ``weighted_f1`` (support-weighted),
    ``per_class`` (name -> precision/recall/f1/support), ``confusion_matrix`` (counts, rows = true,
    columns = predicted) and ``confusion_matrix_normalized`` (each row divided by its support; rows
    without support are zeros, not NaN).
    """
    names = [str(x) for x in labels]
    n = len(names)
    if len(set(names)) != n:
        raise ValueError("class names must be unique")
    t, p = check_label_pair(y_true, y_pred, n)
    idx = list(range(n))
    cm = confusion_matrix(t, p, labels=idx)
    precision, recall, f1, support = precision_recall_fscore_support(
        t, p, labels=idx, average=None, zero_division=0
    )
    has_support = support > 0
    return {
        "n": int(t.size),
        "labels": names,
        "accuracy": float(np.mean(t == p)),
        # Own computation: sklearn's balanced_accuracy_score warns when y_pred holds unseen classes.
        "balanced_accuracy": float(np.mean(recall[has_support])),
        "macro_f1": macro_f1_codes(t, p, n),
        "weighted_f1": float(f1_score(t, p, labels=idx, average="weighted", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalized": row_normalize(cm).tolist(),
    }


def _ci_bounds(row: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """Find a confidence interval in a row: ``ci`` as (low, high) or a dict, or ``ci_low``/``ci_high``."""
    ci = row.get("ci")
    if ci is None:
        low, high = row.get("ci_low"), row.get("ci_high")
    elif isinstance(ci, Mapping):
        low, high = ci.get("low"), ci.get("high")
    else:
        low, high = ci
    return (None if low is None else float(low)), (None if high is None else float(high))


def attribute_table(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Normalise per-attribute results into the WBC-CLIP table layout, one row per attribute.

    Each input row needs ``name``, the number of choices (``n_choices``, or ``choices`` as a
    sequence of option names, or ``labels``) and ``macro_f1``, either a number or a
    :func:`hemaclip.metrics.statistics.bootstrap_ci` result (``point``/``low``/``high``). A confidence
    interval may also come as ``ci`` or ``ci_low``/``ci_high``. Input order is kept, so put the
    cell-class row where the table should show it. Output rows: ``name``, ``n_choices``,
    ``macro_f1``, ``ci_low``, ``ci_high`` (None when no interval was given).
    """
    table: list[dict[str, Any]] = []
    for row in rows:
        if "name" not in row or "macro_f1" not in row:
            raise ValueError(f"attribute row needs 'name' and 'macro_f1', got keys {sorted(row)}")
        if "n_choices" in row:
            n_choices = int(row["n_choices"])
        elif "choices" in row:
            n_choices = len(row["choices"])
        elif "labels" in row:
            n_choices = len(row["labels"])
        else:
            raise ValueError(f"attribute row {row['name']!r} needs 'n_choices' (or 'choices'/'labels')")
        score = row["macro_f1"]
        if isinstance(score, Mapping):
            point, low, high = float(score["point"]), score.get("low"), score.get("high")
            low = None if low is None else float(low)
            high = None if high is None else float(high)
        else:
            point = float(score)
            low, high = _ci_bounds(row)
        table.append(
            {"name": str(row["name"]), "n_choices": n_choices, "macro_f1": point, "ci_low": low, "ci_high": high}
        )
    return table


def format_attribute_table(table: Iterable[Mapping[str, Any]], percent: bool = True, digits: int = 1) -> str:
    """Render :func:`attribute_table` rows as a Markdown table (F1 in percent by default)."""
    scale = 100.0 if percent else 1.0
    rows = list(table)
    with_ci = any(r.get("ci_low") is not None for r in rows)
    header = "| Attribute | Choices | Macro F1 |" + (" CI |" if with_ci else "")
    rule = "|---|---:|---:|" + ("---:|" if with_ci else "")
    lines = [header, rule]
    for r in rows:
        line = f"| {r['name']} | {r['n_choices']} | {r['macro_f1'] * scale:.{digits}f} |"
        if with_ci:
            if r.get("ci_low") is None or r.get("ci_high") is None:
                line += " – |"
            else:
                line += f" {r['ci_low'] * scale:.{digits}f}–{r['ci_high'] * scale:.{digits}f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"
