"""Separating two groups by a score (unfamiliar vs familiar cells): AUROC with a bootstrap interval, ROC points.

Convention: a higher score means "more unfamiliar"; the positive group is the one that should be flagged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["separation_auroc", "roc_points", "flag_rate"]


def _scores(x: ArrayLike, name: str) -> np.ndarray:
    s = np.asarray(x, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError(f"{name}: need at least one score")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name}: scores must be finite")
    return s


def _auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """P(positive score > negative score) + 0.5 P(tie): scikit-learn's ROC AUC with the positives labelled 1."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(negative.size), np.ones(positive.size)], np.r_[negative, positive]))


def separation_auroc(negative: ArrayLike, positive: ArrayLike, n_resamples: int = 2000, seed: int = 0, confidence: float = 0.95) -> dict[str, Any]:
    """AUROC of `positive` (should be flagged) against `negative` scores, with a percentile interval from
    resampling each group with replacement."""
    neg, pos = _scores(negative, "negative"), _scores(positive, "positive")
    point = _auroc(neg, pos)
    out: dict[str, Any] = {"point": point, "low": None, "high": None, "n_negative": int(neg.size), "n_positive": int(pos.size)}
    if n_resamples > 0:
        rng = np.random.default_rng(seed)
        dist = np.array([_auroc(neg[rng.integers(0, neg.size, neg.size)], pos[rng.integers(0, pos.size, pos.size)])
                         for _ in range(int(n_resamples))])
        alpha = (1 - confidence) / 2
        out["low"], out["high"] = float(np.quantile(dist, alpha)), float(np.quantile(dist, 1 - alpha))
        out["n_resamples"] = int(n_resamples)
    return out


def roc_points(negative: ArrayLike, positive: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over every threshold (for a ROC figure)."""
    from sklearn.metrics import roc_curve

    neg, pos = _scores(negative, "negative"), _scores(positive, "positive")
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(neg.size), np.ones(pos.size)], np.r_[neg, pos])
    return fpr, tpr


def flag_rate(scores: ArrayLike, threshold: float) -> float:
    """Share of scores above the flag threshold."""
    return float(np.mean(_scores(scores, "scores") > float(threshold)))
