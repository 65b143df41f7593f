"""ALL subtype study: the split cannot leak, fine-tuning with class sentences works, the twins share a
tower, and the command writes its report (tiny random towers, a handful of real ALL images)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from hemaclip_research import leukaemia as leukaemia_study
from hemaclip_research.leukaemia import compare_twins, run_study, score
from hemaclip.data.attributes import ALL_CLASSES
from hemaclip.data.datasets import load_dataset
from hemaclip.errors import HemaclipError
from hemaclip.models.checkpoint import load_checkpoint
from hemaclip.tasks.leukaemia import (
    INIT_CONFIGS,
    SUPERVISED_OVERRIDES,
    Arm,
    arm_config,
    arms_for,
    split_audit,
    train_arms,
)
from hemaclip.text.prompts import load_prompts
from hemaclip.train.texts import build_text_bank

# A run small enough for a test: 2 steps of 8 images, 8 validation images, tower kept fully trainable.
TINY = {"epochs": 1, "batch_size": 8, "max_train_images": 16, "max_val_images": 8, "warmup_steps": 1, "freeze_image_fraction": 0.0}


def test_all_split_is_deduplicated_disjoint_and_reloads_identically(data_root: Path, tmp_path: Path) -> None:
    audit = split_audit(data_root, tmp_path / "splits")
    assert audit["files_found"] == 3256
    assert audit["duplicates"]["files_dropped"] == 40
    assert audit["dropped_by_class"] == {"Pro": 40}
    assert audit["records_after_dedup"] == 3216 == sum(audit["split_sizes"].values())
    assert audit["path_overlap_across_splits"] == 0
    assert audit["hashes_in_two_splits"] == 0 and audit["duplicate_hashes_kept"] == 0
    assert audit["reload_identical"]
    # stratified 70/10/20: every class keeps its proportions within a couple of images
    for cls, total in {c: sum(audit["per_split_class"][s].get(c, 0) for s in ("train", "val", "test")) for c in ALL_CLASSES}.items():
        assert abs(audit["per_split_class"]["test"][cls] - 0.2 * total) <= 2
        assert abs(audit["per_split_class"]["val"][cls] - 0.1 * total) <= 2
    # a fresh split with the same seed (no saved file) is the same split
    fresh = load_dataset("all", data_root=data_root, split_dir=tmp_path / "other", seed=0)
    saved = load_dataset("all", data_root=data_root, split_dir=tmp_path / "splits", seed=0)
    assert {r.path: r.split for r in fresh.records} == {r.path: r.split for r in saved.records}


def test_supervised_twin_shares_the_tower_and_differs_only_in_objective() -> None:
    for init in INIT_CONFIGS:
        text = arm_config(Arm(init, "text")).to_dict()
        ce = arm_config(Arm(init, "ce")).to_dict()
        differing = {k for k in text if text[k] != ce[k]}
        assert differing == set(SUPERVISED_OVERRIDES), init
        assert text["contrastive_weight"] > 0 and text["class_head_weight"] == 0
        assert ce["contrastive_weight"] == 0 and ce["class_head_weight"] > 0
    assert arm_config(Arm("default", "text")).init_checkpoint == "default"
    assert arm_config(Arm("scratch", "text")).model_overrides == {"image_pretrained": None}


def test_arms_need_known_inits_with_distinct_names(tmp_path: Path) -> None:
    assert [a.name for a in arms_for(["default", "imagenet"])] == ["default-text", "default-ce", "imagenet-text", "imagenet-ce"]
    with pytest.raises(HemaclipError, match="no such checkpoint"):
        arms_for([str(tmp_path / "missing.pt")])
    with pytest.raises(HemaclipError, match="distinct"):
        arms_for(["default", "default"])


def test_text_bank_of_the_all_set_holds_class_sentences_only(data_root: Path, tmp_path: Path) -> None:
    dataset = load_dataset("all", data_root=data_root, split_dir=tmp_path)
    records = dataset.split("train")[:20]
    prompts = load_prompts()
    bank = build_text_bank(records, dataset.classes, prompts, "all", captions_per_image=8, seed=0)
    assert all(k >= 0 for k in bank.text_class)  # every sentence states a class, none an attribute
    assert all(v == -1 for row in bank.text_attributes for v in row)
    assert "early pre-B acute lymphoblastic leukaemia: fast-growing immature lymphocyte cells in the blood" in bank.texts
    assert all(set(c) == {"klass"} and c["klass"] for c in bank.candidates)


def test_scores_and_paired_tests_on_known_predictions() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3] * 5)
    perfect, wrong = y.copy(), (y + 1) % 4
    scored = score(y, perfect, ALL_CLASSES)
    assert scored["accuracy"]["point"] == 1.0 and scored["macro_f1"]["point"] == 1.0
    predictions = {"a-text:zero-shot": {"test": perfect}, "a-text:logistic": {"test": perfect}, "a-text:knn20": {"test": wrong}, "a-ce:head": {"test": wrong}, "a-ce:logistic": {"test": wrong}}
    comparisons = compare_twins(["a-text", "a-ce"], predictions, y, ALL_CLASSES)
    assert [(c["a"], c["b"]) for c in comparisons][0] == ("a-text:zero-shot", "a-ce:head")
    first = comparisons[0]
    assert first["accuracy"]["difference"] == 1.0 and first["accuracy"]["p_value"] < 0.01
    assert all(first["per_class_f1"][c]["difference"] == 1.0 for c in ALL_CLASSES)
    same = comparisons[2]  # knn20 vs head: identical predictions
    assert same["accuracy"]["difference"] == 0.0 and same["accuracy"]["p_value"] == 1.0


@pytest.fixture()
def tinyinit(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """The session's tiny checkpoint under the name the runs are labelled by ('tinyinit')."""
    return Path(shutil.copy(tiny_checkpoint, tmp_path / "tinyinit.pt"))


