"""Shortcut readers and the cluster-grouped split: features measure what they say, a reader is fitted on the
train split only (C on val) and scores test, and no group (cluster) ever spans two splits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from hemaclip.tasks import shortcuts
from hemaclip.tasks.shortcuts import colour_histogram, colour_statistics, fit_shortcut, tiny_pixels


def test_colour_features_measure_what_they_say() -> None:
    flat = np.zeros((1, 32, 32, 3), dtype=np.uint8) + np.array([255, 128, 0], dtype=np.uint8)
    stats = colour_statistics(flat)[0]
    assert stats.shape == (15,)
    np.testing.assert_allclose(stats[:3], [1.0, 128 / 255, 0.0])  # means
    np.testing.assert_allclose(stats[3:6], 0.0, atol=1e-12)  # sds
    np.testing.assert_allclose(stats[6:], np.tile([1.0, 128 / 255, 0.0], 3))  # 10/50/90th percentiles
    half = np.zeros((1, 4, 4, 3), dtype=np.uint8)
    half[0, :2] = 255
    hist = colour_histogram(half)[0]
    assert hist.shape == (512,) and np.isclose((hist**2).sum(), 1.0)  # square-rooted shares
    assert np.count_nonzero(hist) == 2 and np.isclose(hist[0] ** 2, 0.5) and np.isclose(hist[-1] ** 2, 0.5)
    assert tiny_pixels(np.zeros((2, 8, 8, 3), dtype=np.uint8)).shape == (2, 192)


def _separable(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 3, n)
    return rng.normal(size=(n, 5)) + np.eye(3, 5)[y] * 2.0, y


def test_shortcut_reader_is_fitted_on_train_only_and_scores_test(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.pipeline import Pipeline

    rng = np.random.default_rng(0)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (_separable(rng, n) for n in (120, 40, 60))
    seen: list[np.ndarray] = []
    real_fit = Pipeline.fit
    monkeypatch.setattr(Pipeline, "fit", lambda self, X, y=None, **kw: (seen.append(np.asarray(X)), real_fit(self, X, y, **kw))[1])
    features = {"train": x_train, "val": x_val, "test": x_test}
    fit = fit_shortcut(features, {"train": y_train, "val": y_val}, 3)  # the test labels are not even passed
    assert seen and all(np.array_equal(x, x_train) for x in seen)  # every fit (one per C) saw the train rows only
    assert fit["n_train"] == 120 and set(fit["predictions"]) == {"val", "test"} and len(fit["predictions"]["test"]) == 60
    assert np.mean(fit["predictions"]["test"] == y_test) > 0.8
    # other test images change neither the chosen C nor the fitted model: test only scores
    other = fit_shortcut({**features, "test": rng.normal(size=(7, 5))}, {"train": y_train, "val": y_val}, 3)
    assert other["C"] == fit["C"] and len(other["predictions"]["test"]) == 7
    np.testing.assert_array_equal(other["model"][-1].coef_, fit["model"][-1].coef_)
    # C is chosen on val: the best validation accuracy over the grid
    best = max(fit["val_by_C"].values(), key=lambda v: (v[0], v[1]))
    assert fit["val_by_C"][f"{fit['C']:g}"] == best


def _fake_all_set(root: Path, rng: np.random.Generator) -> None:
    """A tiny ALL-shaped folder: each class photographed under two or three colour casts (batches)."""
    from PIL import Image

    from hemaclip.data.attributes import ALL_FOLDERS

    for c, folder in enumerate(ALL_FOLDERS):
        (root / "all_aria" / folder).mkdir(parents=True)
        for batch in range(2 + c % 2):
            cast = rng.integers(60, 230, 3)
            for i in range(6):
                pixels = np.clip(cast + rng.normal(0, 6, (24, 24, 3)), 0, 255).astype(np.uint8)
                pixels[8:16, 8:16] = rng.integers(0, 255, 3)  # a distinct "cell", so no two files are duplicates
                Image.fromarray(pixels).save(root / "all_aria" / folder / f"{folder}-{batch}-{i}.png")


def _splits_of_clusters(split_file: Path) -> dict[str, set[str]]:
    with split_file.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    splits_of: dict[str, set[str]] = {}
    for row in rows:
        splits_of.setdefault(row["group"], set()).add(row["split"])
    return splits_of


def test_cluster_grouped_split_leaves_no_cluster_across_splits(tmp_path: Path) -> None:
    from hemaclip.data.datasets import load_dataset
    from hemaclip.tasks.leukaemia import cluster_audit, make_cluster_split, split_file

    _fake_all_set(tmp_path / "data", np.random.default_rng(0))
    split_dir = tmp_path / "splits"
    assignment = make_cluster_split(split_dir, tmp_path / "data", k=8)
    splits_of = _splits_of_clusters(split_file(split_dir))
    assert len(assignment) == 60 and len(splits_of) == 8
    assert all(len(s) == 1 for s in splits_of.values())  # read from the saved file itself, not only by the audit
    audit = cluster_audit(split_dir)
    assert audit["clusters_in_two_splits"] == 0 and sum(audit["clusters_per_split"].values()) == 8
    assert audit["split_sizes"]["train"] > 0 and audit["split_sizes"]["test"] > 0
    # training reads exactly this split from the run's splits/ folder, and a second call keeps it
    dataset = load_dataset("all", data_root=tmp_path / "data", split_dir=split_dir)
    assert {str(r.path.relative_to(tmp_path / "data")): r.split for r in dataset.records} == assignment
    before = split_file(split_dir).read_bytes()
    assert make_cluster_split(split_dir, tmp_path / "data", k=3) == assignment and split_file(split_dir).read_bytes() == before


@pytest.mark.slow
def test_cluster_split_of_the_all_set_leaves_no_cluster_across_splits(data_root: Path, tmp_path: Path) -> None:
    from hemaclip.tasks.leukaemia import CLUSTER_K, cluster_audit, make_cluster_split, split_file

    split_dir = tmp_path / "splits"
    assignment = make_cluster_split(split_dir, data_root)
    splits_of = _splits_of_clusters(split_file(split_dir))
    assert len(assignment) == 3216 and len(splits_of) == CLUSTER_K and all(len(s) == 1 for s in splits_of.values())
    audit = cluster_audit(split_dir)
    assert audit["clusters_in_two_splits"] == 0 and all(n > 0 for n in audit["split_sizes"].values())


def test_shortcut_readers_of_the_study_fit_on_its_train_split(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hemaclip.tasks.leukaemia import predict_shortcuts, study_records

    calls = []
    real = shortcuts.fit_shortcut
    monkeypatch.setattr(shortcuts, "fit_shortcut", lambda features, labels, n, **kw: (calls.append((features, labels)), real(features, labels, n, **kw))[1])
    out = predict_shortcuts(tmp_path / "splits", data_root, max_eval_images=8)
    _, records = study_records(tmp_path / "splits", data_root, max_eval_images=8)
    assert set(out["predictions"]) == {f"{name}:logistic" for name in shortcuts.SHORTCUTS} and len(calls) == len(shortcuts.SHORTCUTS)
    for (features, labels), name in zip(calls, shortcuts.SHORTCUTS):
        assert set(labels) == {"train", "val"}  # never the test labels
        np.testing.assert_array_equal(features["train"], shortcuts.shortcut_features(name, [r.path for r in records["train"]]))
        np.testing.assert_array_equal(features["test"], shortcuts.shortcut_features(name, [r.path for r in records["test"]]))
        assert out["fits"][name]["n_train"] == len(records["train"])
    assert all(len(p["test"]) == len(out["truth"]["test"]) == len(records["test"]) for p in out["predictions"].values())
