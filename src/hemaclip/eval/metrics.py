"""Classification metrics from integer labels, returned as plain JSON-ready Python values.

Labels are integers ``0 .. n_classes-1`` indexing a list of class names. Every average is taken
over *all* ``n_classes`` classes (scikit-learn's ``labels=range(n)``), so results do not silently
change when a class happens to be absent from a split; a class with neither true nor predicted
items scores F1 = 0 (``zero_division=0``) and therefore lowers the macro average. Pass only the
label set you mean to evaluate.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

__all__ = [
    "as_label_array",
    "attribute_table",
    "check_label_pair",
    "classification_report_dict",
    "format_attribute_table",
    "macro_f1",
    "row_normalize",
]


def as_label_array(y: Any, name: str = "labels") -> np.ndarray:
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


def check_label_pair(y_true: Any, y_pred: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (truth, prediction) pair: same non-zero length, every value in ``[0, n_classes)``."""
    if int(n_classes) < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    t = as_label_array(y_true, "y_true")
    p = as_label_array(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise ValueError("cannot compute metrics on zero items")
    for name, arr in (("y_true", t), ("y_pred", p)):
        if arr.min() < 0 or arr.max() >= n_classes:
            raise ValueError(f"{name} has values outside [0, {n_classes}): min {arr.min()}, max {arr.max()}")
    return t, p


def row_normalize(counts: np.ndarray) -> np.ndarray:
    """Divide each row by its sum; rows that sum to zero stay all-zero instead of becoming NaN."""
    counts = np.asarray(counts, dtype=np.float64)
    sums = counts.sum(axis=1, keepdims=True)
    out = np.zeros_like(counts)
    np.divide(counts, sums, out=out, where=sums > 0)
    return out


def macro_f1(y_true: Any, y_pred: Any, n_classes: int) -> float:
    """Unweighted mean F1 over all `n_classes` classes (absent classes count as 0, see module doc)."""
    t, p = check_label_pair(y_true, y_pred, n_classes)
    return float(f1_score(t, p, labels=list(range(n_classes)), average="macro", zero_division=0))


def classification_report_dict(y_true: Any, y_pred: Any, labels: Sequence[str]) -> dict[str, Any]:
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
        "macro_f1": float(f1_score(t, p, labels=idx, average="macro", zero_division=0)),
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
    :func:`hemaclip.eval.statistics.bootstrap_ci` result (``point``/``low``/``high``). A confidence
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
