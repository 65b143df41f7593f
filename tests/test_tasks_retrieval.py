"""Retrieval tasks: relevance matrices from hand-made labels, and top-k matching the full ranking."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hemaclip.errors import DataError
from hemaclip.metrics.retrieval import retrieval_metrics
from hemaclip.tasks.features import FeatureSet, l2_normalize
from hemaclip.models.inference import embed_texts
from hemaclip.tasks.retrieval import (
    image_to_image,
    image_to_text_by_class,
    paired_image_text,
    ranked_topk,
    text_to_image_by_attribute,
    text_to_image_by_class,
)
from hemaclip.tasks.zero_shot import ZeroShotSetting, class_embeddings

DIM = 12


class FakeText(nn.Module):
    source = "fake-text-retrieval"
    max_length = 8
    width = DIM

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))  # trainable -> never cached on disk

    def embed_sentences(self, texts, batch_size=64):
        rows = [
            np.random.default_rng(int(hashlib.sha1(t.encode()).hexdigest()[:8], 16)).standard_normal(DIM).astype(np.float32)
            for t in texts
        ]
        return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, DIM)


class FakeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.text = FakeText()
        self.config = SimpleNamespace(embed_dim=DIM)

    def encode_text(self, pooled, normalize=True):
        return F.normalize(pooled.float(), dim=-1)

    def get_logit_scale(self):
        return torch.tensor(1.0)


class StubPrompts:
    source = "stub-prompts"

    def class_prompts(self, dataset, wording="train"):
        assert dataset == "toy" and wording == "train"
        return {"a": ["an a", "the a"], "b": ["a b"], "c": ["c one", "c two", "c three"]}

    def attribute_prompts(self, wording="train"):
        assert wording == "train"
        return {"size": {"big": ["big"], "small": ["small", "tiny"]}, "shape": {"round": ["round"], "odd": ["odd"]}}


def feature_set(features, labels, attributes=None) -> FeatureSet:
    n = len(labels)
    return FeatureSet(
        features=l2_normalize(features),
        labels=list(labels),
        paths=[f"/img/{i}.jpg" for i in range(n)],
        splits=["test"] * n,
        attributes=list(attributes) if attributes is not None else [None] * n,
        source="synthetic",
    )


def test_image_to_image_relevance_excludes_self() -> None:
    feats = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.8, 0.3]], dtype=np.float32)
    fs = feature_set(feats, ["a", "a", "b", "b", "a"])
    out = image_to_image(fs, k=None)
    assert out["scores"].shape == (5, 4) and out["k"] == 4
    for i in range(5):
        assert i not in out["indices"][i].tolist()
        assert sorted(out["indices"][i].tolist()) == [j for j in range(5) if j != i]
        assert np.all(np.diff(out["scores"][i]) <= 0)
    labels = np.array(fs.labels)
    np.testing.assert_array_equal(out["relevant"], labels[out["indices"]] == labels[:, None])
    assert out["n_relevant"].tolist() == [2, 2, 1, 1, 2]
    assert out["indices"][0, 0] == 1 and out["relevant"][0, :2].all()  # nearest are the other 'a's
    top2 = image_to_image(fs, k=2)
    np.testing.assert_array_equal(top2["indices"], out["indices"][:, :2])
    np.testing.assert_array_equal(top2["relevant"], out["relevant"][:, :2])


def test_topk_ties_go_to_lower_gallery_index_and_match_full_metrics() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 8))
    feats = l2_normalize(base[rng.integers(0, 6, size=60)])  # many exact duplicates -> ties
    labels = [f"c{i % 4}" for i in range(60)]
    fs = feature_set(feats, labels)
    full = image_to_image(fs, k=None)
    top = image_to_image(fs, k=7)
    np.testing.assert_array_equal(top["indices"], full["indices"][:, :7])
    for row_scores, row_idx in zip(full["scores"], full["indices"]):
        order = np.lexsort((row_idx, -row_scores))
        assert order.tolist() == list(range(len(order)))  # sorted by score, ties by index
    # hit/precision/mrr at k <= 7 agree between the top-k and the full matrices
    m_full = retrieval_metrics(full["scores"], full["relevant"], ks=(1, 5, 7))
    m_top = retrieval_metrics(top["scores"], top["relevant"], ks=(1, 5, 7))
    for key in ("hit@1", "hit@5", "precision@5", "precision@7", "mrr@7"):
        assert m_top[key] == pytest.approx(m_full[key])
    recall5 = np.mean(top["relevant"][:, :5].sum(1) / top["n_relevant"])
    assert recall5 == pytest.approx(m_full["recall@5"])


def test_ranked_topk_small_chunks(monkeypatch) -> None:
    import hemaclip.tasks.retrieval as retrieval

    monkeypatch.setattr(retrieval, "_BLOCK_ELEMENTS", 7)  # one query row per chunk
    rng = np.random.default_rng(1)
    q, g = l2_normalize(rng.standard_normal((9, 5))), l2_normalize(rng.standard_normal((13, 5)))
    out = ranked_topk(q, g, 4, lambda rows, cols: cols % 2 == 0)
    expected = np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(out["indices"], expected)
    np.testing.assert_array_equal(out["relevant"], expected % 2 == 0)


def test_text_to_image_by_class_relevance() -> None:
    model, prompts = FakeModel(), StubPrompts()
    w = class_embeddings(model, prompts.class_prompts("toy"))
    fs = feature_set(w[[1, 0, 2, 1]], ["b", "a", "c", "z"])
    out = text_to_image_by_class(ZeroShotSetting(model, prompts, "toy"), fs)
    assert out["queries"] == ["a", "b", "c"]
    expected = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(out["relevant"], expected)
    assert out["scores"].shape == (3, 4) and out["n_relevant"].tolist() == [1, 1, 1]
    assert out["n_unmatched"] == 1
    assert out["scores"][0].argmax() == 1 and out["scores"][2].argmax() == 2


def test_text_to_image_by_attribute_relevance() -> None:
    model, prompts = FakeModel(), StubPrompts()
    attrs = [{"size": "big", "shape": "odd"}, None, {"size": "small", "shape": "odd"}, {"size": "big", "shape": "round"}]
    fs = feature_set(np.eye(4, DIM), ["x"] * 4, attrs)
    out = text_to_image_by_attribute(model, fs, prompts)
    assert out["queries"] == ["size=big", "size=small", "shape=round", "shape=odd"]
    assert out["indices"].tolist() == [0, 2, 3] and out["missing_attributes"] == 1
    expected = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1], [1, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(out["relevant"], expected)
    assert out["scores"].shape == (4, 3)
    with pytest.raises(DataError, match="unknown attribute"):
        text_to_image_by_attribute(model, fs, prompts, attributes=["colour"])


def test_image_to_text_by_class_relevance() -> None:
    model, prompts = FakeModel(), StubPrompts()
    texts = embed_texts(model, ["c two"])
    fs = feature_set(np.concatenate([texts, np.eye(2, DIM)]), ["c", "a", "q"])
    out = image_to_text_by_class(ZeroShotSetting(model, prompts, "toy"), fs)
    assert out["gallery"] == ["an a", "the a", "a b", "c one", "c two", "c three"]
    assert out["gallery_labels"] == ["a", "a", "b", "c", "c", "c"]
    assert out["indices"].tolist() == [0, 1] and out["missing_labels"] == 1
    expected = np.array([[0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(out["relevant"], expected)
    assert out["scores"][0].argmax() == 4  # the image equals the embedding of "c two"


def test_paired_image_text_full_and_topk() -> None:
    model = FakeModel()
    captions = [f"caption {i}" for i in range(7)]
    fs = feature_set(embed_texts(model, captions), [f"l{i}" for i in range(7)])
    full = paired_image_text(model, fs, captions)
    i2t, t2i = full["image_to_text"], full["text_to_image"]
    assert i2t["scores"].shape == (7, 7)
    np.testing.assert_array_equal(i2t["relevant"], np.eye(7, dtype=bool))
    np.testing.assert_allclose(t2i["scores"], i2t["scores"].T)
    assert i2t["scores"].argmax(axis=1).tolist() == list(range(7))
    top = paired_image_text(model, fs, captions, k=3)
    assert top["image_to_text"]["indices"][:, 0].tolist() == list(range(7))
    assert top["text_to_image"]["relevant"][:, 0].all() and top["text_to_image"]["relevant"].sum() == 7
    with pytest.raises(DataError, match="one caption per image"):
        paired_image_text(model, fs, captions[:-1])
