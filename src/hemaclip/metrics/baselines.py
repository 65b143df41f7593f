"""Trivial baselines every classification number is set beside: always the majority class, and guessing at random
with the class prior.

A model that does not beat these has learned nothing usable for that class or attribute, however high its
number looks (cytoplasm vacuole: "no" for every cell already scores 0.479 macro F1). Both baselines take the
prior (or the majority) from a reference split, normally **train**, never from the scored images.

* **Majority class**: every image gets the reference split's most frequent label (ties: the first in label order).
  Its F1 is that label's 2n/(N + n) and 0 for every other label, exactly.
* **Class-prior random**: every image independently gets label c with probability p_c (the reference prior).
  For label c with n_c of the N scored images, TP ~ Binomial(n_c, p_c) and FP ~ Binomial(N - n_c, p_c) are
  independent and F1_c = 2 TP / (TP + FP + n_c). Its expectation is computed exactly, as the double sum over
  both binomials (terms with probability below 1e-12 at either tail are left out), not by simulation; the
  expected macro F1 is the mean of the expected per-label F1 over the labels in the truth (linearity).

Accuracy, balanced accuracy and weighted F1 of both follow from the same quantities (their expectations are exact).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binom

__all__ = ["BASELINE_METHOD", "beats_baselines", "expected_prior_f1", "majority_f1", "prior_from_labels", "trivial_baselines"]

BASELINE_METHOD = (
    "majority = the reference split's most frequent label for every image (exact F1); prior-random = each image drawn "
    "independently from the reference split's label prior, expected F1 computed exactly from the two binomials"
)
_TAIL = 1e-12


def prior_from_labels(labels: Sequence[str], label_set: Sequence[str]) -> np.ndarray:
    """Label frequencies of `labels` over `label_set` (labels outside the set are ignored); uniform if none is in it."""
    counts = Counter(str(x) for x in labels)
    raw = np.array([counts.get(str(c), 0) for c in label_set], dtype=np.float64)
    return raw / raw.sum() if raw.sum() > 0 else np.full(len(label_set), 1.0 / len(label_set))


def majority_f1(n_positive: np.ndarray, majority: int) -> np.ndarray:
    """Per-label F1 when every one of the N = sum(n_positive) images is given label `majority`."""
    n_positive = np.asarray(n_positive, dtype=np.float64)
    out = np.zeros(len(n_positive))
    total = n_positive.sum()
    if n_positive[majority] > 0:
        out[majority] = 2 * n_positive[majority] / (total + n_positive[majority])
    return out


def expected_prior_f1(n_positive: int, n_total: int, p: float) -> float:
    """E[F1] of one label with `n_positive` of `n_total` images when each image is given it with probability `p`."""
    if n_positive <= 0 or p <= 0:
        return 0.0
    if p >= 1:
        return 2 * n_positive / (n_total + n_positive)
    n_negative = n_total - n_positive

    def support(n: int) -> tuple[np.ndarray, np.ndarray]:
        if n == 0:
            return np.zeros(1), np.ones(1)
        lo, hi = int(binom.ppf(_TAIL, n, p)), int(binom.isf(_TAIL, n, p)) + 1
        k = np.arange(max(lo, 0), min(hi, n) + 1)
        return k.astype(np.float64), binom.pmf(k, n, p)

    tp, p_tp = support(n_positive)
    fp, p_fp = support(n_negative)
    f1 = 2 * tp[:, None] / (tp[:, None] + fp[None, :] + n_positive)
    return float(p_tp @ f1 @ p_fp)


def trivial_baselines(y_true: Sequence[str], label_set: Sequence[str], reference: Sequence[str], reference_name: str) -> dict[str, Any]:
    """Majority-class and class-prior-random F1 per label and their macro F1 (hemaclip's convention: the mean
    over the labels of `label_set` that occur in `y_true`), with the prior taken from `reference` labels."""
    label_set = [str(c) for c in label_set]
    truth = Counter(str(y) for y in y_true)
    n_positive = np.array([truth.get(c, 0) for c in label_set], dtype=np.int64)
    n_total = int(sum(truth.values()))
    prior = prior_from_labels(reference, label_set)
    majority = int(np.argmax(prior))
    present = n_positive > 0
    maj = majority_f1(n_positive, majority)
    rnd = np.array([expected_prior_f1(int(n), n_total, float(q)) for n, q in zip(n_positive, prior)])
    share = n_positive / max(n_total, 1)
    predicted_share = {"majority": np.eye(len(label_set))[majority], "prior_random": prior}

    def summary(f1: np.ndarray, name: str) -> dict[str, Any]:
        # Accuracy and balanced accuracy of a guess that ignores the image: the predicted share of each true label.
        hit = predicted_share[name]
        return {"per_class": {c: float(f) for c, f, ok in zip(label_set, f1, present) if ok},
                "macro_f1": float(f1[present].mean()) if present.any() else None,
                "weighted_f1": float(share @ f1),
                "accuracy": float(share @ hit),
                "balanced_accuracy": float(hit[present].mean()) if present.any() else None}

    return {
        "reference": reference_name,
        "n_reference": len(reference),
        "prior": {c: float(q) for c, q in zip(label_set, prior)},
        "majority_label": label_set[majority],
        "majority": summary(maj, "majority"),
        "prior_random": summary(rnd, "prior_random"),
        "method": BASELINE_METHOD,
    }


def beats_baselines(score: float | None, *baseline_scores: float | None) -> bool | None:
    """Whether `score` is strictly above every given baseline score (None when `score` is missing)."""
    if score is None:
        return None
    return all(score > b for b in baseline_scores if b is not None)
