"""End-to-end evaluation and comparison with a tiny random model on a small real subset (32 px).

Kept small on purpose (a few images per class, 200 resamples, a 2-point n-shot grid): the
numbers are meaningless, the test checks the plumbing, the files and the invariants.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from hemaclip.errors import DataError, HemaclipError
from hemaclip_research.compare import parse_system, run_compare
from hemaclip_research.evaluate import load_class_map, resolve_class_map, run_evaluation

CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
PER_CLASS = 5
N_BOOT = 200
KS = (1, 3, 5, 10)


@pytest.fixture(scope="module")
def checkpoint(tiny_vit_checkpoint) -> Path:
    return tiny_vit_checkpoint


@pytest.fixture(scope="module")
def evaluation(checkpoint, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    metrics = run_evaluation(
        checkpoint, "wbcatt", "test", out, data_root=data_root, n_boot=N_BOOT, seed=0,
        max_per_class=PER_CLASS, nshot_shots=(1, 3), nshot_seeds=(0, 1),
    )
    return out, metrics


def _ci_blocks(node, path=""):
    """Every bootstrap-style dict (with 'point') anywhere in the metrics."""
    if isinstance(node, dict):
        if "point" in node:
            yield path, node
        for key, value in node.items():
            yield from _ci_blocks(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _ci_blocks(value, f"{path}[{i}]")


def test_report_files_and_figures(evaluation):
    out, metrics = evaluation
    for name in ("metrics.json", "report.md", "report.html", "run.log"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert "hemaclip evaluate run" in (out / "run.log").read_text() and "embedding map" in (out / "run.log").read_text()
    assert len(metrics["figures"]) >= 10
    for name in metrics["figures"]:
        assert name.endswith(".png") and (out / name).is_file(), name
    for name in ("zero_shot_confusion_counts.png", "zero_shot_confusion_normalized.png", "reliability_before.png",
                 "reliability_after.png", "selective_accuracy.png", "retrieval_grid.png", "nshot_curves.png",
                 "embedding_map_class.png", "embedding_map_nucleus_shape.png", "zero_shot_attributes_f1.png"):
        assert name in metrics["figures"], name
    on_disk = json.loads((out / "metrics.json").read_text())
    for key in ("checkpoint", "checkpoint_sha1", "dataset", "split", "n_images", "seconds", "n_boot", "seed",
                "hemaclip_version"):
        assert key in on_disk, key
    assert on_disk["n_images"] == PER_CLASS * len(CLASSES)
    assert on_disk["n_boot"] == N_BOOT and on_disk["dataset"] == "wbcatt" and on_disk["split"] == "test"
    assert len(on_disk["checkpoint_sha1"]) == 40
    report = (out / "report.md").read_text()
    for heading in ("Zero-shot classification", "Zero-shot attributes", "Calibration", "Retrieval", "probes",
                    "n-shot curves", "LVLM benchmark preset", "Embedding map"):
        assert heading in report, heading
    assert "QUOTED" in report and "0.220" in report and "0.360" in report
    # Zero-shot through both wordings, labelled: the trained one and the held-out one no training sentence uses.
    assert "| trained wording |" in report and "| unseen wording |" in report and "Macro F1, unseen wording" in report
    unseen = on_disk["zero_shot_unseen_wording"]
    assert on_disk["zero_shot"]["classes"]["wording"] == "train" and unseen["classes"]["wording"] == "heldout"
    assert unseen["classes"]["n"] == on_disk["zero_shot"]["classes"]["n"] and len(unseen["attribute_table"]) == 11
    assert 0.0 <= unseen["attribute_mean_macro_f1"] <= 1.0


def test_baselines_beside_every_class_and_attribute_row_and_rows_below_them_marked(evaluation):
    """Majority and prior-random F1 (prior from the train split) beside each per-class and per-attribute row; the
    mark appears on exactly the rows whose F1 is not above both."""
    out, _ = evaluation
    on_disk = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    assert report.count("Majority F1") >= 2 and "Prior-random F1" in report and "baselines' prior: train split" in report
    classes = on_disk["zero_shot"]["classes"]
    base = classes["baselines"]
    # The train split's labels (capped here at PER_CLASS per class like the scored split: a uniform prior, ties to the first).
    assert base["reference"] == "train split" and base["n_reference"] == len(CLASSES) * PER_CLASS
    assert set(base["majority"]["per_class"]) == set(CLASSES) and base["majority_label"] == "basophil"
    assert base["prior_random"]["macro_f1"] == pytest.approx(0.2, abs=0.05)
    checked = 0
    for head in (on_disk["zero_shot"]["attributes"], on_disk["heads"]["attributes"], on_disk["attribute_probes"]["logistic"]):
        for name, block in head.items():
            b = block["baselines"]
            assert block["beats_baselines"] == (block["macro_f1"]["point"] > b["majority"] and block["macro_f1"]["point"] > b["prior_random"])
            checked += 1
    assert checked == 33
    marked = [line for line in report.splitlines() if "NOT above baselines" in line]
    below = [n for n, blk in on_disk["heads"]["attributes"].items() if not blk["beats_baselines"]]
    assert below and all(any(line.startswith(f"| {n} |") for line in marked) for n in below)  # a random tiny model: some rows fail
    assert "baseline: majority" in report and on_disk["probe_baselines"]["reference"] == "train split"


def test_anchors_table_cites_every_figure_and_sets_this_runs_numbers_beside(evaluation):
    """Every anchor has paper, table, split, metric and protocol difference; on WBCAtt test hemaclip's numbers of this
    run (trained and unseen wording) stand beside them; the report states how many images it scored."""
    from hemaclip_research.anchors import ANCHORS

    out, metrics = evaluation
    report = (out / "report.md").read_text()
    on_disk = json.loads((out / "metrics.json").read_text())
    assert len(on_disk["anchors"]) == len(ANCHORS) >= 15
    for anchor in on_disk["anchors"]:
        assert all(anchor[k] for k in ("system", "value", "metric", "split", "source", "table", "protocol_difference")), anchor
    assert "## Anchors (published figures, quoted)" in report and "quoted, not reproduced" in report
    assert f"This run scored {metrics['n_images']} images of wbcatt / test." in report
    row = next(line for line in report.splitlines() if line.startswith("| WBC-CLIP ViT-Small |") and "class macro F1" in line)
    assert "0.985" in row and "WBC-CLIP, Computerized Medical Imaging and Graphics, 2025, Table 2" in row
    zs = metrics["zero_shot"]["classes"]["macro_f1"]["point"]
    held = metrics["zero_shot_unseen_wording"]["classes"]["macro_f1"]["point"]
    assert f"hemaclip zero-shot, trained wording {zs:.3f}; hemaclip zero-shot, unseen wording {held:.3f}" in row


def test_metrics_in_unit_interval_and_cis_contain_point(evaluation):
    _, metrics = evaluation
    blocks = list(_ci_blocks(metrics))
    assert len(blocks) > 40
    with_ci = 0
    for path, ci in blocks:
        assert 0.0 <= ci["point"] <= 1.0, path
        if ci.get("low") is not None:
            with_ci += 1
            assert 0.0 <= ci["low"] <= ci["point"] + 1e-12 and ci["point"] <= ci["high"] + 1e-12 <= 1.0 + 1e-12, path
            assert ci["n_resamples"] == N_BOOT
    assert with_ci > 30
    zs = metrics["zero_shot"]["classes"]
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1"):
        assert zs[name]["low"] is not None
    assert set(zs["per_class"]) == set(CLASSES)
    assert len(metrics["zero_shot"]["attribute_table"]) == 11
    assert 0.0 <= metrics["zero_shot"]["attribute_mean_macro_f1"] <= 1.0
    assert metrics["heads"]["class"]["applicable"] is True  # model vocabulary covers the WBCAtt classes
    for task in metrics["retrieval"].values():
        for key, value in task.items():
            if "@" in key and value is not None and not math.isnan(value):
                assert 0.0 <= value <= 1.0, key
    cal = metrics["calibration"]
    assert 0.0 <= cal["ece_before"] <= 1.0 and 0.0 <= cal["ece_after"] <= 1.0
    assert cal["selective_accuracy"]["coverage"] == [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


def test_temperature_fitted_on_val(evaluation):
    _, metrics = evaluation
    assert metrics["calibration"]["temperature_fitted_on"] == "val"
    assert metrics["temperature_fitted_on"] == "val"
    assert metrics["calibration"]["n_val"] == PER_CLASS * len(CLASSES)
    assert metrics["calibration"]["temperature"] > 0


def test_temperature_does_not_depend_on_test_labels_or_images(make_tiny_model, tmp_path):
    """The calibration part fits T on the val split alone: shuffling the test labels or replacing the test images
    leaves T unchanged to the last bit, while changing the val labels changes it (so the check can fail)."""
    import numpy as np

    from hemaclip.models.text_cache import PooledTextCache
    from hemaclip_research.evaluate.calibration import calibration_part
    from hemaclip_research.evaluate.classes import ZeroShotReading
    from hemaclip_research.evaluate.inputs import EvalInputs, Figures
    from hemaclip.tasks.features import FeatureSet
    from hemaclip.tasks.zero_shot import zero_shot_classes
    from hemaclip.text.prompts import load_prompts

    model = make_tiny_model()
    prompts, cache = load_prompts(), PooledTextCache(model.text)
    rng = np.random.default_rng(0)

    def features(n, split, labels=None):
        x = rng.normal(size=(n, model.config.embed_dim)).astype(np.float32)
        labels = labels if labels is not None else [CLASSES[i % 5] for i in range(n)]
        return FeatureSet(x / np.linalg.norm(x, axis=1, keepdims=True), list(labels), [f"{split}{i}.png" for i in range(n)],
                          [split] * n, [None] * n)

    val = features(40, "val")

    def temperature(test: FeatureSet, val_set: FeatureSet) -> float:
        inputs = EvalInputs(out=tmp_path, dataset="wbcatt", split="test", n_boot=100, seed=0, eval_features=test,
                            eval_zero_shot_features=test, val_zero_shot_features=val_set,
                            model=model, text_cache=cache, prompt_set=prompts, prompt_dataset="wbcatt", prompt_classes=CLASSES)
        zs = zero_shot_classes(inputs.zero_shot_setting, test)
        reading = ZeroShotReading(zs["y_true"], zs["logits"], zs["class_names"], zs["indices"],
                                  [CLASSES[i] for i in zs["logits"].argmax(axis=1)], 0, {})
        result = calibration_part(inputs, reading, Figures(tmp_path)).metrics["calibration"]
        assert result["temperature_fitted_on"] == "val" and result["n_val"] == 40
        return result["temperature"]

    test = features(30, "test")
    reference = temperature(test, val)
    shuffled = FeatureSet(test.features, list(rng.permutation(test.labels)), test.paths, test.splits, test.attributes)
    assert temperature(shuffled, val) == reference
    assert temperature(features(50, "test"), val) == reference
    other_val = FeatureSet(val.features, list(rng.permutation(val.labels)), val.paths, val.splits, val.attributes)
    assert temperature(test, other_val) != reference


def test_retrieval_probe_and_nshot_keys(evaluation):
    _, metrics = evaluation
    retrieval = metrics["retrieval"]
    for task in ("text_to_image_by_class", "image_to_text_by_class", "text_to_image_by_attribute",
                 "image_to_text_by_attribute", "image_to_image_by_class"):
        for k in KS:
            for what in ("hit", "precision", "mrr", "recall"):
                assert f"{what}@{k}" in retrieval[task], (task, what, k)
    assert set(metrics["probes"]) == {"logistic", "knn1", "knn20", "mlp"}
    for probe in metrics["probes"].values():
        assert probe["macro_f1"]["low"] is not None and probe["weighted_f1"]["low"] is not None
    rows = metrics["nshot"]["rows"]
    assert {(r["kind"], r["shots"]) for r in rows} == {(k, s) for k in ("logistic", "knn1") for s in (1, 3)}
    assert all(r["low"] <= r["macro_f1"] <= r["high"] and len(r["values"]) == 2 for r in rows)
    lvlm = metrics["lvlm_benchmark"]
    assert lvlm["reference_weighted_f1"] == {"gpt-4o zero-shot": 0.22, "gpt-4o few-shot": 0.36}
    assert "hemaclip zero-shot (prompts)" in lvlm["results"]


def test_clear_errors(checkpoint, data_root, tmp_path):
    with pytest.raises(HemaclipError, match="unknown split 'dev'"):
        run_evaluation(checkpoint, "wbcatt", "dev", tmp_path)
    with pytest.raises(HemaclipError, match="class map applies to dataset 'folder' only"):
        run_evaluation(checkpoint, "wbcatt", "test", tmp_path, data_root=data_root, class_map=tmp_path / "m.json")
    with pytest.raises(HemaclipError, match="output folder"):
        run_evaluation(checkpoint, "wbcatt", "test")
    with pytest.raises(DataError, match="class map file does not exist"):
        load_class_map(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        load_class_map(tmp_path / "bad.json")


def test_class_map_resolution(tmp_path):
    vocab = {"wbcatt": list(CLASSES), "pbc": ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte",
                                               "monocyte", "neutrophil", "platelet"]}
    (tmp_path / "map.csv").write_text("folder,class\nLymph,Lymphocyte\nplt,platelet\nodd,\nweird,banana\n")
    rows, hint = load_class_map(tmp_path / "map.csv")
    resolved = resolve_class_map(rows, ["Lymph", "plt", "odd", "weird", "extra"], vocab, hint)
    assert resolved.prompt_dataset == "pbc"  # the only vocabulary with both lymphocyte and platelet
    assert resolved.mapping == {"Lymph": "lymphocyte", "plt": "platelet"}
    assert set(resolved.unmapped) == {"odd", "weird", "extra"}
    assert "not a 'pbc' prompt class" in resolved.unmapped["weird"]
    with pytest.raises(DataError, match="does not have"):
        resolve_class_map([("nope", "lymphocyte")], ["Lymph"], vocab)
    with pytest.raises(DataError, match="none of the class map targets"):
        resolve_class_map([("Lymph", "banana")], ["Lymph"], vocab)


def test_folder_ood_lists_unmapped(checkpoint, data_root, tmp_path):
    from hemaclip.data.datasets import load_dataset

    ds = load_dataset("wbcatt", data_root=data_root)
    root = tmp_path / "clinic"
    sources = {"lympho": "lymphocyte", "neutro": "neutrophil", "blasts": "monocyte"}
    for folder_class, label in sources.items():
        (root / folder_class).mkdir(parents=True)
        for record in [r for r in ds.records if r.label == label][:10]:
            shutil.copy(record.path, root / folder_class / record.path.name)
    class_map = tmp_path / "map.json"
    class_map.write_text(json.dumps({"lympho": "lymphocyte", "neutro": "neutrophil"}))
    out = tmp_path / "ood"
    metrics = run_evaluation(checkpoint, "folder", "test", out, folder=root, class_map=class_map, n_boot=50,
                             probes=False, nshot=False)
    assert metrics["unmapped_classes"] == ["blasts"]
    assert metrics["ood"]["unmapped_reasons"]["blasts"] == "not in the class map"
    assert metrics["ood"]["zero_shot_classes"] == ["lymphocyte", "neutrophil"]
    assert metrics["zero_shot"]["classes"]["labels"] == ["lymphocyte", "neutrophil"]
    assert metrics["zero_shot"]["classes"]["excluded_images"] == metrics["ood"]["unmapped_images"]["blasts"] > 0
    assert json.loads((out / "metrics.json").read_text())["unmapped_classes"] == ["blasts"]
    assert "blasts" in (out / "report.md").read_text()


def test_compare_checkpoint_with_itself(checkpoint, data_root, tmp_path):
    assert parse_system("a.npy:b.csv").kind == "features"
    assert parse_system(checkpoint).kind == "checkpoint"
    result = run_compare(checkpoint, checkpoint, "wbcatt", "test", tmp_path, data_root=data_root, n_boot=100,
                         max_per_class=PER_CLASS)
    comparisons = result["comparisons"]
    for name in ("zero_shot_class_macro_f1", "head_class_macro_f1", "zero_shot_attribute_mean_macro_f1",
                 "head_attribute_mean_macro_f1", "logistic_probe_macro_f1"):
        assert comparisons[name]["difference"] == 0.0, name
        assert comparisons[name]["p_value"] == 1.0, name
        assert comparisons[name]["low"] == comparisons[name]["high"] == 0.0, name
    assert result["n_images"] == PER_CLASS * len(CLASSES)
    for name in ("compare.json", "report.md", "report.html"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "compare.json").read_text())["comparisons"].keys() == comparisons.keys()


def _external_features(folder: Path, name: str, seed: int) -> str:
    """Random features with a class-dependent mean, plus an index CSV, as 'features.npy:index.csv'."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(CLASSES), 16))
    rows, feats = [], []
    for split, n in (("train", 8), ("val", 2), ("test", 5)):
        for c, label in enumerate(CLASSES):
            for i in range(n):
                rows.append(f"cells/{label}_{split}_{i}.png,{label},{split}")
                feats.append(centres[c] + 0.8 * rng.standard_normal(16))
    np.save(folder / f"{name}.npy", np.asarray(feats, dtype=np.float32))
    (folder / "index.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return f"{folder / name}.npy:{folder / 'index.csv'}"


def test_external_features_and_their_comparison(tmp_path):
    spec_a = _external_features(tmp_path, "enc_a", 0)
    features, index_csv = spec_a.split(":")
    out = tmp_path / "ext"
    metrics = run_evaluation(None, "wbcatt", "test", out, features=Path(features), index_csv=Path(index_csv), n_boot=50,
                             nshot_shots=(1, 2), nshot_seeds=(0,), embed_method="pca")
    assert metrics["mode"] == "external_features" and metrics["n_images"] == 25
    assert "zero_shot" not in metrics and "calibration" not in metrics
    assert set(metrics["retrieval"]) == {"image_to_image_by_class"}
    assert metrics["probes"]["logistic"]["macro_f1"]["point"] > 0.5  # the classes are separable
    assert "External encoder" in (out / "report.md").read_text()
    with pytest.raises(HemaclipError, match="not both"):
        run_evaluation(Path(features), "wbcatt", "test", out, features=Path(features), index_csv=Path(index_csv))

    same = run_compare(spec_a, spec_a, "wbcatt", "test", tmp_path / "cmp", n_boot=50)
    assert same["comparisons"]["logistic_probe_macro_f1"]["difference"] == 0.0
    assert same["comparisons"]["logistic_probe_macro_f1"]["p_value"] == 1.0
    assert "zero_shot_class_macro_f1" in same["skipped"]


@pytest.mark.slow
def test_training_validation_f1_equals_evaluate_f1(data_root, tmp_path):
    """One macro F1: the validation numbers a training run logs equal what `hemaclip evaluate` reports
    for the same split (WBCAtt val, every image) and the same checkpoint (the run's last.pt)."""
    from hemaclip.train.config import load_train_config
    from hemaclip.train.trainer import train

    run = tmp_path / "run"
    config = load_train_config("tiny", {"epochs": 1, "max_train_images": 48, "max_val_images": None})
    train(config, run, data_root=data_root, progress=False)
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    metrics = run_evaluation(run / "last.pt", "wbcatt", "val", tmp_path / "eval", data_root=data_root, n_boot=0,
                             probes=False, nshot=False, embed_method="pca")
    assert metrics["n_images"] == 1029  # WBCAtt val after removing byte-identical copies of other-split images
    zs, heads = metrics["zero_shot"], metrics["heads"]
    assert logged["val_zs_class_macro_f1"] == zs["classes"]["macro_f1"]["point"]
    assert logged["val_head_class_macro_f1"] == heads["class"]["macro_f1"]["point"]
    assert logged["val_zs_attr_macro_f1"] == zs["attribute_mean_macro_f1"]
    assert logged["val_head_attr_macro_f1"] == heads["attribute_mean_macro_f1"]
    for name, block in zs["attributes"].items():
        assert logged[f"val_zs_attr_{name}"] == block["macro_f1"]["point"], name


@pytest.mark.slow
def test_validation_equals_evaluate_where_the_old_conventions_differed(checkpoint, data_root, tmp_path):
    """On 3 val images per class many attribute values occur in no image: training-time validation used to
    count each as F1 = 0 (all labels), evaluate left the unpredicted ones out (truth or predictions). Now both
    average the values that occur in the truth, and give the same numbers."""
    import torch

    from hemaclip.data.attributes import ATTRIBUTES
    from hemaclip.data.datasets import load_dataset
    from hemaclip.data.image_cache import decoded_images
    from hemaclip.data.preprocess import preprocess_for
    from hemaclip.models.checkpoint import load_checkpoint
    from hemaclip.models.text_cache import PooledTextCache
    from hemaclip_research.evaluate import cap_per_class
    from hemaclip.text.prompts import load_prompts
    from hemaclip.train.validate import validate

    ds = load_dataset("wbcatt", data_root=data_root)
    records = cap_per_class(ds.split("val"), 3, 0)
    assert any(v not in {r.attributes[n] for r in records} for n, values in ATTRIBUTES.items() for v in values)
    model, _ = load_checkpoint(checkpoint)
    model.to(memory_format=torch.channels_last)  # as the trainer holds it
    images = decoded_images([r.path for r in records], 32, progress=False, preprocess=preprocess_for(model))
    logged = validate(model, images, records, ds.classes, load_prompts(), "wbcatt", PooledTextCache(model.text), torch.device("cpu"))
    metrics = run_evaluation(checkpoint, "wbcatt", "val", tmp_path / "eval", data_root=data_root, n_boot=0, max_per_class=3,
                             probes=False, nshot=False, embed_method="pca")
    zs, heads = metrics["zero_shot"], metrics["heads"]
    assert metrics["n_images"] == len(records) == 15
    assert logged["val_zs_class_macro_f1"] == zs["classes"]["macro_f1"]["point"]
    assert logged["val_head_class_macro_f1"] == heads["class"]["macro_f1"]["point"]
    assert logged["val_zs_attr_macro_f1"] == zs["attribute_mean_macro_f1"]
    assert logged["val_head_attr_macro_f1"] == heads["attribute_mean_macro_f1"]


def test_external_features_have_no_zero_shot_setting(tmp_path):
    """Another encoder's features carry no text tower: asking their inputs for the class-prompt setting is refused
    in one line instead of building a setting around a missing model."""
    import numpy as np

    from hemaclip_research.evaluate.inputs import EvalInputs
    from hemaclip.tasks.features import FeatureSet

    features = FeatureSet(np.eye(2, 4, dtype=np.float32), ["a", "b"], ["a.png", "b.png"], ["test"] * 2, [None] * 2)
    inputs = EvalInputs(out=tmp_path, dataset="folder", split="test", n_boot=0, seed=0, eval_features=features,
                        eval_zero_shot_features=features)
    assert inputs.external
    with pytest.raises(HemaclipError, match="no text tower"):
        inputs.zero_shot_setting
