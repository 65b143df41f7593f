"""Calibration metrics on synthetic data whose calibration is known by construction."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import pointbiserialr
from sklearn.metrics import roc_auc_score

from hemaclip.metrics.calibration import (
    confidence_auroc,
    confidence_correctness_correlation,
    ece_floor,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    selective_accuracy,
    softmax,
)
from hemaclip_research.plots import plot_reliability


def calibrated_probs(n: int, n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from the predicted distribution itself: perfectly calibrated by construction."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(n_classes, 0.5), size=n)
    cum = probs.cumsum(axis=1)
    y = (rng.random((n, 1)) > cum).sum(axis=1)
    return probs, np.minimum(y, n_classes - 1)


def overconfident_logits(n: int, n_classes: int, seed: int, scale: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), but the model reports scale * z: too sharp."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, n_classes))
    probs = softmax(z)
    y = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return scale * z, np.minimum(y, n_classes - 1)


def test_ece_hand_computed() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([0, 1, 0, 1])
    # Bins of width 0.5: (0.5, 1.0] holds all four; mean conf = 0.775, accuracy = 0.75.
    assert expected_calibration_error(probs, y, n_bins=2) == pytest.approx(0.025)
    # 10 bins: {0.9, 0.9} acc 0.5 -> |0.4| * 0.5; {0.6} acc 1 -> 0.4 * 0.25; {0.7} acc 1 -> 0.3 * 0.25.
    assert expected_calibration_error(probs, y, n_bins=10) == pytest.approx(0.2 + 0.1 + 0.075)


def test_reliability_bins_structure() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    bins = reliability_bins(probs, np.array([0, 1, 0, 1]), n_bins=10)
    assert bins["count"] == [0, 0, 0, 0, 0, 1, 1, 0, 2, 0]  # 0.6 -> (0.5, 0.6], 0.9 -> (0.8, 0.9]
    assert len(bins["edges"]) == 11 and bins["edges"][0] == 0.0 and bins["edges"][-1] == 1.0
    assert bins["accuracy"][8] == 0.5 and bins["confidence"][8] == pytest.approx(0.9)
    assert bins["accuracy"][0] == 0.0 and bins["confidence"][0] == 0.0  # empty bin: zeros
    assert bins["mce"] == pytest.approx(0.4) and bins["n"] == 4
    json.dumps(bins)


def test_ece_perfectly_calibrated_is_near_zero_and_overconfident_is_large() -> None:
    probs, y = calibrated_probs(20000, 4, seed=0)
    assert expected_calibration_error(probs, y) < 0.02
    logits, y2 = overconfident_logits(5000, 4, seed=1)
    assert expected_calibration_error(softmax(logits), y2) > 0.1


def test_temperature_scaling_reduces_nll_and_ece() -> None:
    logits, y = overconfident_logits(3000, 4, seed=2, scale=4.0)
    t = fit_temperature(logits[:1500], y[:1500])
    assert 2.5 < t < 6.0  # the true temperature is 4
    before = negative_log_likelihood(logits[1500:], y[1500:])
    after = negative_log_likelihood(logits[1500:], y[1500:], temperature=t)
    assert after < before - 0.1
    assert expected_calibration_error(softmax(logits[1500:], t), y[1500:]) < 0.05


def test_nll_matches_direct_formula() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    y = np.array([0, 2])
    expected = -np.mean([math.log(softmax(logits)[0, 0]), math.log(1 / 3)])
    assert negative_log_likelihood(logits, y) == pytest.approx(expected)


@pytest.mark.parametrize(
    "logits",
    [np.zeros((0, 3)), np.ones((5, 1)), np.full((4, 3), 2.0), np.array([[np.nan, 0.0], [1.0, 0.0]])],
)
def test_fit_temperature_degenerate_returns_one(logits: np.ndarray) -> None:
    assert fit_temperature(logits, np.zeros(logits.shape[0], dtype=int)) == 1.0


def test_confidence_auroc_and_nan_cases() -> None:
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.5])
    correct = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    assert confidence_auroc(conf, correct) == pytest.approx(roc_auc_score(correct, conf)) == pytest.approx(8 / 9)
    assert math.isnan(confidence_auroc(conf, np.ones(6, dtype=bool)))
    assert math.isnan(confidence_auroc(conf, np.zeros(6, dtype=bool)))


def test_point_biserial_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    conf = rng.random(200)
    correct = rng.random(200) < conf
    r = confidence_correctness_correlation(conf, correct)
    assert r == pytest.approx(pointbiserialr(correct, conf).statistic)
    assert r > 0.3
    assert math.isnan(confidence_correctness_correlation(conf, np.ones(200, dtype=bool)))
    assert math.isnan(confidence_correctness_correlation(np.full(200, 0.5), correct))


def test_selective_accuracy_hand_computed_with_ties() -> None:
    conf = np.array([0.9, 0.5, 0.8, 0.5, 0.3, 0.95, 0.5, 0.2, 0.6, 0.7])
    correct = np.array([1, 0, 1, 1, 0, 1, 0, 0, 0, 1], dtype=bool)
    res = selective_accuracy(conf, correct)
    assert res["coverage"] == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert res["n_kept"] == [5, 6, 7, 8, 9, 10]  # ceil(0.6 * 10) is 6, not 7
    # Order: 0.95(1) 0.9(1) 0.8(1) 0.7(1) 0.6(0) | 0.5 idx1(0) 0.5 idx3(1) 0.5 idx6(0) 0.3(0) 0.2(0)
    assert res["accuracy"] == pytest.approx([4 / 5, 4 / 6, 5 / 7, 5 / 8, 5 / 9, 5 / 10])
    assert res["threshold"][:3] == [0.6, 0.5, 0.5]
    one = selective_accuracy(conf, correct, coverages=(0.01,))
    assert one["n_kept"] == [1] and one["accuracy"] == [1.0]
    with pytest.raises(ValueError):
        selective_accuracy(conf, correct, coverages=(0.0,))


def test_plot_reliability_writes_png(tmp_path: Path) -> None:
    probs, y = calibrated_probs(300, 3, seed=3)
    out = plot_reliability(reliability_bins(probs, y, n_bins=10), tmp_path / "plots" / "rel.png", title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["rel.png"]  # no temporary files left behind


def test_invalid_probs_raise() -> None:
    with pytest.raises(ValueError):
        expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError):
        expected_calibration_error(np.array([[0.5, 0.5]]), np.array([2]))


def test_ece_floor_is_zero_for_certain_predictions_and_shrinks_with_more_cells():
    assert ece_floor(np.eye(3)[[0, 1, 2, 1]]) == 0.0  # labels drawn from one-hot probabilities always agree

    def two_class(n: int) -> np.ndarray:
        top = np.random.default_rng(1).uniform(0.5, 1.0, size=n)
        return np.stack([top, 1 - top], axis=1)

    small, large = ece_floor(two_class(69)), ece_floor(two_class(5000))
    assert small > 3 * large  # binned ECE is biased upwards on a small set, even for a perfectly calibrated model
    assert 0.03 < small < 0.2 and large < 0.02
    assert ece_floor(two_class(69), seed=3) == ece_floor(two_class(69), seed=3)  # seeded


def test_ece_floor_matches_the_ece_of_a_model_that_is_calibrated_by_construction():
    rng = np.random.default_rng(7)
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=200)
    eces = [expected_calibration_error(probs, [rng.choice(3, p=row) for row in probs]) for _ in range(100)]
    assert ece_floor(probs, n_draws=400) == pytest.approx(float(np.mean(eces)), abs=0.01)
