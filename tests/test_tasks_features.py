"""Feature extraction and its disk cache (tiny random model, real images at 32 px), external features."""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest

import hemaclip.tasks.features as features_mod
from hemaclip.data.attributes import ATTRIBUTE_NAMES
from hemaclip.data.datasets import load_dataset
from hemaclip.errors import DataError
from hemaclip.cache import file_sha1
from hemaclip.tasks.features import FeatureSet, extract_features, load_external_features
from hemaclip.tasks.zero_shot import zero_shot_scores


@pytest.fixture(scope="module")
def tiny_model(make_tiny_model):
    return make_tiny_model("vit-tiny-128")


@pytest.fixture(scope="module")
def records(data_root):
    dataset = load_dataset("wbcatt", data_root=data_root)
    picked: dict[tuple[str, str], list] = defaultdict(list)
    for record in dataset.records:
        key = (record.label, record.split)
        if record.split in ("train", "test") and len(picked[key]) < 3:
            picked[key].append(record)
    out = [r for key in sorted(picked) for r in picked[key]]
    assert 20 <= len(out) <= 40
    return out


@pytest.fixture()
def counted(monkeypatch):
    calls = {"n": 0}
    real = features_mod.image_outputs

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(features_mod, "image_outputs", counting)
    return calls


def test_extract_then_cache_hit_is_identical_and_skips_the_model(tiny_model, records, counted) -> None:
    ckpt = f"test-{uuid.uuid4().hex}"
    first = extract_features(tiny_model, records, ckpt, batch_size=16)
    assert counted["n"] == 1
    n = len(records)
    assert first.features.shape == (n, tiny_model.config.embed_dim) and first.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first.features, axis=1), 1.0, rtol=1e-5)
    assert first.class_logits.shape == (n, len(tiny_model.class_names))
    assert set(first.attribute_logits) == set(ATTRIBUTE_NAMES)
    assert first.labels == [r.label for r in records] and first.paths == [str(r.path) for r in records]
    assert first.meta["class_names"] == list(tiny_model.class_names) and first.source == f"checkpoint:{ckpt}"

    second = extract_features(tiny_model, records, ckpt, batch_size=16)
    assert counted["n"] == 1  # served from the cache
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.class_logits, first.class_logits)
    for name in ATTRIBUTE_NAMES:
        np.testing.assert_array_equal(second.attribute_logits[name], first.attribute_logits[name])

    # Labels come from the records, not the cache (same images, another label space).
    relabelled = [replace(r, label="other") for r in records]
    third = extract_features(tiny_model, relabelled, ckpt)
    assert counted["n"] == 1 and set(third.labels) == {"other"}

    extract_features(tiny_model, records, ckpt + "-changed")
    extract_features(tiny_model, records, ckpt, cache=False)
    assert counted["n"] == 3


def test_feature_set_subset_split_and_roundtrip(tiny_model, records, tmp_path) -> None:
    fs = extract_features(tiny_model, records, "roundtrip-test")
    train, test = fs.by_split("train"), fs.by_split("test")
    assert len(train) + len(test) == len(fs) and set(train.splits) == {"train"}
    assert fs.subset([2, 0]).paths == [fs.paths[2], fs.paths[0]]
    path = test.save(tmp_path / "test-features.npz")
    assert path.is_file() and path.with_suffix(".json").is_file()
    loaded = FeatureSet.load(path)
    np.testing.assert_array_equal(loaded.features, test.features)
    np.testing.assert_array_equal(loaded.attribute_logits["cell_size"], test.attribute_logits["cell_size"])
    assert (loaded.labels, loaded.paths, loaded.splits, loaded.attributes) == (test.labels, test.paths, test.splits, test.attributes)
    assert loaded.source == test.source and loaded.meta == test.meta
    with pytest.raises(DataError, match="does not exist"):
        FeatureSet.load(tmp_path / "nothing.npz")
    with pytest.raises(DataError, match="unknown split"):
        fs.by_split("holdout")

    # Zero-shot on features from the same (real, tiny) model: one logit per prompt class.
    prompts = {"basophil": ["a basophil"], "neutrophil": ["a neutrophil", "a segmented neutrophil"]}
    scores = zero_shot_scores(tiny_model, test.features, prompts)
    assert scores.shape == (len(test), 2) and np.all(np.isfinite(scores))


