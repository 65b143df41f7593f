"""Classification metrics agree with scikit-learn and hand counts; hemaclip's one macro F1 convention."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from hemaclip.metrics.classification import (
    attribute_table,
    classes_with_at_least,
    classification_report_dict,
    format_attribute_table,
    macro_f1,
    row_normalize,
)

LABELS = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
# Class 3 (eosinophil) has no true and no predicted items.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
Y_PRED = np.array([0, 1, 0, 1, 1, 2, 0, 2, 1, 0])


def test_report_matches_sklearn_and_hand_counts() -> None:
    rep = classification_report_dict(Y_TRUE, Y_PRED, LABELS)
    assert rep["n"] == 10 and rep["labels"] == LABELS
    assert rep["accuracy"] == pytest.approx(accuracy_score(Y_TRUE, Y_PRED)) == pytest.approx(0.7)
    assert rep["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y_TRUE, Y_PRED))
    labels = [0, 1, 2, 3]
    # Macro F1 averages the classes that occur in the truth (here 0, 1, 2), not the empty eosinophil.
    assert rep["macro_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, labels=[0, 1, 2], average="macro", zero_division=0))
    assert rep["weighted_f1"] == pytest.approx(
        f1_score(Y_TRUE, Y_PRED, labels=labels, average="weighted", zero_division=0)
    )
    # Hand counts: neutrophil TP=3, FP=1 (a monocyte), FN=1 (-> lymphocyte).
    neu = rep["per_class"]["neutrophil"]
    assert neu == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    lym = rep["per_class"]["lymphocyte"]
    assert lym["precision"] == pytest.approx(0.5) and lym["recall"] == 1.0 and lym["support"] == 2
    assert rep["per_class"]["eosinophil"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # Macro F1 averages over the 3 classes with images; the empty one is not a zero in the mean.
    f1s = [rep["per_class"][n]["f1"] for n in LABELS[:3]]
    assert rep["macro_f1"] == pytest.approx(sum(f1s) / 3)
    assert rep["confusion_matrix"] == [[3, 1, 0, 0], [0, 2, 0, 0], [1, 1, 2, 0], [0, 0, 0, 0]]


def test_normalized_confusion_has_zero_rows_not_nan() -> None:
    rep = classification_report_dict(Y_TRUE, Y_PRED, LABELS)
    norm = np.array(rep["confusion_matrix_normalized"])
    assert not np.isnan(norm).any()
    np.testing.assert_allclose(norm[:3].sum(axis=1), 1.0)
    np.testing.assert_array_equal(norm[3], 0.0)
    np.testing.assert_allclose(norm[2], [0.25, 0.25, 0.5, 0.0])
    json.dumps(rep)  # JSON-ready, no numpy types
    np.testing.assert_array_equal(row_normalize(np.zeros((2, 2))), 0.0)


def test_balanced_accuracy_ignores_classes_without_support() -> None:
    # y_pred uses a class that never occurs in y_true; balanced accuracy averages supported classes.
    t, p = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])
    rep = classification_report_dict(t, p, ["a", "b", "c"])
    assert rep["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert rep["per_class"]["c"]["precision"] == 0.0 and rep["per_class"]["c"]["support"] == 0


def test_macro_f1_averages_the_label_set_classes_present_in_the_truth() -> None:
    t = np.array([0, 0, 1, 1])
    assert macro_f1(t, t, 2) == 1.0
    # A class of the label set that no image has is left out of the mean ...
    assert macro_f1(t, t, 3) == 1.0
    # ... also when it is predicted: the false prediction lowers the recall of the true class only.
    p = np.array([0, 2, 1, 1])
    assert macro_f1(t, p, 3) == pytest.approx(f1_score(t, p, labels=[0, 1], average="macro", zero_division=0))
    assert macro_f1(Y_TRUE, Y_PRED, 4) == pytest.approx(
        f1_score(Y_TRUE, Y_PRED, labels=range(3), average="macro", zero_division=0)
    )


def test_macro_f1_on_names_with_a_prediction_outside_the_label_set() -> None:
    labels = ["big", "small"]
    truth = ["big", "big", "small", "small"]
    assert macro_f1(truth, ["big", "big", "small", "small"], labels) == 1.0
    # "huge" is no class: it is an error for the big cell, nothing more (recall of big 1/2).
    expected = np.mean([2 * 1 / (2 + 1), 1.0])
    assert macro_f1(truth, ["big", "huge", "small", "small"], labels) == pytest.approx(expected)
    with pytest.raises(ValueError, match="not in the label set"):
        macro_f1(["big", "tiny"], ["big", "big"], labels)


def test_one_convention_whoever_asks() -> None:
    """Integer codes with n, names with their list, and the bootstrap's point estimate agree."""
    from hemaclip.metrics.statistics import bootstrap_macro_f1

    names = [LABELS[i] for i in Y_TRUE], [LABELS[i] for i in Y_PRED]
    by_code = macro_f1(Y_TRUE, Y_PRED, 4)
    assert macro_f1(*names, LABELS) == by_code
    assert bootstrap_macro_f1(Y_TRUE, Y_PRED, 4, n_resamples=20)["point"] == by_code
    assert bootstrap_macro_f1(*names, LABELS, n_resamples=20)["point"] == by_code


@pytest.mark.parametrize(
    ("t", "p", "n"),
    [([0, 1], [0], 2), ([0, 3], [0, 1], 3), ([], [], 2), ([0.5, 1], [0, 1], 2), ([[0, 1]], [[0, 1]], 2)],
)
def test_invalid_inputs_raise(t: list, p: list, n: int) -> None:
    with pytest.raises(ValueError):
        macro_f1(t, p, n)


def test_attribute_table_layout_and_markdown() -> None:
    rows = [
        {
            "name": "cell class",
            "labels": ["a", "b", "c", "d", "e"],
            "macro_f1": {"point": 0.91, "low": 0.88, "high": 0.93},
        },
        {"name": "granularity", "n_choices": 2, "macro_f1": 0.8, "ci": (0.75, 0.85)},
        {"name": "cell_shape", "choices": ["round", "irregular"], "macro_f1": 0.7},
    ]
    table = attribute_table(rows)
    assert [r["name"] for r in table] == ["cell class", "granularity", "cell_shape"]
    assert [r["n_choices"] for r in table] == [5, 2, 2]
    assert table[0] == {"name": "cell class", "n_choices": 5, "macro_f1": 0.91, "ci_low": 0.88, "ci_high": 0.93}
    assert table[1]["ci_low"] == 0.75 and table[2]["ci_low"] is None
    md = format_attribute_table(table)
    assert md.splitlines()[0] == "| Attribute | Choices | Macro F1 | CI |"
    assert "| granularity | 2 | 80.0 | 75.0–85.0 |" in md
    assert "| cell_shape | 2 | 70.0 | – |" in md
    assert "CI" not in format_attribute_table(attribute_table(rows[2:]))
    with pytest.raises(ValueError):
        attribute_table([{"name": "x", "macro_f1": 0.5}])


def test_classes_with_at_least_n_items_keeps_label_order_and_drops_small_and_absent_classes() -> None:
    truth = ["monocyte"] * 5 + ["neutrophil"] * 7 + ["eosinophil"] * 4
    assert classes_with_at_least(truth, LABELS, 5) == ["neutrophil", "monocyte"]
    assert classes_with_at_least(truth, LABELS, 4) == ["neutrophil", "monocyte", "eosinophil"]
    assert classes_with_at_least(truth, LABELS, 8) == []
