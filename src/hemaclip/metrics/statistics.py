"""Bootstrap confidence intervals and paired bootstrap tests for classification metrics.

Why a bootstrap: test sets for rare blood-cell classes are small, so a macro F1 difference of a
point or two can be noise. Every interval here is a *percentile* bootstrap interval; resampling is
by item (rows of ``y_true``/``y_pred`` together) and, by default, *stratified* by the true class:
each resample draws ``n_c`` items with replacement from the ``n_c`` items of class ``c``, so class
counts (and therefore the macro average's denominator structure) are fixed as in the test set.

Randomness comes only from ``numpy.random.default_rng(seed)``, so a seed gives identical results,
and :func:`bootstrap_macro_f1` draws exactly the same resamples as
``bootstrap_ci(macro_f1-like fn, ...)`` with the same arguments (only faster).

Resamples are drawn in blocks of about two million indices to keep memory flat for large sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from hemaclip.metrics.classification import LabelSet, encode_labels, macro_f1_codes

__all__ = [
    "bootstrap_ci",
    "cluster_bootstrap_accuracy",
    "cluster_bootstrap_macro_f1",
    "paired_cluster_bootstrap_macro_f1",
    "bootstrap_macro_f1",
    "paired_bootstrap_macro_f1",
    "paired_bootstrap_test",
    "resample_indices",
    "unpaired_bootstrap_difference",
    "share_intervals",
]

MetricFn = Callable[[np.ndarray, np.ndarray], float]
BlockStat = Callable[[np.ndarray], np.ndarray]

_BLOCK_ELEMENTS = 2_000_000


def _check_common(n_resamples: int, confidence: float) -> None:
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _as_1d(x: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def resample_indices(
    y_true: ArrayLike, n_resamples: int, seed: int | None = 0, stratified: bool = True
) -> Iterator[np.ndarray]:
    """Yield blocks of bootstrap index arrays, shape ``[block, N]``, ``n_resamples`` rows in total.

    With ``stratified=True`` every row holds, for each distinct value ``c`` of `y_true`, exactly as
    many indices of items with ``y_true == c`` as the data has (drawn with replacement within the
    class); `y_true` must then be categorical. The column order groups items by class, which does
    not matter for metrics that are functions of the multiset of (true, predicted) pairs.
    """
    y = _as_1d(y_true, "y_true")
    n = y.size
    if n == 0:
        raise ValueError("cannot bootstrap zero items")
    rng = np.random.default_rng(seed)
    block = max(1, min(int(n_resamples), _BLOCK_ELEMENTS // n))
    strata = [np.flatnonzero(y == c) for c in np.unique(y)] if stratified else None
    done = 0
    while done < n_resamples:
        b = min(block, int(n_resamples) - done)
        if strata is None:
            yield rng.integers(0, n, size=(b, n))
        else:
            yield np.concatenate([idx[rng.integers(0, idx.size, size=(b, idx.size))] for idx in strata], axis=1)
        done += b


def _distribution(
    y_true: np.ndarray, n_resamples: int, seed: int | None, stratified: bool, stat: BlockStat
) -> np.ndarray:
    parts = [np.asarray(stat(idx), dtype=np.float64) for idx in resample_indices(y_true, n_resamples, seed, stratified)]
    return np.concatenate(parts)


def _percentile_interval(dist: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(dist, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def _ci_result(point: float, dist: np.ndarray, confidence: float, stratified: bool) -> dict[str, Any]:
    low, high = _percentile_interval(dist, confidence)
    return {
        "point": float(point),
        "low": low,
        "high": high,
        "n_resamples": int(dist.size),
        "confidence": float(confidence),
        "se": float(np.std(dist, ddof=1)) if dist.size > 1 and np.ptp(dist) > 0 else 0.0,
        "stratified": bool(stratified),
        "method": "percentile",
    }


def _per_row(metric_fn: MetricFn, *arrays: np.ndarray) -> BlockStat:
    """Turn a metric on (y_true, y_pred) into a block statistic by calling it once per resample."""

    def stat(idx: np.ndarray) -> np.ndarray:
        return np.array([metric_fn(*(a[row] for a in arrays)) for row in idx], dtype=np.float64)

    return stat


def bootstrap_ci(
    metric_fn: MetricFn,
    y_true: ArrayLike,
    y_pred: ArrayLike,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int | None = 0,
    stratified: bool = True,
) -> dict[str, Any]:
    """Percentile bootstrap interval of ``metric_fn(y_true, y_pred)``.

    `metric_fn` is called once on the full data (``point``) and once per resample with numpy
    arrays. Returns ``point``, ``low``, ``high``, ``n_resamples`` plus ``confidence``, ``se``
    (bootstrap standard deviation), ``stratified`` and ``method``. For macro F1 prefer
    :func:`bootstrap_macro_f1`, which gives the same numbers without 2,000 Python calls.
    """
    _check_common(n_resamples, confidence)
    t = _as_1d(y_true, "y_true")
    p = np.asarray(y_pred)
    if p.shape[:1] != t.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.shape[:1]}")
    point = float(metric_fn(t, p))
    dist = _distribution(t, n_resamples, seed, stratified, _per_row(metric_fn, t, p))
    return _ci_result(point, dist, confidence, stratified)


def _macro_f1_stat(t: np.ndarray, preds: list[np.ndarray], n_classes: int) -> Callable[[np.ndarray], list[np.ndarray]]:
    """Vectorised macro F1 per resample: per-class counts via one ``bincount`` over all rows.

    F1_c = 2 TP_c / (true_c + pred_c), averaged over the classes present in the resample's truth
    (hemaclip's convention, :data:`hemaclip.metrics.classification.MACRO_F1_CONVENTION`); a
    prediction coded ``n_classes`` (outside the label set) is wrong and belongs to no class.
    """
    width = n_classes + 1  # one spare column per row for predictions outside the label set

    def stat(idx: np.ndarray) -> list[np.ndarray]:
        b = idx.shape[0]
        size = b * width
        offset = (np.arange(b, dtype=np.int64) * width)[:, None]
        tt = t[idx] + offset
        true_c = np.bincount(tt.ravel(), minlength=size).reshape(b, width)[:, :n_classes]
        present = true_c > 0
        out = []
        for p in preds:
            pp = p[idx] + offset
            pred_c = np.bincount(pp.ravel(), minlength=size).reshape(b, width)[:, :n_classes]
            tp = np.bincount(tt[tt == pp], minlength=size).reshape(b, width)[:, :n_classes]
            denom = true_c + pred_c
            f1 = np.zeros((b, n_classes), dtype=np.float64)
            np.divide(2.0 * tp, denom, out=f1, where=denom > 0)
            if present.all():
                out.append(f1.mean(axis=1))
            else:
                out.append(np.where(present, f1, 0.0).sum(axis=1) / present.sum(axis=1))
        return out

    return stat


def bootstrap_macro_f1(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    labels: LabelSet,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int | None = 0,
    stratified: bool = True,
) -> dict[str, Any]:
    """Fast path of ``bootstrap_ci(macro_f1, ...)`` (same resamples, same result).

    `labels` is the task's label set (names, or an int n for codes ``0 .. n-1``); macro F1 is
    :func:`hemaclip.metrics.classification.macro_f1`, computed on each resample.
    """
    _check_common(n_resamples, confidence)
    t, p, n = encode_labels(y_true, y_pred, labels)
    stat = _macro_f1_stat(t, [p], n)
    dist = _distribution(t, n_resamples, seed, stratified, lambda idx: stat(idx)[0])
    return _ci_result(macro_f1_codes(t, p, n), dist, confidence, stratified)


def _paired_result(
    metric_a: float, metric_b: float, diffs: np.ndarray, confidence: float, stratified: bool
) -> dict[str, Any]:
    observed = metric_a - metric_b
    low, high = _percentile_interval(diffs, confidence)
    # Centred ("shift") method: diffs - observed approximates the null distribution of the
    # difference; p = share of resamples at least as extreme as observed, with the +1 correction
    # (Davison & Hinkley 1997) so p is never exactly 0.
    extreme = np.abs(diffs - observed) >= np.abs(observed)
    p_value = (1.0 + float(np.sum(extreme))) / (diffs.size + 1.0)
    return {
        "difference": float(observed),
        "low": low,
        "high": high,
        "p_value": float(min(1.0, p_value)),
        "metric_a": float(metric_a),
        "metric_b": float(metric_b),
        "n_resamples": int(diffs.size),
        "confidence": float(confidence),
        "stratified": bool(stratified),
        "method": "paired percentile bootstrap; two-sided p, centred",
    }


def paired_bootstrap_test(
    metric_fn: MetricFn,
    y_true: ArrayLike,
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    n_resamples: int = 2000,
    seed: int | None = 0,
    confidence: float = 0.95,
    stratified: bool = True,
) -> dict[str, Any]:
    """Is system A's metric different from system B's on the same items? Paired bootstrap test.

    Both systems are scored on the *same* resampled items, so item difficulty cancels out.
    ``difference`` = metric(A) - metric(B) on the full data; ``low``/``high`` = percentile interval
    of the resampled differences. ``p_value`` is two-sided, by the centred method: with ``d`` the
    observed difference and ``d*_b`` the resampled ones,
    ``p = (1 + #{b : |d*_b - d| >= |d|}) / (n_resamples + 1)``. Identical predictions give p = 1.
    """
    _check_common(n_resamples, confidence)
    t = _as_1d(y_true, "y_true")
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    if a.shape[:1] != t.shape or b.shape[:1] != t.shape:
        raise ValueError("y_true, pred_a and pred_b must have the same length")

    def stat(idx: np.ndarray) -> np.ndarray:
        return np.array([metric_fn(t[r], a[r]) - metric_fn(t[r], b[r]) for r in idx], dtype=np.float64)

    diffs = _distribution(t, n_resamples, seed, stratified, stat)
    return _paired_result(float(metric_fn(t, a)), float(metric_fn(t, b)), diffs, confidence, stratified)


def paired_bootstrap_macro_f1(
    y_true: ArrayLike,
    pred_a: ArrayLike,
    pred_b: ArrayLike,
    labels: LabelSet,
    n_resamples: int = 2000,
    seed: int | None = 0,
    confidence: float = 0.95,
    stratified: bool = True,
) -> dict[str, Any]:
    """Fast path of ``paired_bootstrap_test(macro_f1, ...)`` (same result); `labels` as in
    :func:`bootstrap_macro_f1`."""
    _check_common(n_resamples, confidence)
    t, a, n_classes = encode_labels(y_true, pred_a, labels)
    _, b, _ = encode_labels(y_true, pred_b, labels)
    stat = _macro_f1_stat(t, [a, b], n_classes)

    def diff(idx: np.ndarray) -> np.ndarray:
        fa, fb = stat(idx)
        return fa - fb

    diffs = _distribution(t, n_resamples, seed, stratified, diff)
    return _paired_result(macro_f1_codes(t, a, n_classes), macro_f1_codes(t, b, n_classes), diffs, confidence, stratified)


# ------------------------------------------------------------------------------------------------
# Cluster bootstrap: items that are not independent (near-duplicate crops of one source cell) are
# resampled together. Each resample draws whole groups with replacement (stratified by the group's
# majority class) and scores every item with the number of times its group was drawn as its weight.
# ------------------------------------------------------------------------------------------------


def _group_weights(t: np.ndarray, groups: ArrayLike, n_resamples: int, seed: int | None) -> np.ndarray:
    """[n_resamples, N] item weights of a stratified cluster bootstrap over `groups`."""
    g = _as_1d(groups, "groups")
    if g.size != t.size:
        raise ValueError(f"groups and y_true differ in length: {g.size} vs {t.size}")
    names, inverse = np.unique(g, return_inverse=True)
    label_of = np.array([np.bincount(t[inverse == k]).argmax() for k in range(names.size)])
    rng = np.random.default_rng(seed)
    counts = np.zeros((int(n_resamples), names.size))
    for label in np.unique(label_of):
        members = np.flatnonzero(label_of == label)
        draws = rng.integers(0, members.size, size=(int(n_resamples), members.size))
        np.add.at(counts, (np.repeat(np.arange(int(n_resamples)), members.size), members[draws].ravel()), 1.0)
    return counts[:, inverse]


def _weighted_macro_f1(t: np.ndarray, p: np.ndarray, n_classes: int, weights: np.ndarray) -> np.ndarray:
    """Macro F1 (hemaclip's convention) of each weight row [B, N]."""
    onehot_t = np.eye(n_classes + 1)[t][:, :n_classes]
    onehot_p = np.eye(n_classes + 1)[p][:, :n_classes]
    true_c = weights @ onehot_t
    pred_c = weights @ onehot_p
    tp = weights @ (onehot_t * onehot_p)
    denom = true_c + pred_c
    f1 = np.divide(2.0 * tp, denom, out=np.zeros_like(denom), where=denom > 0)
    present = true_c > 0
    return np.where(present, f1, 0.0).sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def cluster_bootstrap_macro_f1(
    y_true: ArrayLike, y_pred: ArrayLike, labels: LabelSet, groups: ArrayLike, n_resamples: int = 2000, confidence: float = 0.95, seed: int | None = 0
) -> dict[str, Any]:
    """Percentile interval of macro F1 when items come in groups (resampled whole, stratified by class)."""
    _check_common(n_resamples, confidence)
    t, p, n = encode_labels(y_true, y_pred, labels)
    dist = _weighted_macro_f1(t, p, n, _group_weights(t, groups, n_resamples, seed))
    result = _ci_result(macro_f1_codes(t, p, n), dist, confidence, True)
    result["method"] = "percentile, cluster bootstrap over groups"
    return result


def cluster_bootstrap_accuracy(
    y_true: ArrayLike, y_pred: ArrayLike, labels: LabelSet, groups: ArrayLike, n_resamples: int = 2000, confidence: float = 0.95, seed: int | None = 0
) -> dict[str, Any]:
    """Percentile interval of accuracy when items come in groups (resampled whole, stratified by class): a
    group of near-duplicate crops counts as the one cell it is, not as independent evidence."""
    _check_common(n_resamples, confidence)
    t, p, _ = encode_labels(y_true, y_pred, labels)
    weights = _group_weights(t, groups, n_resamples, seed)
    correct = (t == p).astype(np.float64)
    dist = (weights @ correct) / np.maximum(weights.sum(axis=1), 1e-12)
    result = _ci_result(float(correct.mean()), dist, confidence, True)
    result["method"] = "percentile, cluster bootstrap over groups"
    return result


def paired_cluster_bootstrap_macro_f1(
    y_true: ArrayLike, pred_a: ArrayLike, pred_b: ArrayLike, labels: LabelSet, groups: ArrayLike, n_resamples: int = 2000, seed: int | None = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Paired test of macro F1(A) - macro F1(B) when items come in groups (cluster bootstrap)."""
    _check_common(n_resamples, confidence)
    t, a, n = encode_labels(y_true, pred_a, labels)
    _, b, _ = encode_labels(y_true, pred_b, labels)
    weights = _group_weights(t, groups, n_resamples, seed)
    diffs = _weighted_macro_f1(t, a, n, weights) - _weighted_macro_f1(t, b, n, weights)
    result = _paired_result(macro_f1_codes(t, a, n), macro_f1_codes(t, b, n), diffs, confidence, True)
    result["method"] = "paired percentile cluster bootstrap over groups; two-sided p, centred"
    return result


def unpaired_bootstrap_difference(
    values_a: ArrayLike, values_b: ArrayLike, n_resamples: int = 2000, seed: int | None = 0, confidence: float = 0.95
) -> dict[str, Any]:
    """Difference of means A - B of two *independent* samples (e.g. per-item correctness on two different
    test sets), with a percentile bootstrap interval that resamples each sample on its own (scipy)."""
    from scipy.stats import bootstrap

    _check_common(n_resamples, confidence)
    a = _as_1d(values_a, "values_a").astype(np.float64)
    b = _as_1d(values_b, "values_b").astype(np.float64)
    if not len(a) or not len(b):
        raise ValueError("both samples need at least one value")
    result = bootstrap(
        (a, b), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis), paired=False, vectorized=True,
        n_resamples=int(n_resamples), confidence_level=float(confidence), method="percentile", rng=np.random.default_rng(seed),
    )
    return {
        "difference": float(a.mean() - b.mean()),
        "low": float(result.confidence_interval.low),
        "high": float(result.confidence_interval.high),
        "metric_a": float(a.mean()),
        "metric_b": float(b.mean()),
        "n_a": int(len(a)),
        "n_b": int(len(b)),
        "n_resamples": int(n_resamples),
        "confidence": float(confidence),
        "method": "unpaired percentile bootstrap (each sample resampled on its own; scipy.stats.bootstrap)",
    }
def share_intervals(counts: Mapping[str, int], confidence: float = 0.95) -> dict[str, dict[str, Any]]:
    """Share of each category in a count (a differential count) with its Wilson score interval.

    Why Wilson: with 100-200 cells and classes of 0-5 %, the normal approximation gives intervals below
    zero and the exact (Clopper-Pearson) one is needlessly wide; Wilson keeps nominal coverage there.
    Each share is treated as a binomial proportion of the total (a per-class interval, not a joint one).
    """
    from scipy.stats import binomtest

    _check_common(1, confidence)
    total = int(sum(int(c) for c in counts.values()))
    out: dict[str, dict[str, Any]] = {}
    for name, count in counts.items():
        k = int(count)
        if k < 0:
            raise ValueError(f"count of {name!r} is negative ({k})")
        if total == 0:
            out[name] = {"count": 0, "share": float("nan"), "low": float("nan"), "high": float("nan")}
            continue
        ci = binomtest(k, total).proportion_ci(confidence_level=float(confidence), method="wilson")
        out[name] = {"count": k, "share": k / total, "low": float(ci.low), "high": float(ci.high)}
    return out
