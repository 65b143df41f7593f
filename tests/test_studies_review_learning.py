"""The review learning curve: corrections of a lab's val cells, scored on its test cells, with calibration before and
after (ECE beside the floor a perfectly calibrated model would show) and a row with every val cell for a small lab."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hemaclip.metrics.calibration import ece_floor, reliability_bins


@pytest.mark.slow
def test_learning_curve_on_zheng2_reports_calibration_and_reviews_every_val_cell(data_root, tmp_path, one_torch_thread) -> None:
    from hemaclip.data.datasets import load_dataset
    from hemaclip.studies.review_learning import describe_records, learning_curve, write_learning_curve
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
