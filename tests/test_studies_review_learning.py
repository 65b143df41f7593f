"""The review learning curve: corrections of a lab's val cells, scored on its test cells, with calibration before and
after (ECE beside the floor a perfectly calibrated model would show) and a row with every val cell for a small lab."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hemaclip.metrics.calibration import ece_floor, reliability_bins
from test_data_other_labs import _small_lisc_root

REVIEWED = 3  # source cells drawn in the small LISC test


def _fake_readings(monkeypatch: pytest.MonkeyPatch, classes: list[str]) -> None:
    """Embeddings and model probabilities without a model: a fixed random vector per image path."""
    import zlib

    from hemaclip_research import review_learning

    def fake(_describer, records, batch_size: int = 64):
        rng = [np.random.default_rng(zlib.crc32(str(r.path).encode())) for r in records]
        features = np.stack([g.normal(size=8) for g in rng])
        probs = np.stack([g.dirichlet(np.ones(len(classes))) for g in rng])
        return features, probs

    monkeypatch.setattr(review_learning, "describe_records", fake)


def _recording_fit(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[str], list]]:
    """fit_adapter replaced by the model itself (zero correction), recording (labels, groups) of every call."""
    from hemaclip.tasks import adapter as adapter_module

    calls: list[tuple[list[str], list]] = []

    def fit(features, probabilities, labels, classes, *, seed=0, groups=None):
        calls.append((list(labels), list(groups) if groups is not None else None))
        return adapter_module.CorrectionAdapter(list(classes), np.zeros((len(classes), features.shape[1])), np.zeros(len(classes)), 1.0, len(labels))

    monkeypatch.setattr(adapter_module, "fit_adapter", fit)
    return calls


def test_lisc_reviewed_cells_are_val_source_cells_with_all_their_crops(data_root, tmp_path, monkeypatch) -> None:
    """LISC holds several near-duplicate crops per source cell: "N reviewed cells" draws N val source cells (all
    their crops), never a test cell, and n of the scored part counts source cells."""
    from types import SimpleNamespace

    from hemaclip.data.datasets import load_dataset
    from hemaclip_research.review_learning import learning_curve

    classes = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
    _fake_readings(monkeypatch, classes)
    calls = _recording_fit(monkeypatch)
    describer = SimpleNamespace(readout=SimpleNamespace(class_names=classes))
    root = _small_lisc_root(tmp_path, per_class=24)  # grouping all 1,292 LISC crops takes minutes
    ds = load_dataset("lisc", data_root=root)
    val, test = ds.split("val"), ds.split("test")
    group_of = {str(r.path): r.group or str(r.path) for r in [*val, *test]}
    val_crops_of: dict[str, set[str]] = {}
    for r in val:
        val_crops_of.setdefault(group_of[str(r.path)], set()).add(str(r.path))
    assert len(val_crops_of) < len(val)  # crops outnumber source cells: the distinction matters here
    result = learning_curve(describer, "lisc", data_root=root, sizes=(0, REVIEWED), draws=1, n_resamples=20)
    assert result["val_cells"] == len(val_crops_of) and result["val_crops"] == len(val)
    assert result["test_cells"] == len({group_of[str(r.path)] for r in test}) < result["test_crops"] == len(test)
    row = result["rows"][1]
    reviewed = set(row["reviewed_paths_draw0"])
    sources = {group_of[p] for p in reviewed}
    assert row["reviewed"] == REVIEWED == len(sources) and row["reviewed_crops_draw0"] == len(reviewed) >= REVIEWED
    assert reviewed == set().union(*(val_crops_of[g] for g in sources))  # every crop of a drawn cell, from val only
    assert not reviewed & set(result["scored_paths"]) and not sources & {group_of[p] for p in result["scored_paths"]}
    assert all(groups is not None and len(groups) == len(labels) for labels, groups in calls)  # CV folds by source cell
    assert result["cross_fitted"]["cells"] == len({*group_of.values()}) and result["cross_fitted"]["crops"] == len(val) + len(test)


@pytest.mark.slow
def test_learning_curve_on_zheng2_reports_calibration_and_reviews_every_val_cell(data_root, tmp_path, one_torch_thread) -> None:
    from hemaclip.data.datasets import load_dataset
    from hemaclip_research.review_learning import describe_records, learning_curve, write_learning_curve
    from hemaclip.tasks.describe import Describer

    describer = Describer.from_checkpoint(None, index=None, data_root=data_root)
    result = learning_curve(describer, "zheng2", data_root=data_root, sizes=(0, 20, 50), draws=2, n_resamples=100)
    n_val = len(load_dataset("zheng2", data_root=data_root).split("val"))
    assert n_val < 50  # Zheng 2 has 31 val cells: 50 is left out and "every val cell" takes its place
    assert [row["reviewed"] for row in result["rows"]] == [0, 20, n_val]
    assert [row["every_val_cell"] for row in result["rows"]] == [False, False, True]

    # Row 0 is the model itself: its ECE and floor are those of the model's calibrated probabilities on the test cells.
    test = load_dataset("zheng2", data_root=data_root).split("test")
    _features, probs = describe_records(describer, test)
    truth = np.array([list(describer.readout.class_names).index(r.label) for r in test])
    model = result["rows"][0]["calibration"]
    assert model["ece_draw0"] == pytest.approx(reliability_bins(probs, truth)["ece"], abs=1e-6)
    assert model["ece_floor_draw0"] == pytest.approx(ece_floor(probs), abs=1e-6)
    for row in result["rows"][1:]:
        cal = row["calibration"]
        assert 0 <= cal["ece_floor_draw0"] < 1 and 0 <= cal["ece_draw0"] <= 1
        assert cal["reliability_draw0"]["n"] == len(test)

    # Reviewed cells come from val only and are never scored.
    val_paths = {str(r.path) for r in load_dataset("zheng2", data_root=data_root).split("val")}
    assert set(result["scored_paths"]) == {str(r.path) for r in test}
    for row in result["rows"][1:]:
        assert len(row["reviewed_paths_draw0"]) == row["reviewed"]  # Zheng 2: one crop per source cell
        assert set(row["reviewed_paths_draw0"]) <= val_paths and not set(row["reviewed_paths_draw0"]) & set(result["scored_paths"])

    # Cross-fitted over every cell of the lab: each fold is read by an adapter fitted on the other four.
    cross = result["cross_fitted"]
    assert cross["cells"] == n_val + len(test) and cross["folds"] == 5
    assert all(sum(r["reviewed_per_fold"]) == (cross["folds"] - 1) * cross["cells"] for r in cross["runs"])
    val_probs = describe_records(describer, load_dataset("zheng2", data_root=data_root).split("val"))[1]
    every = np.vstack([val_probs, probs])
    every_truth = np.array([list(describer.readout.class_names).index(r.label)
                            for r in [*load_dataset("zheng2", data_root=data_root).split("val"), *test]])
    assert cross["model_ece"] == pytest.approx(reliability_bins(every, every_truth)["ece"], abs=1e-6)
    assert 0 <= cross["ece"]["mean"] <= 1 and 0 < cross["accuracy"]["mean"] <= 1

    write_learning_curve([result], tmp_path / "curve", {"checkpoint_sha1": "0" * 40})
    table = (tmp_path / "curve" / "learning_curve.md").read_text()
    assert f"| {n_val} (every val cell) |" in table and "ECE, draw 0 (floor)" in table and "Cross-fitted over all 100 cells" in table
    assert (tmp_path / "curve" / "reliability_zheng2_model.png").stat().st_size > 0
    assert (tmp_path / "curve" / f"reliability_zheng2_reviewed_{n_val}.png").stat().st_size > 0
    saved = json.loads((tmp_path / "curve" / "learning_curve.json").read_text())
    assert saved["datasets"][0]["rows"][2]["calibration"]["ece_draw0"] == pytest.approx(result["rows"][2]["calibration"]["ece_draw0"])
