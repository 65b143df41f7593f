"""Unfamiliarity: per-cell score and flag fitted on train/val only, the folder-level shift verdict, and
`describe` reporting boxes, flags and the folder warning through the installed entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemaclip.data.paths import repo_default_data_root
from hemaclip.tasks.familiarity import FLAG_QUANTILE, METHODS, SHIFTED_FOLDER_QUANTILE, fit_familiarity, load_familiarity

DATA = repo_default_data_root()


def _clusters(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, list[str]]:
    """Three classes around orthogonal centres in 32 dimensions; `shift` moves every point along eight
    further axes that no class uses (another lab: the whole folder off the training distribution)."""
    dims = 32
    centres = np.eye(dims)[:3] * 4
    offset = np.zeros(dims)
    offset[3:11] = shift
    labels = rng.integers(0, 3, n)
    return centres[labels] + rng.normal(scale=0.5, size=(n, dims)) + offset, [f"c{k}" for k in labels]


@pytest.mark.parametrize("method", METHODS)
def test_threshold_flags_the_chosen_share_of_validation_and_far_points(method: str) -> None:
    rng = np.random.default_rng(0)
    train, labels = _clusters(rng, 600)
    val, _ = _clusters(rng, 400)
    familiarity = fit_familiarity(train, labels, val, "sha", "synthetic", method=method)
    assert familiarity.method == method
    assert abs(familiarity.flags(familiarity.score(val)).mean() - (1 - FLAG_QUANTILE)) < 0.01
    test, _ = _clusters(rng, 2000)
    assert familiarity.flags(familiarity.score(test)).mean() < 0.07
    far, _ = _clusters(rng, 200, shift=3.0)
    assert familiarity.flags(familiarity.score(far)).mean() > 0.9


@pytest.mark.parametrize("method", METHODS)
def test_folder_shift_fires_on_a_shifted_folder_and_not_on_in_lab_folders(method: str) -> None:
    rng = np.random.default_rng(1)
    train, labels = _clusters(rng, 600)
    val, _ = _clusters(rng, 1500)  # enough that the 96th percentile itself is stable across 50 folders
    familiarity = fit_familiarity(train, labels, val, "sha", "synthetic", method=method)
    in_lab = [familiarity.folder_shift(familiarity.score(_clusters(rng, 60)[0])) for _ in range(50)]
    assert not any(v.shifted for v in in_lab)
    shifted = familiarity.folder_shift(familiarity.score(_clusters(rng, 60, shift=1.0)[0]))
    assert shifted.shifted and "readings may be unreliable" in shifted.message and "hemaclip review" in shifted.message
    assert familiarity.folder_shift(familiarity.score(val[:5])) is None  # too few cells for a verdict


def test_a_shifted_folder_is_judged_by_the_stricter_bar_and_an_in_lab_folder_by_the_in_lab_threshold() -> None:
    rng = np.random.default_rng(2)
    train, labels = _clusters(rng, 600)
    val, _ = _clusters(rng, 1500)
    familiarity = fit_familiarity(train, labels, val, "sha", "synthetic")
    bar = familiarity.shifted_threshold
    assert bar == pytest.approx(np.quantile(familiarity.reference_scores, SHIFTED_FOLDER_QUANTILE)) and bar < familiarity.threshold
    in_lab = familiarity.score(_clusters(rng, 80)[0])
    verdict, flags = familiarity.folder_flags(in_lab)
    assert not verdict.shifted and verdict.bar == familiarity.threshold
    assert np.array_equal(flags, familiarity.flags(in_lab))  # an in-lab folder: nothing changes
    shifted = familiarity.score(_clusters(rng, 80, shift=0.8)[0])
    verdict, flags = familiarity.folder_flags(shifted)
    assert verdict.shifted and verdict.bar == bar
    between = (shifted > bar) & (shifted <= familiarity.threshold)
    assert between.any() and flags[between].all() and not familiarity.flags(shifted)[between].any()
    assert verdict.cleared == int((shifted <= bar).sum()) and f"only {verdict.cleared} of 80 cells" in verdict.message


def test_knn_file_round_trips_and_a_format_1_file_still_loads_as_mahalanobis(tmp_path: Path) -> None:
    """The kNN sidecar saves its training embeddings (float16) and scores identically after loading; an
    older Mahalanobis-only file (format 1) keeps working."""
    from hemaclip.tasks.familiarity import familiarity_path

    rng = np.random.default_rng(2)
    train, labels = _clusters(rng, 300)
    val, _ = _clusters(rng, 100)
    query, _ = _clusters(rng, 50, shift=0.5)
    fitted = fit_familiarity(train, labels, val, "sha", "synthetic", method="knn")
    checkpoint = tmp_path / "m.pt"
    fitted.save(familiarity_path(checkpoint))
    loaded, why = load_familiarity(checkpoint, "sha")
    assert loaded is not None, why
    assert loaded.method == "knn" and loaded.k == fitted.k and loaded.threshold == fitted.threshold
    np.testing.assert_allclose(loaded.score(query), fitted.score(query), rtol=1e-6)
    old = fit_familiarity(train, labels, val, "sha", "synthetic", method="mahalanobis")
    np.savez(familiarity_path(checkpoint), format=np.array(1), checkpoint_sha1=np.array("sha"), classes=np.array(old.classes),
             means=old.means, precision=old.precision, threshold=np.array(old.threshold),
             reference_scores=old.reference_scores, fitted_on=np.array("old"))
    legacy, why = load_familiarity(checkpoint, "sha")
    assert legacy is not None and legacy.method == "mahalanobis", why
    np.testing.assert_allclose(legacy.score(query), old.score(query), rtol=1e-5)


def test_threshold_is_fitted_without_test_labels_or_test_images(monkeypatch, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Changing every test label (and the test images) leaves the fitted threshold exactly as it was."""
    import hemaclip.data.datasets as datasets
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.tasks.familiarity import fit_familiarity_for

    pngs = []
    rng = np.random.default_rng(0)
    for i in range(60):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        pngs.append(path)

    def fake(test_labels: list[str], test_paths: list[Path]):
        records = [datasets.CellRecord(pngs[i], "basophil" if i % 2 else "monocyte", "train") for i in range(30)]
        records += [datasets.CellRecord(pngs[i], "basophil" if i % 2 else "monocyte", "val") for i in range(30, 50)]
        records += [datasets.CellRecord(p, lab, "test") for p, lab in zip(test_paths, test_labels)]
        return lambda name, **_: datasets.CellDataset(name, ("basophil", "monocyte"), records, len(records))

    model, _ = load_for_inference(tiny_checkpoint)
    copy = tmp_path / "tiny.pt"
    copy.write_bytes(tiny_checkpoint.read_bytes())
    monkeypatch.setattr(datasets, "load_dataset", fake(["basophil"] * 10, pngs[50:]))
    first = fit_familiarity_for(model, copy, write=False).threshold
    monkeypatch.setattr(datasets, "load_dataset", fake(["monocyte"] * 10, pngs[:10]))
    assert fit_familiarity_for(model, copy, write=True).threshold == first
    loaded, why = load_familiarity(copy, __import__("hemaclip.cache", fromlist=["file_sha1"]).file_sha1(copy))
    assert loaded is not None and loaded.threshold == first, why


