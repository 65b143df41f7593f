"""Unseen classes read from their description: descriptions in attribute vocabulary only (no class named), S/U/H
by hand, provenance from the checkpoint's training config, and the protocol through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hemaclip.text.prompts import DATASET_CLASSES, load_prompts, naming_pattern, words_of
from hemaclip_research.unseen_classes import STACKING_GRID, gzsl_accuracies, harmonic_mean, stacking_gamma, trained_without

from test_text_heldout import lexicon_texts


def test_descriptions_use_only_attribute_vocabulary_and_name_no_class() -> None:
    prompts = load_prompts()
    assert {"basophil", "myelocyte", "metamyelocyte", "promyelocyte", "band_neutrophil"} <= set(prompts.class_descriptions)
    vocabulary: set[str] = set()
    for text in [*lexicon_texts(), *(t for vs in prompts.attribute_prompts().values() for ts in vs.values() for t in ts)]:
        vocabulary.update(words_of(text))
    every_name = naming_pattern(prompts.class_names(sorted({c for cs in DATASET_CLASSES.values() for c in cs})))
    for name, description in prompts.class_descriptions.items():
        assert description.source.startswith(("Bain B.J.", "Palmer L.")), name
        assert len(description.sentences) >= 3
        for sentence in description.sentences:
            assert [w for w in words_of(sentence) if w not in vocabulary] == [], sentence
            assert not every_name.search(sentence), sentence


def test_gzsl_accuracies_and_harmonic_mean_by_hand() -> None:
    # seen classes 0, 1; unseen 2. Class 0: 3/4 right, class 1: 2/2, class 2: 1/4 right.
    t = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    p = np.array([0, 0, 0, 2, 1, 1, 2, 0, 1, 0])
    s, u, h = gzsl_accuracies(t, p, [0, 1], [2])
    assert s == pytest.approx((0.75 + 1.0) / 2) and u == pytest.approx(0.25)
    assert h == pytest.approx(2 * 0.875 * 0.25 / (0.875 + 0.25)) and harmonic_mean(0, 0) == 0.0


def test_stacking_gamma_spends_at_most_the_budget_on_seen_val_images_and_ignores_held_out_images() -> None:
    names = ["a", "b", "held"]
    # 100 seen val images, each right by a margin over "held": 0.6, 0.7, ..., 10.5 logits.
    margins = 0.5 + np.arange(1, 101) / 10
    logits = np.zeros((100, 3))
    logits[:, 0] = margins
    truth = ["a"] * 100
    choice = stacking_gamma(logits, truth, names, ["held"])
    # gamma g turns the images with margin < g into "held": 0.5 costs none, 0.75 costs two (2 % > the 1 % budget)
    assert choice["gamma"] == 0.5 and choice["val_seen_accuracy_at_gamma"] == 1.0
    # held-out-class val images take no part: adding some, read any way, changes nothing
    more = np.vstack([logits, np.tile([5.0, 0.0, -5.0], (50, 1))])
    assert stacking_gamma(more, truth + ["held"] * 50, names, ["held"])["gamma"] == choice["gamma"]


def test_provenance_comes_from_the_training_config() -> None:
    assert trained_without({"extra": {"train_config": {"holdout_classes": ["basophil"]}}}, ["basophil"])[0] is True
    honest, why = trained_without({"extra": {"train_config": {"holdout_classes": []}}}, ["basophil"])
    assert not honest and "NOT a zero-shot result" in why
    assert not trained_without({}, ["basophil"])[0]


@pytest.fixture(scope="module")
def held_out_checkpoint(make_tiny_model, tmp_path_factory) -> Path:
    """A tiny random model whose training config says basophil was held out (the protocol reads only that)."""
    from hemaclip.models.checkpoint import save_checkpoint

    model = make_tiny_model("vit-tiny-128")
    return save_checkpoint(tmp_path_factory.mktemp("held") / "held.pt", model, extra={"train_config": {"holdout_classes": ["basophil"]}})


@pytest.mark.slow
def test_unseen_classes_protocol_through_the_command_line(held_out_checkpoint: Path, tiny_vit_checkpoint: Path, data_root: Path,
                                                         tmp_path: Path, run_cli, assert_one_line_error) -> None:
    folder = tmp_path / "unseen-classes"
    common = ["evaluate", "--protocol", "unseen-classes", "--holdout", "basophil", "--data", str(data_root), "--max-per-class", "6",
              "--n-boot", "100"]
    result = run_cli(*common, "--checkpoint", str(held_out_checkpoint), "--out", str(folder / "basophil"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((folder / "basophil" / "metrics.json").read_text())
    assert metrics["protocol"] == "unseen-classes" and metrics["zero_shot"] is True and metrics["n_images"] == 30
    g = metrics["gzsl"]
    assert g["h"]["point"] == pytest.approx(harmonic_mean(g["acc_seen"]["point"], g["acc_unseen"]["point"]))
    per_class = metrics["classification"]["per_class"]
    assert g["acc_unseen"]["point"] == pytest.approx(per_class["basophil"]["recall"])
    assert metrics["description_retrieval"]["basophil"]["n_relevant"] == 6
    assert metrics["descriptions"]["basophil"]["source"].startswith("Bain")
    assert metrics["stacking"]["gamma"] in STACKING_GRID and "h" in metrics["stacking"]["gzsl"]  # gamma from val, seen images only
    report = (folder / "basophil" / "report.md").read_text()
    assert "stacking, gamma" in report
    assert "**zero-shot**" in report and "Precision@10 from its description" in report and "Majority F1" in report
    # A checkpoint that saw basophils is scored but labelled as such, and the summary holds both rows.
    result = run_cli(*common, "--checkpoint", str(tiny_vit_checkpoint), "--out", str(folder / "seen-basophil"))
    assert result.returncode == 0, result.stderr
    assert "NOT ZERO-SHOT" in (folder / "seen-basophil" / "report.md").read_text()
    summary = (folder / "summary.md").read_text()
    assert "| basophil | basophil | wbcatt / test | 30 | yes |" in summary and "| seen-basophil | basophil | wbcatt / test | 30 | NO |" in summary
    # Bad input: one line, nothing written.
    bad = run_cli(*common, "--checkpoint", str(held_out_checkpoint), "--holdout", "blast", "--out", str(tmp_path / "bad"))
    assert_one_line_error(bad, "no class description for 'blast'")
    assert not (tmp_path / "bad" / "metrics.json").exists()
    wrong = run_cli("evaluate", "--holdout", "basophil", "--out", str(tmp_path / "bad2"))
    assert_one_line_error(wrong, "--holdout is for --protocol unseen-classes")
