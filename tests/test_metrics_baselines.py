"""Trivial baselines: the majority class exactly, the class-prior random guess's expected F1 exactly (checked
against a seeded simulation), and the 'does not beat them' mark."""

from __future__ import annotations

import numpy as np
import pytest

from hemaclip.metrics.baselines import beats_baselines, expected_prior_f1, trivial_baselines
from hemaclip.metrics.classification import accuracy, balanced_accuracy, macro_f1, weighted_f1

LABELS = ["a", "b", "c", "d"]
TRUTH = ["a"] * 30 + ["b"] * 60 + ["c"] * 9 + ["d"] * 1
TRAIN = ["a"] * 25 + ["b"] * 60 + ["c"] * 15  # "d" never in train: random never guesses it


def test_majority_class_is_exact() -> None:
    result = trivial_baselines(TRUTH, LABELS, TRAIN, "train")
    assert result["majority_label"] == "b" and result["reference"] == "train" and result["n_reference"] == 100
    always_b = ["b"] * len(TRUTH)
    codes = [LABELS.index(y) for y in TRUTH]
    assert result["majority"]["macro_f1"] == pytest.approx(macro_f1(TRUTH, always_b, LABELS))
    assert result["majority"]["per_class"] == {"a": 0.0, "b": pytest.approx(2 * 60 / (100 + 60)), "c": 0.0, "d": 0.0}
    assert result["majority"]["accuracy"] == pytest.approx(0.6)
    assert result["majority"]["balanced_accuracy"] == pytest.approx(0.25)
    assert result["majority"]["weighted_f1"] == pytest.approx(weighted_f1(np.array(codes), np.full(100, 1), 4))


def test_prior_random_expectation_matches_a_seeded_simulation() -> None:
    result = trivial_baselines(TRUTH, LABELS, TRAIN, "train")
    prior = np.array([0.25, 0.6, 0.15, 0.0])
    assert list(result["prior"].values()) == pytest.approx(prior.tolist())
    rng = np.random.default_rng(0)
    codes = np.array([LABELS.index(y) for y in TRUTH])
    draws = [rng.choice(4, size=len(TRUTH), p=prior) for _ in range(20000)]
    sims = {
        "macro_f1": np.mean([macro_f1(codes, d, 4) for d in draws]),
        "accuracy": np.mean([accuracy(codes, d) for d in draws]),
        "balanced_accuracy": np.mean([balanced_accuracy(codes, d, 4) for d in draws]),
        "weighted_f1": np.mean([weighted_f1(codes, d, 4) for d in draws]),
    }
    for key, simulated in sims.items():  # 20,000 draws: standard errors about 3e-4
        assert result["prior_random"][key] == pytest.approx(simulated, abs=2e-3), key
    assert result["prior_random"]["per_class"]["d"] == 0.0


def test_expected_f1_edge_cases_and_large_sets() -> None:
    assert expected_prior_f1(0, 100, 0.5) == 0.0
    assert expected_prior_f1(10, 100, 0.0) == 0.0
    assert expected_prior_f1(10, 100, 1.0) == pytest.approx(2 * 10 / 110)
    assert expected_prior_f1(10, 10, 0.5) == pytest.approx(sum(  # only positives: F1 = 2k / (k + 10), k ~ Bin(10, 0.5)
        __import__("math").comb(10, k) * 0.5**10 * 2 * k / (k + 10) for k in range(11)))
    big = expected_prior_f1(3000, 17000, 0.18)  # tails cut at 1e-12: fast and close to the large-sample value 2pq/(p+q)
    assert big == pytest.approx(2 * (3000 / 17000) * 0.18 / (3000 / 17000 + 0.18), abs=1e-3)


def test_beats_baselines_needs_to_be_strictly_above_both() -> None:
    assert beats_baselines(0.6, 0.5, 0.3) is True
    assert beats_baselines(0.473, 0.479, 0.2) is False  # the vacuole case: below "always no"
    assert beats_baselines(0.5, 0.5, None) is False
    assert beats_baselines(None, 0.5, 0.3) is None