def test_file_sha1(tmp_path) -> None:
    p = tmp_path / "ckpt.pt"
    p.write_bytes(b"weights" * 1000)
    assert file_sha1(p) == hashlib.sha1(b"weights" * 1000).hexdigest()
    with pytest.raises(DataError):
        file_sha1(tmp_path / "missing.pt")


# ---- external features ------------------------------------------------------------------------

ATTRS = {name: "" for name in ATTRIBUTE_NAMES}
GOOD_ATTRS = {
    "cell_size": "big",
    "cell_shape": "round",
    "nucleus_shape": "irregular",
    "nuclear_cytoplasmic_ratio": "low",
    "chromatin_density": "densely",
    "cytoplasm_vacuole": "no",
    "cytoplasm_texture": "clear",
    "cytoplasm_colour": "blue",
    "granule_type": "nil",
    "granule_colour": "nil",
    "granularity": "no",
}


def write_external(tmp_path, features, rows, columns=("path", "label", "split"), name="ext"):
    np.save(tmp_path / f"{name}.npy", features)
    lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
    (tmp_path / f"{name}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / f"{name}.npy", tmp_path / f"{name}.csv"


def external_rows(n):
    return [{"path": f"imgs/{i}.jpg", "label": "ab"[i % 2], "split": "train" if i < n // 2 else "test"} for i in range(n)]


def test_external_features_happy_path(tmp_path) -> None:
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((4, 6)) * 5
    rows = external_rows(4)
    rows[0].update(GOOD_ATTRS)
    rows[1:] = [dict(r, **ATTRS) for r in rows[1:]]
    npy, csv_path = write_external(tmp_path, feats, rows, columns=("path", "label", "split", *ATTRIBUTE_NAMES))
    fs = load_external_features(npy, csv_path)
    assert fs.features.shape == (4, 6) and fs.features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fs.features, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(fs.features, feats / np.linalg.norm(feats, axis=1, keepdims=True), rtol=1e-5)
    assert fs.labels == ["a", "b", "a", "b"] and fs.splits == ["train", "train", "test", "test"]
    assert fs.paths[0] == str(tmp_path / "imgs" / "0.jpg")
    assert fs.attributes[0] == GOOD_ATTRS and fs.attributes[1:] == [None, None, None]
    assert fs.source == "ext" and fs.class_logits is None
    assert len(fs.by_split("test")) == 2

    plain_npy, plain_csv = write_external(tmp_path, feats, external_rows(4), name="plain")
    assert load_external_features(plain_npy, plain_csv, source="DinoBloom-S").source == "DinoBloom-S"


def test_external_features_errors(tmp_path) -> None:
    feats = np.ones((3, 4))
    npy, csv_path = write_external(tmp_path, feats, external_rows(2), name="short")
    with pytest.raises(DataError, match=r"short\.csv: 2 rows but .*short\.npy has 3"):
        load_external_features(npy, csv_path)

    npy, csv_path = write_external(tmp_path, feats, external_rows(3), columns=("path", "label"), name="cols")
    with pytest.raises(DataError, match=r"cols\.csv: missing column\(s\) split"):
        load_external_features(npy, csv_path)

    bad = feats.copy()
    bad[1, 2] = np.nan
    npy, csv_path = write_external(tmp_path, bad, external_rows(3), name="nan")
    with pytest.raises(DataError, match=r"nan\.npy: 1 feature row\(s\) contain NaN"):
        load_external_features(npy, csv_path)

    rows = external_rows(3)
    rows[2]["split"] = "holdout"
    npy, csv_path = write_external(tmp_path, feats, rows, name="split")
    with pytest.raises(DataError, match=r"split\.csv:4: unknown split 'holdout'"):
        load_external_features(npy, csv_path)

    npy, csv_path = write_external(tmp_path, feats, external_rows(3), columns=("path", "label", "split", "cell_size"), name="partial")
    with pytest.raises(DataError, match="missing cell_shape"):
        load_external_features(npy, csv_path)

    with pytest.raises(DataError, match="does not exist"):
        load_external_features(tmp_path / "none.npy", csv_path)
    (tmp_path / "feats.pt").write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported feature file type"):
        load_external_features(tmp_path / "feats.pt", csv_path)

    try:
        import h5py  # noqa: F401
    except ImportError:
        (tmp_path / "feats.h5").write_bytes(b"not really hdf5")
        with pytest.raises(DataError, match=r"feats\.h5: reading \.h5 features needs h5py"):
            load_external_features(tmp_path / "feats.h5", csv_path)
