"""Probes on synthetic features: separable data, n-shot sampling, attribute labels, the LVLM subset."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from hemaclip.errors import DataError
from hemaclip.tasks.features import FeatureSet, l2_normalize
from hemaclip.tasks.probes import (
    GPT4O_FEW_SHOT_WEIGHTED_F1,
    GPT4O_ZERO_SHOT_WEIGHTED_F1,
    LVLM_BENCHMARK_PRESET,
    attribute_labels,
    knn_probe,
    logistic_probe,
    lvlm_test_subset,
    mlp_probe,
    nshot_curve,
    run_probes,
)

CLASSES = ("basophil", "eosinophil", "lymphocyte")


def clusters(per_class, seed=0, dim=8, noise=0.05, offset=0):
    """Points near orthogonal directions, one direction per class (linearly separable)."""
    rng = np.random.default_rng(seed)
    feats, labels = [], []
    for c, n in zip(CLASSES, per_class):
        centre = np.eye(dim)[CLASSES.index(c)]
        feats.append(centre + noise * rng.standard_normal((n, dim)))
        labels += [c] * n
    return np.concatenate(feats).astype(np.float32), labels


def feature_set(features, labels, split, attributes=None, prefix="") -> FeatureSet:
    n = len(labels)
    return FeatureSet(
        features=l2_normalize(features),
        labels=list(labels),
        paths=[f"/img/{prefix}{split}{i:04d}.jpg" for i in range(n)],
        splits=[split] * n,
        attributes=list(attributes) if attributes is not None else [None] * n,
        source="synthetic",
    )


def test_single_probes_on_separable_features() -> None:
    Xtr, ytr = clusters((20, 20, 20), seed=0)
    Xte, yte = clusters((10, 10, 10), seed=1)
    pred, proba = logistic_probe(Xtr, ytr, Xte)
    assert np.mean(pred == np.array(yte)) == 1.0
    assert proba.shape == (30, 3) and np.allclose(proba.sum(1), 1.0)
    assert proba.argmax(1).tolist() == [CLASSES.index(y) for y in yte]  # columns in sorted class order
    for k in (1, 20):
        pred, proba = knn_probe(Xtr, ytr, Xte, k=k)
        assert np.mean(pred == np.array(yte)) == 1.0 and np.allclose(proba.sum(1), 1.0)
    pred, _ = mlp_probe(Xtr, ytr, Xte, seed=0)
    assert np.mean(pred == np.array(yte)) == 1.0


def test_knn_tie_goes_to_more_similar_class() -> None:
    Xtr = np.array([[1.0, 0.0], [0.0, 1.0]])
    pred, proba = knn_probe(Xtr, ["x", "y"], np.array([[0.2, 1.0], [1.0, 0.1]]), k=2)
    assert pred.tolist() == ["y", "x"] and proba.tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_run_probes_train_on_train_test_on_test() -> None:
    Xtr, ytr = clusters((15, 15, 15), seed=0)
    Xte, yte = clusters((5, 6, 7), seed=1)
    train, test = feature_set(Xtr, ytr, "train"), feature_set(Xte, yte, "test")
    out = run_probes(train, test, kinds=("logistic", "knn1", "knn20"))
    assert set(out) == {"logistic", "knn1", "knn20"}
    for result in out.values():
        assert result["y_true"] == yte and len(result["y_pred"]) == 18
        assert result["classes"] == list(CLASSES) and result["n_train"] == 45
        assert result["y_pred"] == yte
    assert out["logistic"]["proba"].shape == (18, 3)
    with pytest.raises(DataError, match="share 1 image"):
        run_probes(train, train.subset([0]), kinds=("knn1",))
    with pytest.raises(DataError, match="unknown probe"):
        run_probes(train, test, kinds=("svm",))


def test_attribute_probe_excludes_rows_without_attributes() -> None:
    Xtr, ytr = clusters((10, 10, 10), seed=0)
    Xte, yte = clusters((4, 4, 4), seed=1)
    size = {"basophil": "small", "eosinophil": "big", "lymphocyte": "small"}
    attrs_tr = [{"cell_size": size[y]} if i % 5 else None for i, y in enumerate(ytr)]
    attrs_te = [{"cell_size": size[y]} if i != 0 else None for i, y in enumerate(yte)]
    train = feature_set(Xtr, ytr, "train", attrs_tr)
    test = feature_set(Xte, yte, "test", attrs_te)
    out = run_probes(train, test, kinds=("logistic", "knn1"), label_fn=attribute_labels("cell_size"))
    res = out["logistic"]
    assert res["excluded_train"] == 6 and res["excluded_test"] == 1
    assert res["n_train"] == 24 and res["n_test"] == 11
    assert res["classes"] == ["big", "small"]
    assert res["y_pred"] == res["y_true"]


def test_nshot_curve_rows_and_per_class_counts() -> None:
    Xtr, ytr = clusters((30, 30, 3), seed=0)  # lymphocyte has only 3 training images
    Xte, yte = clusters((5, 5, 5), seed=1)
    train, test = feature_set(Xtr, ytr, "train"), feature_set(Xte, yte, "test")
    shots, seeds, kinds = (1, 5, 10), (0, 1), ("logistic", "knn1")
    rows = nshot_curve(train, test, shots=shots, seeds=seeds, kinds=kinds)
    assert len(rows) == len(shots) * len(seeds) * len(kinds)
    assert {(r["kind"], r["shots"], r["seed"]) for r in rows} == {(k, n, s) for k in kinds for n in shots for s in seeds}
    for r in rows:
        n = r["shots"]
        assert r["per_class"] == {"basophil": n, "eosinophil": n, "lymphocyte": min(n, 3)}
        assert r["n_train"] == sum(r["per_class"].values())
        assert len(r["y_pred"]) == len(r["y_true"]) == 15
        if n >= 5:
            assert r["y_pred"] == yte
    again = nshot_curve(train, test, shots=(5,), seeds=(1,), kinds=("knn1",))
    same = next(r for r in rows if (r["kind"], r["shots"], r["seed"]) == ("knn1", 5, 1))
    assert again[0]["y_pred"] == same["y_pred"]


def test_lvlm_subset_is_capped_and_deterministic() -> None:
    X, y = clusters((70, 40, 55), seed=3)
    test = feature_set(X, y, "test")
    extra_train = feature_set(*clusters((5, 5, 5), seed=4), "train", prefix="t")
    both = FeatureSet(
        features=np.concatenate([test.features, extra_train.features]),
        labels=test.labels + extra_train.labels,
        paths=test.paths + extra_train.paths,
        splits=test.splits + extra_train.splits,
        attributes=test.attributes + extra_train.attributes,
    )
    sub = lvlm_test_subset(both, per_class=50, seed=0)
    assert Counter(sub.labels) == {"basophil": 50, "eosinophil": 40, "lymphocyte": 50}
    assert set(sub.splits) == {"test"}
    assert lvlm_test_subset(both, per_class=50, seed=0).paths == sub.paths
    shuffled = both.subset(np.random.default_rng(9).permutation(len(both)))
    assert sorted(lvlm_test_subset(shuffled, per_class=50, seed=0).paths) == sorted(sub.paths)
    assert sorted(lvlm_test_subset(both, per_class=50, seed=1).paths) != sorted(sub.paths)
    assert LVLM_BENCHMARK_PRESET.per_class == 50 and LVLM_BENCHMARK_PRESET.seed == 0
    assert LVLM_BENCHMARK_PRESET.reference_weighted_f1["gpt-4o zero-shot"] == GPT4O_ZERO_SHOT_WEIGHTED_F1 == 0.22
    assert LVLM_BENCHMARK_PRESET.reference_weighted_f1["gpt-4o few-shot"] == GPT4O_FEW_SHOT_WEIGHTED_F1 == 0.36
