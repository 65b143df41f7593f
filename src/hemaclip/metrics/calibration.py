"""Calibration and confidence quality: ECE, reliability bins, temperature scaling, selective accuracy.

A morphology model is only useful to a reviewer if its confidence means something: these functions
measure whether confidence matches accuracy (ECE, reliability bins), whether it ranks right above
wrong answers (AUROC, point-biserial correlation, selective accuracy) and fix the scale post hoc
(temperature scaling). Inputs are numpy arrays; results are plain Python values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "apply_temperature",
    "confidence_auroc",
    "confidence_correctness_correlation",
    "ece_floor",
    "expected_calibration_error",
    "fit_temperature",
    "negative_log_likelihood",
    "reliability_bins",
    "selective_accuracy",
    "softmax",
]

DEFAULT_COVERAGES: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
TEMPERATURE_BOUNDS: tuple[float, float] = (1e-2, 1e2)


def _probs_and_labels(probs: ArrayLike, y_true: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"probs must be a non-empty [N, C] array, got shape {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"y_true must have shape ({p.shape[0]},), got {y.shape}")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0 + 1e-6:
        raise ValueError("probs must be finite and within [0, 1] (pass softmax outputs, not logits)")
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true has values outside [0, {p.shape[1]})")
    return p, y


def _confidence_and_correct(confidence: ArrayLike, correct: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence, dtype=np.float64)
    k = np.asarray(correct)
    if c.ndim != 1 or c.shape != k.shape:
        raise ValueError(f"confidence and correct must be 1-D of equal length, got {c.shape} and {k.shape}")
    if c.size == 0:
        raise ValueError("need at least one item")
    if not np.all(np.isfinite(c)):
        raise ValueError("confidence must be finite")
    return c, k.astype(bool)


def reliability_bins(probs: ArrayLike, y_true: ArrayLike, n_bins: int = 15) -> dict[str, Any]:
    """Top-label reliability data for diagrams and ECE, with equal-width bins on [0, 1].

    Confidence is the largest probability per row, the prediction its argmax (first on ties). Bin
    ``b`` holds confidences in ``(b/n, (b+1)/n]``; confidence 0 goes to the first bin. Returns
    lists ``edges`` (n_bins + 1), ``count``, ``accuracy``, ``confidence`` (mean per bin) and
    ``gap`` (confidence - accuracy), plus ``ece``, ``mce`` (largest gap over non-empty bins) and
    ``n``. Empty bins report 0.0 for accuracy/confidence/gap (their ``count`` of 0 tells them
    apart) so the result stays valid JSON.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p, y = _probs_and_labels(probs, y_true)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    sum_conf = np.bincount(idx, weights=conf, minlength=n_bins)
    sum_acc = np.bincount(idx, weights=correct, minlength=n_bins)
    nonempty = count > 0
    mean_conf = np.zeros(n_bins)
    mean_acc = np.zeros(n_bins)
    np.divide(sum_conf, count, out=mean_conf, where=nonempty)
    np.divide(sum_acc, count, out=mean_acc, where=nonempty)
    gap = mean_conf - mean_acc
    n = int(conf.size)
    ece = float(np.sum(count / n * np.abs(gap)))
    return {
        "n": n,
        "n_bins": int(n_bins),
        "edges": np.linspace(0.0, 1.0, n_bins + 1).tolist(),
        "count": count.astype(int).tolist(),
        "accuracy": mean_acc.tolist(),
        "confidence": mean_conf.tolist(),
        "gap": gap.tolist(),
        "ece": ece,
        "mce": float(np.max(np.abs(gap[nonempty]))),
    }


