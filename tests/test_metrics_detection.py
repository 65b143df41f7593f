"""AUROC of an unfamiliarity score: exact on small cases, interval around the point, ROC ends, flag rate."""

from __future__ import annotations

import numpy as np
import pytest

from hemaclip.metrics.detection import flag_rate, roc_points, separation_auroc


def test_auroc_is_the_probability_a_positive_scores_above_a_negative_with_ties_counting_half() -> None:
    assert separation_auroc([0, 1, 2], [3, 4], n_resamples=0)["point"] == 1.0
    assert separation_auroc([3, 4], [0, 1, 2], n_resamples=0)["point"] == 0.0
    # pairs (neg, pos): (1,1) tie -> 0.5, (1,2) 1, (3,1) 0, (3,2) 0 -> 1.5 / 4
    assert separation_auroc([1, 3], [1, 2], n_resamples=0)["point"] == pytest.approx(0.375)


def test_auroc_interval_brackets_the_point_and_roc_runs_from_corner_to_corner() -> None:
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(0, 1, 300), rng.normal(1.5, 1, 200)
    result = separation_auroc(neg, pos, n_resamples=300, seed=1)
    assert result["low"] < result["point"] < result["high"]
    assert 0.8 < result["point"] < 0.9  # Phi(1.5 / sqrt(2)) = 0.856
    fpr, tpr = roc_points(neg, pos)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert flag_rate([1, 2, 3, 4], 2.5) == 0.5


def test_bad_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        separation_auroc([0, np.nan], [1])
    with pytest.raises(ValueError, match="at least one"):
        separation_auroc([], [1])