@pytest.mark.slow
def test_study_fine_tunes_both_twins_and_writes_the_report(
    data_root: Path, tmp_path: Path, tinyinit: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(leukaemia_study, "N_RESAMPLES", 200)  # fewer bootstrap resamples: same code path, faster
    out, runs = tmp_path / "report", tmp_path / "runs"
    paths = run_study(out, runs, [str(tinyinit)], TINY, data_root=data_root, include_shipped=False, max_eval_images=8,
                      bench=tmp_path / "bench.json", progress=False)
    for name in ("report.md", "report.html", "metrics.json", "per-class-f1.png", "confusion-tinyinit-text-zero-shot.png",
                 "confusion-tinyinit-ce-head.png", "curves-tinyinit-text.png"):
        assert (out / name).is_file(), name
    assert paths["bench"].is_file()
    # fine-tuned from the tiny checkpoint: ALL class head, same tower for both twins, weights moved
    initial, _ = load_checkpoint(tinyinit)
    trained = {twin: load_checkpoint(runs / twin / "best.pt") for twin in ("tinyinit-text", "tinyinit-ce")}
    for twin, (model, meta) in trained.items():
        assert model.class_names == ALL_CLASSES
        assert meta["extra"]["train_config"]["init_checkpoint"] == str(tinyinit)
        moved = [k for k, v in model.visual.state_dict().items() if v.is_floating_point() and not np.allclose(v.numpy(), initial.visual.state_dict()[k].numpy())]
        assert moved, twin
    # the CE twin is a plain classifier: its text side stays exactly as initialised
    ce_model = trained["tinyinit-ce"][0]
    assert np.array_equal(ce_model.text_projection.weight.detach().numpy(), initial.text_projection.weight.detach().numpy())
    assert ce_model.logit_scale.item() == initial.logit_scale.item()
    text_cfg = json.loads((runs / "tinyinit-text" / "config.json").read_text())
    ce_cfg = json.loads((runs / "tinyinit-ce" / "config.json").read_text())
    assert text_cfg["model"] == ce_cfg["model"]
    history = [json.loads(line) for line in (runs / "tinyinit-text" / "metrics.jsonl").read_text().splitlines()]
    assert "val_zs_class_macro_f1" in history[0] and "val_zs_attr_macro_f1" not in history[0]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"]["records_after_dedup"] == 3216
    assert set(metrics["methods"]) == {f"tinyinit-text:{m}" for m in ("zero-shot", "logistic", "knn20")} | {f"tinyinit-ce:{m}" for m in ("head", "logistic", "knn20")}
    for result in metrics["methods"].values():
        assert 4 <= result["test"]["n"] <= 8  # a stratified subset: at least one image per class
        assert result["test"]["accuracy"]["low"] <= result["test"]["accuracy"]["point"] <= result["test"]["accuracy"]["high"]
    assert metrics["selected_on_val"] in metrics["methods"]
    assert len(metrics["comparisons"]) == 4
    assert all(0 < c["macro_f1"]["p_value"] <= 1 for c in metrics["comparisons"])
    assert "Paired bootstrap" in (out / "report.md").read_text()

    # training again keeps finished runs (no retraining) and refuses changed settings
    arms = arms_for([str(tinyinit)])
    before = (runs / "tinyinit-text" / "last.pt").stat().st_mtime_ns
    assert train_arms(arms, runs, TINY, data_root=data_root, progress=False) == {
        "tinyinit-text": {"trained_now": False},
        "tinyinit-ce": {"trained_now": False},
    }
    assert (runs / "tinyinit-text" / "last.pt").stat().st_mtime_ns == before
    with pytest.raises(HemaclipError, match="other settings"):
        train_arms(arms, runs, {**TINY, "lr": 0.5}, data_root=data_root, progress=False)


def test_init_checkpoint_cannot_take_model_overrides(tmp_path: Path, tinyinit: Path) -> None:
    from hemaclip.train.trainer import initial_model

    config = dataclasses.replace(arm_config(Arm(str(tinyinit), "text")), model_overrides={"image_size": 64})
    with pytest.raises(HemaclipError, match="model_overrides"):
        initial_model(config, ALL_CLASSES)
    model = initial_model(dataclasses.replace(config, model_overrides={}), ALL_CLASSES)
    assert model.class_names == ALL_CLASSES and model.class_head.out_features == 4


def test_arm_variants_change_only_what_they_say() -> None:
    from hemaclip_research.leukaemia_colour import study_arms

    arms = study_arms("default")
    assert [a.name for a in arms.values()] == ["default-ce", "default-ce-grey", "default-text-grey", "default-ce-clusters"]
    colour = arm_config(arms["colour"]).to_dict()
    for role, differing in (("grey-ce", {"preprocess"}), ("clusters", set())):
        other = arm_config(arms[role]).to_dict()
        assert {k for k in colour if colour[k] != other[k]} == differing, role
    assert arm_config(arms["grey-ce"]).preprocess == {"colour": "grey"} == arm_config(arms["grey-text"]).preprocess
    text, grey_text = arm_config(Arm("default", "text")).to_dict(), arm_config(arms["grey-text"]).to_dict()
    assert {k for k in text if text[k] != grey_text[k]} == {"preprocess"}
    with pytest.raises(HemaclipError, match="unknown variant"):
        arm_config(Arm("default", "ce", "sepia"))


@pytest.mark.slow
def test_colour_study_trains_grey_and_cluster_twins_and_writes_the_report(
    data_root: Path, tmp_path: Path, tinyinit: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hemaclip_research import leukaemia_colour
    from hemaclip_research.leukaemia_colour import run_colour_study

    monkeypatch.setattr(leukaemia_study, "N_RESAMPLES", 200)
    monkeypatch.setattr(leukaemia_colour, "N_RESAMPLES", 200)
    monkeypatch.setattr(leukaemia_colour, "SALIENCY_MEASURED_PER_CLASS", 2)
    out, runs = tmp_path / "report", tmp_path / "runs"
    paths = run_colour_study(out, runs, TINY, data_root=data_root, init=str(tinyinit), max_eval_images=8, sensitivity_k=(32,),
                             bench=tmp_path / "bench.json", progress=False)
    for name in ("report.md", "report.html", "metrics.json", "saliency-grad-cam.png", "confusion-tinyinit-ce-grey-head.png"):
        assert (out / name).is_file(), name
    assert paths["bench"].is_file()
    # the grey twins carry the option in their checkpoints; the colour twin does not
    for run, grey in (("tinyinit-ce", False), ("tinyinit-ce-grey", True), ("tinyinit-text-grey", True)):
        model, _ = load_checkpoint(runs / run / "best.pt")
        assert (model.config.preprocess == {"colour": "grey"}) is grey, run
    # the cluster run trained on the cluster split, which keeps every cluster in one split
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cluster_split"]["clusters_in_two_splits"] == 0 and metrics["sensitivity"]["32"]["audit"]["clusters_in_two_splits"] == 0
    assert (runs / "tinyinit-ce-clusters" / "splits" / "all_seed0.csv").read_text() != (runs / "tinyinit-ce" / "splits" / "all_seed0.csv").read_text()
    shortcut_keys = {"colour-stats:logistic", "colour-hist:logistic", "pixels-8x8:logistic"}
    shipped = {f"shipped:{m}" for m in ("zero-shot", "logistic", "knn20")}
    assert set(metrics["methods"]["per_image"]) == shortcut_keys | shipped | {"shipped-grey:logistic", "shipped-grey:knn20"} | {f"tinyinit-ce:{m}" for m in ("head", "logistic", "knn20")} | {
        f"tinyinit-ce-grey:{m}" for m in ("head", "logistic", "knn20")} | {f"tinyinit-text-grey:{m}" for m in ("zero-shot", "logistic", "knn20")}
    assert set(metrics["methods"]["clusters"]) == shortcut_keys | shipped | {f"tinyinit-ce-clusters:{m}" for m in ("head", "logistic", "knn20")}
    pairs = {(c["a"], c["b"]) for c in metrics["comparisons"]["per_image"]}
    assert ("tinyinit-ce-grey:head", "tinyinit-ce:head") in pairs and ("tinyinit-text-grey:zero-shot", "tinyinit-ce:head") in pairs
    assert ("tinyinit-ce:head", "colour-stats:logistic") in pairs
    assert ("shipped-grey:logistic", "shipped:logistic") in pairs  # the frozen tower on grey vs colour input
    assert len(metrics["comparisons"]["clusters"]) == 6 and len(metrics["drops"]) == 5  # (retrained CE, shipped probe) x 3 readers; 2 + 3 drops
    assert metrics["drops"][0]["per_image"] == "tinyinit-ce:head" and metrics["drops"][0]["clusters"] == "tinyinit-ce-clusters:head"
    assert all("macro_f1_cluster" in c for c in metrics["comparisons"]["clusters"])
    assert all(d["accuracy"]["low"] <= d["accuracy"]["difference"] <= d["accuracy"]["high"] for d in metrics["drops"])
    assert set(metrics["saliency"]["enrichment"]) == {"tinyinit-ce", "tinyinit-ce-grey", "tinyinit-text-grey"}
    text = (out / "report.md").read_text()
    assert "can and cannot show" in text and "Clusters in two splits: **0**" in text
