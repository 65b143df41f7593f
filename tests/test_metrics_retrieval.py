"""Retrieval metrics with a relevance matrix: hand-computed cases, ties, and open_clip's paired R@k."""

from __future__ import annotations

import math

import numpy as np
import pytest

import hemaclip.metrics.retrieval as retrieval
from hemaclip.metrics.retrieval import paired_recall_at_k, relevance_from_labels, retrieval_metrics

# Query 0: ranking by score is g0 g2 g4 g3 g5 g1; relevant are g1, g2, g4 -> pattern F T T F F T.
# Query 1: nothing relevant.
SCORES = np.array(
    [
        [0.9, 0.1, 0.8, 0.3, 0.7, 0.2],
        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
    ]
)
RELEVANT = np.array(
    [
        [False, True, True, False, True, False],
        [False, False, False, False, False, False],
    ]
)


def test_query_with_three_relevant_items_hand_computed() -> None:
    m = retrieval_metrics(SCORES[:1], RELEVANT[:1], ks=(1, 3, 5, 10))
    assert m["hit@1"] == 0.0 and m["hit@3"] == 1.0
    assert m["precision@1"] == 0.0
    assert m["precision@3"] == pytest.approx(2 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["precision@5"] == pytest.approx(2 / 5) and m["recall@5"] == pytest.approx(2 / 3)
    # k beyond the gallery: all 6 items retrieved; precision still divides by k.
    assert m["recall@10"] == 1.0 and m["precision@10"] == pytest.approx(3 / 10)
    assert m["mrr@1"] == 0.0 and m["mrr@3"] == 0.5 and m["mrr"] == 0.5
    assert m["n_queries"] == 1 and m["n_gallery"] == 6 and m["n_queries_without_relevant"] == 0


def test_query_without_relevant_items_is_excluded_from_recall_only() -> None:
    m = retrieval_metrics(SCORES, RELEVANT, ks=(3,))
    assert m["n_queries_without_relevant"] == 1 and m["n_queries"] == 2
    assert m["recall@3"] == pytest.approx(2 / 3)  # only query 0
    assert m["hit@3"] == 0.5 and m["precision@3"] == pytest.approx(1 / 3) and m["mrr@3"] == 0.25
    none = retrieval_metrics(SCORES[1:], RELEVANT[1:], ks=(1,))
    assert math.isnan(none["recall@1"]) and none["hit@1"] == 0.0


def test_non_paired_relevant_item_counts_as_hit() -> None:
    # Two images of the same class: image 0 ranks caption 1 first, which describes the same class.
    scores = np.array([[0.2, 0.9, 0.1], [0.3, 0.8, 0.1], [0.1, 0.2, 0.7]])
    labels = np.array(["neutrophil", "neutrophil", "lymphocyte"])
    relevant = relevance_from_labels(labels, labels)
    m = retrieval_metrics(scores, relevant, ks=(1,))
    assert m["hit@1"] == 1.0 and m["mrr"] == 1.0
    assert m["recall@1"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    paired = paired_recall_at_k(scores, ks=(1, 2))
    assert paired["R@1"] == pytest.approx(2 / 3)  # query 0's own caption is only 2nd
    assert paired["R@2"] == 1.0


def test_ties_are_broken_by_gallery_index() -> None:
    scores = np.array([[0.5, 0.5, 0.5, 0.1], [0.5, 0.5, 0.5, 0.1]])
    relevant = np.array([[False, True, False, False], [True, False, False, False]])
    m = retrieval_metrics(scores, relevant, ks=(1, 2))
    assert m["hit@1"] == 0.5 and m["hit@2"] == 1.0
    assert m["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    # Same convention in the paired metric: query 1's pair (g1) ties with g0, which comes first.
    paired = paired_recall_at_k(scores[:, :4], ks=(1, 2, 3))
    assert paired["R@1"] == 0.5 and paired["R@2"] == 1.0
    assert paired["mean_rank"] == 1.5


def test_paired_recall_matches_open_clip_definition_and_identity_relevance() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 40)) + 1.5 * np.eye(40)
    ks = (1, 5, 10)
    ranking = np.argsort(-scores, axis=1)
    preds = np.nonzero(ranking == np.arange(40)[:, None])[1]  # open_clip: rank of the ground truth
    paired = paired_recall_at_k(scores, ks)
    for k in ks:
        assert paired[f"R@{k}"] == pytest.approx(np.mean(preds < k))
    assert paired["mean_rank"] == pytest.approx(preds.mean() + 1)
    assert paired["median_rank"] == np.floor(np.median(preds)) + 1
    rounded = np.round(scores, 1)  # many ties
    m = retrieval_metrics(rounded, np.eye(40, dtype=bool), ks=ks)
    p = paired_recall_at_k(rounded, ks)
    for k in ks:
        assert m[f"hit@{k}"] == p[f"R@{k}"] == m[f"recall@{k}"]


def test_block_processing_gives_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=(25, 30)), 1)
    relevant = rng.random((25, 30)) < 0.1
    full = retrieval_metrics(scores, relevant)
    paired = paired_recall_at_k(scores)
    monkeypatch.setattr(retrieval, "_BLOCK_ELEMENTS", 70)
    assert retrieval_metrics(scores, relevant) == full
    assert paired_recall_at_k(scores) == paired


def test_relevance_from_labels() -> None:
    rel = relevance_from_labels([0, 1, 0], [1, 0, 0, 2])
    np.testing.assert_array_equal(rel, [[0, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 0]])
    assert rel.dtype == bool
    attrs_q = np.array([["round", "pink"], ["oval", "pink"]])
    attrs_g = np.array([["round", "pink"], ["round", "blue"], ["oval", "pink"]])
    np.testing.assert_array_equal(relevance_from_labels(attrs_q, attrs_g), [[1, 0, 0], [0, 0, 1]])
    with pytest.raises(ValueError):
        relevance_from_labels([0, 1], attrs_g)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        retrieval_metrics(SCORES, RELEVANT[:, :3])
    with pytest.raises(ValueError):
        retrieval_metrics(np.array([[np.nan, 1.0]]), np.array([[True, False]]))
    with pytest.raises(ValueError):
        retrieval_metrics(SCORES, RELEVANT, ks=(0,))
    with pytest.raises(ValueError):
        paired_recall_at_k(np.zeros((3, 2)))
