"""Bootstrap intervals and paired tests behave as theory says on cases with known answers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from hemaclip.metrics.classification import macro_f1
from hemaclip.metrics.statistics import (
    bootstrap_ci,
    bootstrap_macro_f1,
    paired_bootstrap_macro_f1,
    paired_bootstrap_test,
    resample_indices,
)


def accuracy(t: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(t == p))


def noisy_predictions(y: np.ndarray, n_classes: int, error_rate: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wrong = rng.random(y.size) < error_rate
    return np.where(wrong, (y + rng.integers(1, n_classes, y.size)) % n_classes, y)


def test_constant_metric_gives_zero_width_interval() -> None:
    y = np.arange(50) % 3
    res = bootstrap_ci(lambda t, p: 0.42, y, y, n_resamples=100)
    assert res["point"] == res["low"] == res["high"] == 0.42
    assert res["n_resamples"] == 100 and res["se"] == 0.0
    perfect = bootstrap_macro_f1(y, y, 3, n_resamples=200)
    assert perfect["point"] == perfect["low"] == perfect["high"] == 1.0


def test_bernoulli_accuracy_interval_matches_normal_approximation() -> None:
    rng = np.random.default_rng(123)
    n, p_true = 1000, 0.8
    y = np.zeros(n, dtype=int)
    pred = np.where(rng.random(n) < p_true, 0, 1)
    res = bootstrap_ci(accuracy, y, pred, n_resamples=2000, stratified=False, seed=1)
    acc = res["point"]
    half = 1.959964 * np.sqrt(acc * (1 - acc) / n)
    assert res["low"] == pytest.approx(acc - half, abs=0.004)
    assert res["high"] == pytest.approx(acc + half, abs=0.004)
    assert res["se"] == pytest.approx(np.sqrt(acc * (1 - acc) / n), rel=0.1)


def test_same_seed_same_result_other_seed_differs() -> None:
    y = np.arange(300) % 4
    pred = noisy_predictions(y, 4, 0.3, seed=0)
    a = bootstrap_macro_f1(y, pred, 4, n_resamples=300, seed=7)
    b = bootstrap_macro_f1(y, pred, 4, n_resamples=300, seed=7)
    c = bootstrap_macro_f1(y, pred, 4, n_resamples=300, seed=8)
    assert a == b and (a["low"], a["high"]) != (c["low"], c["high"])


def test_stratified_resampling_keeps_class_counts() -> None:
    y = np.array([0] * 7 + [1] * 2 + [2] * 11)
    rng = np.random.default_rng(0)
    y = y[rng.permutation(y.size)]
    blocks = list(resample_indices(y, 50, seed=3, stratified=True))
    idx = np.concatenate(blocks)
    assert idx.shape == (50, y.size)
    for row in idx:
        np.testing.assert_array_equal(np.bincount(y[row], minlength=3), [7, 2, 11])
    # Unstratified resamples do vary the class counts.
    free = np.concatenate(list(resample_indices(y, 50, seed=3, stratified=False)))
    assert len({tuple(np.bincount(y[row], minlength=3)) for row in free}) > 1


def test_fast_macro_f1_equals_generic_path() -> None:
    y = np.arange(240) % 5
    y[:3] = 4  # unbalanced, and class 5 of 6 never occurs (empty class)
    pred = noisy_predictions(y, 5, 0.35, seed=2)
    pred[[5, 6]] = 9  # outside the label set: wrong for those images, never a class of its own
    for stratified in (True, False):
        generic = bootstrap_ci(lambda t, p: macro_f1(t, p, 6), y, pred, n_resamples=150, seed=4, stratified=stratified)
        fast = bootstrap_macro_f1(y, pred, 6, n_resamples=150, seed=4, stratified=stratified)
        assert fast["point"] == generic["point"]
        for key in ("low", "high", "se"):
            assert fast[key] == pytest.approx(generic[key], abs=1e-12)
        assert fast["low"] < fast["point"] < fast["high"]


def test_fast_macro_f1_is_fast() -> None:
    y = np.arange(3000) % 5
    pred = noisy_predictions(y, 5, 0.25, seed=0)
    start = time.perf_counter()
    res = bootstrap_macro_f1(y, pred, 5, n_resamples=2000)
    elapsed = time.perf_counter() - start
    assert res["n_resamples"] == 2000 and res["low"] < res["point"] < res["high"]
    assert elapsed < 5.0


def test_paired_identical_predictions_give_zero_difference_and_p_one() -> None:
    y = np.arange(120) % 3
    pred = noisy_predictions(y, 3, 0.3, seed=5)
    res = paired_bootstrap_test(accuracy, y, pred, pred.copy(), n_resamples=200)
    assert res["difference"] == 0.0 and res["low"] == res["high"] == 0.0 and res["p_value"] == 1.0
    fast = paired_bootstrap_macro_f1(y, pred, pred, 3, n_resamples=200)
    assert fast["difference"] == 0.0 and fast["p_value"] == 1.0


def test_paired_clearly_better_predictions_are_significant() -> None:
    y = np.arange(600) % 4
    good = noisy_predictions(y, 4, 0.10, seed=1)
    bad = noisy_predictions(y, 4, 0.35, seed=2)
    res = paired_bootstrap_test(accuracy, y, good, bad, n_resamples=300, seed=0)
    assert res["difference"] > 0.15 and res["low"] > 0 and res["p_value"] < 0.05
    assert res["p_value"] == pytest.approx(1 / 301)
    fast = paired_bootstrap_macro_f1(y, good, bad, 4, n_resamples=2000)
    assert fast["difference"] == pytest.approx(macro_f1(y, good, 4) - macro_f1(y, bad, 4))
    assert fast["p_value"] < 0.05 and fast["low"] > 0
    swapped = paired_bootstrap_macro_f1(y, bad, good, 4, n_resamples=2000)
    assert swapped["difference"] == pytest.approx(-fast["difference"]) and swapped["p_value"] == fast["p_value"]


def test_paired_small_noise_difference_is_not_significant() -> None:
    y = np.arange(200) % 2
    a = noisy_predictions(y, 2, 0.2, seed=10)
    b = a.copy()
    b[[0, 1]] = 1 - b[[0, 1]]  # flip two items: a tiny, noisy difference
    res = paired_bootstrap_test(accuracy, y, a, b, n_resamples=400, seed=0)
    assert res["p_value"] > 0.05 and res["low"] <= res["difference"] <= res["high"]


def test_fast_paired_equals_generic_path() -> None:
    y = np.arange(150) % 3
    a, b = noisy_predictions(y, 3, 0.2, seed=1), noisy_predictions(y, 3, 0.3, seed=2)
    generic = paired_bootstrap_test(lambda t, p: macro_f1(t, p, 3), y, a, b, n_resamples=100, seed=9)
    fast = paired_bootstrap_macro_f1(y, a, b, 3, n_resamples=100, seed=9)
    assert fast["difference"] == generic["difference"]
    assert fast["low"] == pytest.approx(generic["low"], abs=1e-12)
    assert fast["p_value"] == pytest.approx(generic["p_value"], abs=0.011)


@pytest.mark.parametrize("kwargs", [{"n_resamples": 0}, {"confidence": 1.0}, {"confidence": 0.0}])
def test_invalid_arguments_raise(kwargs: dict) -> None:
    y = np.array([0, 1, 1])
    with pytest.raises(ValueError):
        bootstrap_ci(accuracy, y, y, **kwargs)
    with pytest.raises(ValueError):
        bootstrap_macro_f1(y, y, 2, **kwargs)
    with pytest.raises(ValueError):
        bootstrap_ci(accuracy, y, y[:2])


def test_cluster_bootstrap_with_singleton_groups_is_the_item_bootstrap_and_groups_widen_intervals() -> None:
    from hemaclip.metrics.statistics import bootstrap_macro_f1, cluster_bootstrap_macro_f1, paired_cluster_bootstrap_macro_f1

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    p = np.where(rng.random(300) < 0.8, y, rng.integers(0, 3, 300))
    single = cluster_bootstrap_macro_f1(y, p, 3, np.arange(300))
    item = bootstrap_macro_f1(y, p, 3)
    assert (single["point"], single["low"], single["high"]) == (item["point"], item["low"], item["high"])
    # Five copies of each item: the item bootstrap thinks it has 1,500 independent cells, the cluster one 300.
    y5, p5, g5 = np.repeat(y, 5), np.repeat(p, 5), np.repeat(np.arange(300), 5)
    clustered, naive = cluster_bootstrap_macro_f1(y5, p5, 3, g5), bootstrap_macro_f1(y5, p5, 3)
    assert clustered["high"] - clustered["low"] > 1.8 * (naive["high"] - naive["low"])
    assert paired_cluster_bootstrap_macro_f1(y5, p5, p5, 3, g5)["p_value"] == 1.0


def test_cluster_bootstrap_accuracy_counts_a_group_of_copies_as_one_cell() -> None:
    """Five identical copies of each cell in one group give exactly the interval of the single cells (the copies
    add no evidence), while an item bootstrap over the copies is far narrower; the point is plain accuracy."""
    from hemaclip.metrics.statistics import bootstrap_ci, cluster_bootstrap_accuracy

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))  # class 3: a reading outside the labels, wrong
    single = cluster_bootstrap_accuracy(y, p, 4, np.arange(200))
    copies = cluster_bootstrap_accuracy(np.repeat(y, 5), np.repeat(p, 5), 4, np.repeat(np.arange(200), 5))
    assert single["point"] == pytest.approx(float(np.mean(y == p)))
    assert (copies["point"], copies["low"], copies["high"]) == pytest.approx((single["point"], single["low"], single["high"]))
    naive = bootstrap_ci(lambda a, b: float(np.mean(a == b)), np.repeat(y, 5), np.repeat(p, 5), 2000, seed=0)
    assert copies["high"] - copies["low"] > 1.8 * (naive["high"] - naive["low"])


def test_unpaired_difference_of_two_test_sets_matches_the_normal_approximation() -> None:
    """Two independent test sets (per-image vs cluster split): the interval of the accuracy change is
    about +-1.96 sqrt(pa qa / na + pb qb / nb), and a sample against itself is centred on zero."""
    from hemaclip.metrics.statistics import unpaired_bootstrap_difference

    a = np.r_[np.ones(450), np.zeros(50)]  # 0.90 on 500 items
    b = np.r_[np.ones(570), np.zeros(30)]  # 0.95 on 600 items
    result = unpaired_bootstrap_difference(a, b, n_resamples=4000, seed=0)
    half = 1.96 * np.sqrt(0.9 * 0.1 / 500 + 0.95 * 0.05 / 600)
    assert result["difference"] == pytest.approx(-0.05) and result["n_a"] == 500 and result["n_b"] == 600
    assert result["low"] == pytest.approx(-0.05 - half, abs=0.006) and result["high"] == pytest.approx(-0.05 + half, abs=0.006)
    same = unpaired_bootstrap_difference(a, a, n_resamples=2000, seed=1)
    assert same["difference"] == 0.0 and same["low"] < 0 < same["high"]
    with pytest.raises(ValueError):
        unpaired_bootstrap_difference([], b)
def test_share_intervals_are_wilson_intervals_with_nominal_coverage() -> None:
    from hemaclip.metrics.statistics import share_intervals

    got = share_intervals({"a": 5, "b": 15, "c": 0})
    # Wilson by hand: (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    z, n, p = 1.959963984540054, 20, 0.25
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert got["a"]["share"] == 0.25 and got["a"]["count"] == 5
    assert got["a"]["low"] == pytest.approx((centre - half) / (1 + z * z / n), abs=1e-9)
    assert got["a"]["high"] == pytest.approx((centre + half) / (1 + z * z / n), abs=1e-9)
    assert got["c"]["low"] == 0.0 and 0.0 < got["c"]["high"] < 0.2  # never below zero, not degenerate
    # Coverage of a 3 % class in 150-cell counts stays near 95 %.
    rng = np.random.default_rng(0)
    hits = 0
    for k in rng.binomial(150, 0.03, size=2000):
        ci = share_intervals({"x": int(k), "rest": 150 - int(k)})["x"]
        hits += ci["low"] <= 0.03 <= ci["high"]
    assert 0.92 <= hits / 2000 <= 0.99
