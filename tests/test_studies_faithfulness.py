"""Faithfulness measures on inputs with known answers, and the human ceiling from the real re-annotation CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from hemaclip.data.attributes import ATTRIBUTE_NAMES
from hemaclip.data.datasets import WBCATT_CSV, WBCATT_DIR
from hemaclip.errors import DataError
from hemaclip_research.faithfulness import (
    all_statements,
    annotator_agreement,
    equal_coverage,
    reannotation_pairs,
    statement_agreement,
    textbook_attributes,
    textbook_test,
    threshold_sweep,
)
from hemaclip.text.sentences import attribute_sentence, statements_for_rows
from hemaclip.text.captions import parse_caption

FULL = {
    "cell_size": "big", "cell_shape": "round", "nucleus_shape": "segmented-multilobed",
    "nuclear_cytoplasmic_ratio": "low", "chromatin_density": "densely", "cytoplasm_vacuole": "no",
    "cytoplasm_texture": "clear", "cytoplasm_colour": "light blue", "granule_type": "small",
    "granule_colour": "pink", "granularity": "yes",
}


def test_statement_agreement_counts_statements_not_images() -> None:
    truth = [FULL, FULL, None]
    said = [{"cell_size": "big", "cell_shape": "round", "granularity": "yes"},  # 3 right
            {"cell_size": "small"},  # 1 wrong
            {"cell_size": "big"}]  # not annotated: ignored
    result = statement_agreement(said, truth, n_boot=200, seed=0)
    assert result["n_images"] == 2 and result["n_statements"] == 4
    assert result["agreement"]["point"] == pytest.approx(3 / 4)
    assert result["agreement"]["low"] <= 0.75 <= result["agreement"]["high"]
    assert result["coverage"] == pytest.approx(4 / 22)
    assert result["per_attribute"]["cell_size"] == {"n": 2, "agreement": 0.5}
    assert result["per_attribute"]["nucleus_shape"] == {"n": 0, "agreement": None}


def test_no_statements_leaves_agreement_undefined() -> None:
    result = statement_agreement([{}], [FULL], n_boot=50)
    assert result["agreement"] is None and result["coverage"] == 0 and result["n_statements"] == 0


def test_textbook_is_the_per_class_mode_and_the_test_splits_statements() -> None:
    other = {**FULL, "cell_size": "small", "nucleus_shape": "unsegmented-round"}
    book = textbook_attributes(["a", "a", "a", "b"], [FULL, FULL, other, other])
    assert book["a"] == FULL and book["b"] == other
    # A cell of class a misread as b: one statement follows b's textbook, one the cell, one both.
    said = [{"cell_size": "small", "nucleus_shape": "segmented-multilobed", "cell_shape": "round"},
            {"cell_size": "big"}]  # correctly classified: ignored
    result = textbook_test(said, [FULL, FULL], ["a", "a"], ["b", "a"], book)
    assert result["n_misclassified"] == 1 and result["n_statements"] == 3
    assert result["match_predicted_textbook"] == pytest.approx(2 / 3)
    assert result["match_own_annotation"] == pytest.approx(2 / 3)
    assert result["n_discriminating_statements"] == 2
    assert result["discriminating_match_predicted_textbook"] == pytest.approx(0.5)
    assert result["discriminating_match_own_annotation"] == pytest.approx(0.5)


def test_threshold_sweep_trades_coverage_for_agreement() -> None:
    values = {"cell_size": ["big", "small"], "cell_shape": ["round", "irregular"]}
    # Image 0: both confident and right; image 1: cell_size unsure and wrong.
    probs = {"cell_size": np.array([[0.95, 0.05], [0.4, 0.6]]), "cell_shape": np.array([[0.9, 0.1], [0.97, 0.03]])}
    truth = [FULL, FULL]
    rows = threshold_sweep(lambda t: statements_for_rows(probs, values, t), truth, thresholds=(0.5, 0.8))
    assert rows[0]["n_statements"] == 4 and rows[0]["agreement"] == pytest.approx(3 / 4)
    assert rows[1]["n_statements"] == 3 and rows[1]["agreement"] == pytest.approx(1.0)
    assert rows[1]["coverage"] < rows[0]["coverage"]


def test_generated_sentences_state_exactly_what_they_claim() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        chosen = {n: v for n, v in FULL.items() if rng.random() < 0.5}
        sentence, stated = attribute_sentence(chosen)
        assert parse_caption(sentence) == stated
        assert all(chosen[n] == v for n, v in stated.items())  # never says anything not chosen
        # Only granule details that cannot stand alone are ever dropped.
        assert set(chosen) - set(stated) <= {"granule_type", "granule_colour", "granularity"}
    assert attribute_sentence(FULL)[1] == FULL


def test_human_ceiling_from_the_real_reannotations(data_root: Path) -> None:
    result = annotator_agreement(data_root, n_boot=100)
    assert result["n_images"] == 1000
    assert 0.90 < result["mean_macro_f1"] < 0.99  # WBCAtt reports 0.947
    assert 0.90 < result["statement_agreement"]["point"] < 1.0
    assert set(result["per_attribute_macro_f1"]) == set(ATTRIBUTE_NAMES)


def test_all_statements_state_every_attribute_as_its_most_probable_value() -> None:
    values = {"cell_size": ["big", "small"], "cell_shape": ["round", "irregular"]}
    probs = {"cell_size": np.array([[0.51, 0.49], [0.2, 0.8]]), "cell_shape": np.array([[0.1, 0.9], [0.5, 0.5]])}
    assert all_statements(probs, values) == [{"cell_size": "big", "cell_shape": "irregular"},
                                             {"cell_size": "small", "cell_shape": "round"}]


def test_equal_coverage_scores_model_and_annotator_on_the_same_images_and_attributes() -> None:
    wrong_size = {**FULL, "cell_size": "small"}
    published = {"b": FULL, "c": FULL, "d": FULL}
    second = {"b": wrong_size, "c": FULL, "d": wrong_size}
    # "a" is not re-annotated and "d" not evaluated: both must be left out; on "c" the model says 2 things only.
    model = {"a": wrong_size, "b": FULL, "c": {"cell_size": "small", "cell_shape": "round"}}
    result = equal_coverage(model, published, second, n_boot=100, seed=0)
    assert result["images"] == ["b", "c"] and result["n_images"] == 2
    assert result["n_statements"] == 11 + 2  # only attributes both stated
    assert result["model"]["agreement"]["point"] == pytest.approx(12 / 13)
    assert result["annotators"]["agreement"]["point"] == pytest.approx(12 / 13)  # b: 10 of 11, c: 2 of 2
    assert result["model"]["coverage"] == result["annotators"]["coverage"] == pytest.approx(13 / 22)
    with pytest.raises(DataError):
        equal_coverage({"a": FULL}, published, second)


def test_equal_coverage_on_the_real_test_split_covers_exactly_the_annotators_images(data_root: Path) -> None:
    published, second, missing, _ = reannotation_pairs(data_root)
    test_csv = data_root / WBCATT_DIR / WBCATT_CSV.format(split="test")
    test_names = {row["img_name"] for row in csv.DictReader(test_csv.open())}
    shared = sorted(test_names & set(second))
    # A "model" that says what the second annotator said must score exactly the annotator's figure on those images,
    # and one that repeats the published labels must score 1: same images, same attributes, same truth.
    as_annotator = equal_coverage({n: second[n] for n in test_names if n in second}, published, second, n_boot=100)
    assert as_annotator["images"] == shared and len(shared) > 0 and missing == 0
    assert as_annotator["model"]["agreement"] == as_annotator["annotators"]["agreement"]
    assert as_annotator["model"]["coverage"] == as_annotator["annotators"]["coverage"] == 1.0
    expected = statement_agreement([second[n] for n in shared], [published[n] for n in shared], n_boot=100)
    assert as_annotator["annotators"]["agreement"] == expected["agreement"]
    as_published = equal_coverage({n: published[n] for n in test_names if n in second}, published, second, n_boot=100)
    assert as_published["model"]["agreement"]["point"] == 1.0
    assert as_published["annotators"]["agreement"]["point"] < 1.0
