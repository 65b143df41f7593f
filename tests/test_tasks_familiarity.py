"""Unfamiliarity: per-cell score and flag fitted on train/val only, the folder-level shift verdict, and
`describe` reporting boxes, flags and the folder warning through the installed entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hemaclip.data.paths import repo_default_data_root
from hemaclip.tasks.familiarity import FLAG_QUANTILE, fit_familiarity, load_familiarity

DATA = repo_default_data_root()


def _clusters(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, list[str]]:
    centres = np.eye(8)[:3] * 4
    labels = rng.integers(0, 3, n)
    return centres[labels] + rng.normal(size=(n, 8)) + shift, [f"c{k}" for k in labels]


def test_threshold_flags_the_chosen_share_of_validation_and_far_points() -> None:
    rng = np.random.default_rng(0)
    train, labels = _clusters(rng, 600)
    val, _ = _clusters(rng, 400)
    familiarity = fit_familiarity(train, labels, val, "sha", "synthetic")
    assert abs(familiarity.flags(familiarity.score(val)).mean() - (1 - FLAG_QUANTILE)) < 0.01
    test, _ = _clusters(rng, 2000)
    assert familiarity.flags(familiarity.score(test)).mean() < 0.07
    far, _ = _clusters(rng, 200, shift=3.0)
    assert familiarity.flags(familiarity.score(far)).mean() > 0.9


def test_folder_shift_fires_on_a_shifted_folder_and_not_on_in_lab_folders() -> None:
    rng = np.random.default_rng(1)
    train, labels = _clusters(rng, 600)
    val, _ = _clusters(rng, 400)
    familiarity = fit_familiarity(train, labels, val, "sha", "synthetic")
    in_lab = [familiarity.folder_shift(familiarity.score(_clusters(rng, 60)[0])) for _ in range(50)]
    assert not any(v.shifted for v in in_lab)
    shifted = familiarity.folder_shift(familiarity.score(_clusters(rng, 60, shift=1.0)[0]))
    assert shifted.shifted and "readings may be unreliable" in shifted.message and "--adapt bn" in shifted.message
    assert familiarity.folder_shift(familiarity.score(val[:5])) is None  # too few cells for a verdict


def test_threshold_is_fitted_without_test_labels_or_test_images(monkeypatch, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Changing every test label (and the test images) leaves the fitted threshold exactly as it was."""
    import hemaclip.data.datasets as datasets
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.tasks.describe import fit_familiarity_for

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