@pytest.mark.skipif(not (DATA / "zheng2018").is_dir(), reason="../shared/data not present")
def test_describe_json_gives_one_record_per_cell_with_its_box(run_cli, make_tiny_model, tmp_path: Path) -> None:
    from hemaclip.models.checkpoint import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "cells.pt", make_tiny_model(preprocess={"locate": "cell"}))
    images = DATA / "zheng2018" / "dataset2_cellavision" / "images"
    field = np.full((480, 640, 3), 235, np.uint8)
    field[90:390, 10:310] = np.asarray(Image.open(images / "001.png").convert("RGB"))
    field[90:390, 330:630] = np.asarray(Image.open(images / "002.png").convert("RGB"))
    Image.fromarray(field).save(tmp_path / "field.png")
    Image.fromarray(np.asarray(Image.open(images / "003.png").convert("RGB"))).save(tmp_path / "crop.png")
    result = run_cli("describe", str(tmp_path / "field.png"), str(tmp_path / "crop.png"), "--json", "--index", "none",
                     "--checkpoint", str(checkpoint))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    field_records = [r for r in records if r["source"].endswith("field.png")]
    assert len(field_records) == 2 and [r["cell"] for r in field_records] == [0, 1]
    left, right = sorted(field_records, key=lambda r: r["box"][0])
    assert left["box"][2] <= 320 <= right["box"][0] and all(r["cell_found"] for r in field_records)
    (crop,) = [r for r in records if r["source"].endswith("crop.png")]
    x0, y0, x1, y1 = crop["box"]
    assert 0 <= x0 < x1 <= 300 and 0 <= y0 < y1 <= 300
    assert all("unfamiliar" in r and "unfamiliarity" in r for r in records)
