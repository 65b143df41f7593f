"""Zero-shot tasks with a synthetic model whose text embeddings are known exactly."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hemaclip.errors import DataError
from hemaclip.tasks.features import FeatureSet, l2_normalize
from hemaclip.tasks.zero_shot import ZeroShotSetting, class_embeddings, zero_shot_attributes, zero_shot_classes, zero_shot_scores
from hemaclip.text.prompts import load_prompts

DIM = 16


class FakeText(nn.Module):
    """Each sentence maps to a fixed pseudo-random vector (a trainable parameter disables disk caching)."""

    source = "fake-text"
    max_length = 8
    width = DIM

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def embed_sentences(self, texts, batch_size=64):
        rows = []
        for text in texts:
            seed = int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)
            rows.append(torch.from_numpy(np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)))
        return torch.stack(rows) if rows else torch.empty(0, DIM)


class FakeModel(nn.Module):
    def __init__(self, scale: float = 10.0) -> None:
        super().__init__()
        self.text = FakeText()
        self.config = SimpleNamespace(embed_dim=DIM)
        self.scale = scale

    def encode_text(self, pooled, normalize=True):
        return F.normalize(pooled.float(), dim=-1) if normalize else pooled.float()

    def get_logit_scale(self):
        return torch.tensor(self.scale)


PROMPTS = {"alpha": ["an alpha cell", "a cell of type alpha"], "beta": ["a beta cell"], "gamma": ["gamma", "g cell", "a gamma"]}


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


def test_features_equal_to_a_class_embedding_predict_that_class() -> None:
    model = FakeModel(scale=10.0)
    weights = class_embeddings(model, PROMPTS)
    assert weights.shape == (3, DIM)
    np.testing.assert_allclose(np.linalg.norm(weights, axis=1), 1.0, rtol=1e-5)
    features = weights[[2, 0, 1, 1]]
    scores = zero_shot_scores(model, features, PROMPTS)
    assert scores.shape == (4, 3) and scores.dtype == np.float32
    assert scores.argmax(axis=1).tolist() == [2, 0, 1, 1]
    assert scores[0, 2] == pytest.approx(10.0, rel=1e-5)  # logit_scale x cosine 1
    # Column order follows the prompt dict's order.
    reordered = {k: PROMPTS[k] for k in ("gamma", "alpha", "beta")}
    assert zero_shot_scores(model, features, reordered).argmax(axis=1).tolist() == [0, 1, 2, 2]


def test_feature_width_mismatch_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="embedding width"):
        zero_shot_scores(FakeModel(), np.ones((2, DIM + 1), dtype=np.float32), PROMPTS)


def test_zero_shot_classes_counts_missing_labels() -> None:
    model = FakeModel()
    prompt_set = load_prompts()
    class_w = class_embeddings(model, prompt_set.class_prompts("wbcatt"))
    labels = ["basophil", "neutrophil", "platelet", "eosinophil", "platelet"]
    fs = feature_set(class_w[[0, 4, 1, 1, 2]], labels)
    out = zero_shot_classes(ZeroShotSetting(model, prompt_set, "wbcatt"), fs)
    assert out["class_names"] == list(prompt_set.classes("wbcatt"))
    assert out["missing_labels"] == 2 and out["missing_label_counts"] == {"platelet": 2}
    assert out["y_true"] == ["basophil", "neutrophil", "eosinophil"]
    assert out["indices"].tolist() == [0, 1, 3]
    assert out["logits"].shape == (3, 5)
    assert out["logits"].argmax(axis=1).tolist() == [0, 4, 1]

    sub = zero_shot_classes(ZeroShotSetting(model, prompt_set, "wbcatt", classes=["neutrophil", "basophil"]), fs)
    assert sub["class_names"] == ["neutrophil", "basophil"] and sub["missing_labels"] == 3
    with pytest.raises(DataError, match="no 'wbcatt' prompts"):
        zero_shot_classes(ZeroShotSetting(model, prompt_set, "wbcatt", classes=["platelet"]), fs)


def test_zero_shot_attributes_only_rows_with_attributes() -> None:
    model = FakeModel()
    prompt_set = load_prompts()
    size_w = class_embeddings(model, prompt_set.attribute_prompts()["cell_size"])  # big, small
    attrs = [{"cell_size": "big", "granularity": "yes"}, None, {"cell_size": "small", "granularity": "no"}]
    fs = feature_set(np.stack([size_w[0], size_w[0], size_w[1]]), ["a", "b", "c"], attrs)
    out = zero_shot_attributes(model, fs, prompt_set, attributes=["cell_size", "granularity"])
    assert set(out) == {"cell_size", "granularity"}
    cs = out["cell_size"]
    assert cs["values"] == ["big", "small"] and cs["y_true"] == ["big", "small"]
    assert cs["missing_attributes"] == 1 and cs["indices"].tolist() == [0, 2]
    assert cs["logits"].shape == (2, 2) and cs["logits"].argmax(axis=1).tolist() == [0, 1]
    assert out["granularity"]["values"] == ["yes", "no"]
    with pytest.raises(DataError, match="unknown attribute"):
        zero_shot_attributes(model, fs, prompt_set, attributes=["colour"])


def test_zero_shot_setting_is_one_frozen_reading_of_the_classes() -> None:
    """The setting keeps its own copy of the classes (a caller's list changed later changes nothing), cannot be
    changed, and refuses a class without prompts in one line before any text is embedded."""
    import dataclasses

    model, prompt_set = FakeModel(), load_prompts()
    chosen = ["neutrophil", "basophil"]
    setting = ZeroShotSetting(model, prompt_set, "wbcatt", classes=chosen)
    chosen.append("platelet")
    assert setting.classes == ("neutrophil", "basophil")
    assert list(setting.class_prompts()) == ["neutrophil", "basophil"]
    assert setting.class_prompts() == {c: prompt_set.class_prompts("wbcatt")[c] for c in ("neutrophil", "basophil")}
    with pytest.raises(dataclasses.FrozenInstanceError):
        setting.dataset = "pbc"  # type: ignore[misc]
    with pytest.raises(DataError, match="no 'wbcatt' prompts for class\\(es\\) platelet"):
        ZeroShotSetting(model, prompt_set, "wbcatt", classes=chosen).class_prompts()
    assert list(ZeroShotSetting(model, prompt_set, "wbcatt").class_prompts()) == list(prompt_set.classes("wbcatt"))