def expected_calibration_error(probs: ArrayLike, y_true: ArrayLike, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): sum over bins of (bin share) * |accuracy - mean confidence|."""
    return float(reliability_bins(probs, y_true, n_bins)["ece"])


def ece_floor(probs: ArrayLike, n_bins: int = 15, n_draws: int = 200, seed: int = 0) -> float:
    """The ECE a perfectly calibrated model would still show on these cells: the mean ECE when each cell's
    label is drawn from its own predicted probabilities (`n_draws` times).

    Why: binned ECE is biased upwards on small sets (69 cells share 15 bins), so an ECE means little without
    the floor it is measured against; a model can only be said to miss a target the floor lies well below.
    """
    p, _ = _probs_and_labels(probs, np.zeros(len(np.asarray(probs)), dtype=np.int64))
    rng = np.random.default_rng(seed)
    cumulative = np.cumsum(p / p.sum(axis=1, keepdims=True), axis=1)
    draws = []
    for _ in range(int(n_draws)):
        labels = (rng.random((len(p), 1)) > cumulative).sum(axis=1).clip(0, p.shape[1] - 1)
        draws.append(reliability_bins(p, labels, n_bins)["ece"])
    return float(np.mean(draws))


def softmax(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax of ``logits / temperature`` along the last axis."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


apply_temperature = softmax


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    s = z / temperature
    m = s.max(axis=1)
    lse = m + np.log(np.exp(s - m[:, None]).sum(axis=1))
    return float(np.mean(lse - s[np.arange(y.size), y]))


def negative_log_likelihood(logits: ArrayLike, y_true: ArrayLike, temperature: float = 1.0) -> float:
    """Mean cross-entropy of ``softmax(logits / temperature)`` against integer labels."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64)
    if z.ndim != 2 or y.shape != (z.shape[0],) or z.shape[0] == 0:
        raise ValueError(f"need logits [N, C] with N > 0 and labels [N], got {z.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"y_true has values outside [0, {z.shape[1]})")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _nll(z, y, float(temperature))


def fit_temperature(logits_val: ArrayLike, y_val: ArrayLike) -> float:
    """Temperature T > 0 minimising validation NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    Searched on log T within :data:`TEMPERATURE_BOUNDS` with a bounded scalar minimiser, since NLL
    is smooth and unimodal in practice there. Returns 1.0 (leave the model unchanged) for
    degenerate input where no temperature is meaningful: no items, fewer than 2 classes,
    non-finite logits, logits constant within every row, or an optimum no better than T = 1.
    Note that a validation set the model gets entirely right pushes T to the lower bound.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits_val, dtype=np.float64)
    y = np.asarray(y_val)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"need logits [N, C] and labels [N], got {z.shape} and {y.shape}")
    if z.shape[0] == 0 or z.shape[1] < 2:
        return 1.0
    if not np.all(np.isfinite(z)) or np.all(np.ptp(z, axis=1) == 0):
        return 1.0
    y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"y_val has values outside [0, {z.shape[1]})")
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    res = minimize_scalar(lambda log_t: _nll(z, y, math.exp(log_t)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-5})
    if not res.success or not np.isfinite(res.fun):
        return 1.0
    temperature = float(math.exp(res.x))
    return temperature if _nll(z, y, temperature) < _nll(z, y, 1.0) else 1.0


def confidence_auroc(confidence: ArrayLike, correct: ArrayLike) -> float:
    """AUROC of confidence for telling right from wrong predictions (1 = perfect ranking, 0.5 = none).

    Returns NaN when every prediction is right or every one is wrong: AUROC needs both classes and
    is undefined otherwise (scikit-learn would raise), which should read as "not measurable".
    """
    from sklearn.metrics import roc_auc_score

    c, k = _confidence_and_correct(confidence, correct)
    if k.all() or not k.any():
        return float("nan")
    return float(roc_auc_score(k, c))


def confidence_correctness_correlation(confidence: ArrayLike, correct: ArrayLike) -> float:
    """Point-biserial correlation, i.e. Pearson r between confidence and correctness (0/1).

    NaN when either is constant (all right, all wrong, or one confidence value): r is undefined.
    """
    c, k = _confidence_and_correct(confidence, correct)
    kf = k.astype(np.float64)
    cd, kd = c - c.mean(), kf - kf.mean()
    denom = math.sqrt(float(np.dot(cd, cd)) * float(np.dot(kd, kd)))
    if denom == 0.0:
        return float("nan")
    return float(np.clip(np.dot(cd, kd) / denom, -1.0, 1.0))


def selective_accuracy(
    confidence: ArrayLike, correct: ArrayLike, coverages: Sequence[float] = DEFAULT_COVERAGES
) -> dict[str, Any]:
    """Accuracy on the most confident fraction of items, for each coverage (accuracy-coverage curve).

    At coverage ``c`` the ``ceil(c * N)`` most confident items are kept (at least 1); ties in
    confidence are broken by item order (stable sort), so results are deterministic. Returns
    parallel lists ``coverage``, ``n_kept``, ``accuracy`` and ``threshold`` (lowest kept
    confidence), plus ``n``.
    """
    c, k = _confidence_and_correct(confidence, correct)
    covs = [float(x) for x in coverages]
    if any(not 0.0 < x <= 1.0 for x in covs):
        raise ValueError(f"coverages must lie in (0, 1], got {covs}")
    order = np.argsort(-c, kind="stable")
    hits = np.cumsum(k[order])
    n = c.size
    kept = [max(1, min(n, math.ceil(round(x * n, 9)))) for x in covs]
    return {
        "n": int(n),
        "coverage": covs,
        "n_kept": kept,
        "accuracy": [float(hits[m - 1] / m) for m in kept],
        "threshold": [float(c[order[m - 1]]) for m in kept],
    }
