"""The other-labs study: scoring as a user meets it (other classes are wrong), grouped intervals, the
unflagged accuracy, leave-one-lab-out, and the command's errors and report through the installed entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hemaclip.metrics.classification import macro_f1
from hemaclip_research.other_labs import MIN_CLASS_CELLS, WHITE_CELL_CLASSES, LabReading, _sections, run_other_labs, score_reading
from hemaclip_research.report import Section, Table
from test_data_other_labs import _small_lisc_root

VOCAB = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def _reading(truth, predicted, groups, unfamiliar=None):
    probs = np.full((len(truth), len(VOCAB)), 0.02)
    for i, p in enumerate(predicted):
        probs[i, VOCAB.index(p)] = 1 - 0.02 * (len(VOCAB) - 1)
    return LabReading(truth=list(truth), groups=list(groups), predicted=list(predicted), probability=probs.max(1), probs=probs,
                      class_names=VOCAB, unfamiliar=None if unfamiliar is None else np.array(unfamiliar),
                      scores=None if unfamiliar is None else np.array(unfamiliar, float), shift=None, seconds=0.0)


def test_a_prediction_outside_the_five_white_cell_classes_counts_as_wrong_and_groups_are_resampled_whole() -> None:
    truth = ["lymphocyte"] * 4 + ["neutrophil"] * 4 + ["monocyte"] * 2
    predicted = ["lymphocyte", "lymphocyte", "erythroblast", "monocyte", "neutrophil", "platelet", "neutrophil", "neutrophil",
                 "monocyte", "monocyte"]
    groups = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"]
    unfamiliar = [False, False, True, True, False, True, False, False, False, True]
    result = score_reading(_reading(truth, predicted, groups, unfamiliar), n_resamples=200)
    assert result["accuracy"]["point"] == pytest.approx(0.7)
    assert result["macro_f1"]["point"] == pytest.approx(macro_f1(truth, predicted, list(WHITE_CELL_CLASSES)))
    assert result["interval_method"].startswith("cluster bootstrap") and result["n_groups"] == 5
    assert "erythroblast" in result["confusion_labels"] and "platelet" in result["confusion_labels"]
    assert result["flagged_share"] == pytest.approx(0.4)
    # unflagged cells: 0,1 (right), 4 (right), 6,7 (right), 8 (right) -> 6/6
    assert result["n_unflagged"] == 6 and result["accuracy_unflagged"] == pytest.approx(1.0)
    assert result["ece"] == pytest.approx(abs((1 - 0.02 * 7) - 0.7))


def test_per_class_f1_carries_its_n_and_the_macro_f1_leaves_out_classes_under_five_cells() -> None:
    # One basophil, read wrong: its F1 of 0 is a whole term of the full macro F1.
    truth = ["basophil"] + ["lymphocyte"] * 6 + ["neutrophil"] * 5 + ["monocyte"] * 2
    predicted = ["neutrophil"] + ["lymphocyte"] * 5 + ["monocyte"] + ["neutrophil"] * 5 + ["monocyte"] * 2
    result = score_reading(_reading(truth, predicted, [str(i) for i in range(len(truth))]), n_resamples=50)
    assert result["per_class_n"] == {"basophil": 1, "lymphocyte": 6, "monocyte": 2, "neutrophil": 5}
    assert set(result["per_class_n"]) == set(result["per_class_f1"])
    big = result["macro_f1_min_cells"]
    assert MIN_CLASS_CELLS == 5 and big["classes"] == ["lymphocyte", "neutrophil"]
    assert big["left_out"] == ["basophil", "monocyte"]
    assert big["point"] == pytest.approx((2 * 5 / 11 + 2 * 5 / 11) / 2)  # lymphocyte 5/6 recalled; neutrophil 5 of 6 said
    assert big["point"] > result["macro_f1"]["point"]
    # The report writer shows both figures, the classes left out, and n beside every per-class F1.
    metrics = {"split": "test", "scoring": "s", "n_resamples": 50, "paired_vs_baseline": {},
               "models": {"m": {"labs": {"zheng1/none": result}}}}
    sections = _sections(metrics, [], Table, Section)
    per_lab, per_class = sections[0].tables[0], sections[1].tables[0]
    row = dict(zip(per_lab.columns, per_lab.rows[0]))
    assert row[f"macro F1, classes ≥ {MIN_CLASS_CELLS}"] == big["point"] and row["left out"] == "basophil, monocyte"
    cells = per_class.rows[0][3:]
    assert cells[per_class.columns[3:].index("basophil F1")] == 0.0 and cells[per_class.columns[3:].index("basophil F1") + 1] == 1
    assert cells[-2:] == [result["per_class_f1"]["neutrophil"], 5]
    assert [c for c in per_class.columns if c == "n"] == ["n"] * len(WHITE_CELL_CLASSES)


@pytest.mark.slow  # 12 s on the loaded 2-core box: three checkpoint loads, one lab read, the report with its figure
def test_a_lab_used_in_training_is_not_scored_and_the_report_says_so(data_root, tmp_path, make_tiny_model) -> None:
    """A checkpoint whose saved training config (as the trainer writes it) added LISC's train part is not scored on
    LISC, while a lab it never saw (Zheng 2) is: the check reads the checkpoint, nothing is stubbed."""
    from hemaclip.models.checkpoint import save_checkpoint
    from hemaclip_research.other_labs import ModelEntry
    from hemaclip.train.config import TrainConfig

    root = _small_lisc_root(tmp_path)  # LISC's first crops (finding near-duplicates in all of LISC takes a minute)
    (root / "zheng2018").symlink_to(data_root / "zheng2018")
    config = TrainConfig(extra_datasets=["lisc"]).to_dict()
    path = save_checkpoint(tmp_path / "with-lisc.pt", make_tiny_model(), extra={"train_config": config})
    metrics = run_other_labs([ModelEntry("m", str(path))], tmp_path / "r", labs=("lisc", "zheng2"), adaptations=("none",),
                             data_root=root, n_resamples=20, progress=False)
    labs = metrics["models"]["m"]["labs"]
    assert labs["lisc/none"] == {"not_scored": "lab used in training (leave-one-lab-out)"}
    assert labs["zheng2/none"]["n"] == 69 and "not_scored" not in labs["zheng2/none"]
    assert metrics["models"]["m"]["trained_on"] == sorted({config["dataset"], config["val_dataset"], "lisc"})
    report = (tmp_path / "r" / "report.md").read_text()
    assert report.count("not scored: lab used in training") == 1


@pytest.mark.slow
def test_other_labs_command_scores_zheng2_with_the_shipped_model(run_cli, data_root, tmp_path) -> None:
    result = run_cli("other-labs", "--labs", "zheng2", "--adapt", "none,entropy,white-cells", "--n-boot", "50", "--out", str(tmp_path / "r"),
                     "--data", str(data_root))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    block = metrics["models"]["default"]["labs"]["zheng2/none"]
    assert block["n"] == 69 and 0.0 <= block["macro_f1"]["low"] <= block["macro_f1"]["point"] <= block["macro_f1"]["high"] <= 1.0
    tent = metrics["models"]["default"]["labs"]["zheng2/entropy"]  # Tent on the lab's cells, then read
    assert tent["n"] == 69 and tent["mean_confidence"] != block["mean_confidence"]
    white = metrics["models"]["default"]["labs"]["zheng2/white-cells"]  # the read-out restricted to the 5 classes scored
    assert white["n"] == 69 and set(white["confusion_labels"]) == {"basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"}
    assert white["accuracy"]["point"] >= block["accuracy"]["point"]  # no cell can be lost to a class outside the five
    assert (tmp_path / "r" / "figures" / "confusion_default_zheng2_none.png").stat().st_size > 1000


@pytest.mark.parametrize("args, needle", [
    (("--adapt", "tta"), "--adapt: unknown 'tta'"),
    (("--labs", "barcelona"), "--labs: unknown 'barcelona'"),
    (("--model", "=x.pt"), "give NAME=CHECKPOINT"),
])
def test_other_labs_command_refuses_bad_options_in_one_line(assert_one_line_error, run_cli, tmp_path, args, needle) -> None:
    result = run_cli("other-labs", *args, "--out", str(tmp_path / "r"))
    assert_one_line_error(result, needle)
    assert not (tmp_path / "r").exists()


def test_trust_command_refuses_a_missing_holdout_checkpoint_in_one_line(assert_one_line_error, run_cli, tmp_path) -> None:
    result = run_cli("trust", "--holdout", f"basophil={tmp_path / 'none.pt'}", "--out", str(tmp_path / "r"))
    assert_one_line_error(result, "checkpoint file not found")
    assert not (tmp_path / "r").exists()


def test_white_cells_reads_only_the_five_classes_the_checkpoint_knows(data_root, tmp_path, make_tiny_model) -> None:
    """A checkpoint trained with basophil held out is scored on a lab that has basophils (they count as wrong, ECE
    included), and white-cells restricts it to the four of the five it reads instead of refusing."""
    from hemaclip.models.checkpoint import save_checkpoint
    from hemaclip_research.other_labs import ModelEntry

    classes = ("eosinophil", "erythroblast", "lymphocyte", "monocyte", "neutrophil")
    path = save_checkpoint(tmp_path / "no-basophil.pt", make_tiny_model(class_names=classes))
    metrics = run_other_labs([ModelEntry("m", str(path))], tmp_path / "r", labs=("zheng2",), adaptations=("none", "white-cells"),
                             data_root=data_root, n_resamples=20, progress=False)
    plain, white = (metrics["models"]["m"]["labs"][f"zheng2/{a}"] for a in ("none", "white-cells"))
    assert white["n"] == plain["n"] == 69
    read = {label for label, row in zip(white["confusion_labels"], np.array(white["confusion_matrix"]).T) if row.sum()}
    assert read <= {"eosinophil", "lymphocyte", "monocyte", "neutrophil"}  # never erythroblast, never an unknown basophil
