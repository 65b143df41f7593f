"""Leukaemia subtypes (ALL set): does training with descriptive sentences beat a plain classifier?

The study trains, for each initialisation ("default" = the shipped hemaclip model, "imagenet",
"scratch" or a checkpoint path), two twins that differ only in their objective:

- ``<init>-text``: image-text alignment with the ALL class sentences of `prompts.yaml` as the text side
  (multi-positive contrastive loss, no class head loss);
- ``<init>-ce``: a plain supervised classifier of the *same* tower (cross-entropy on the class head of
  the 256-d image embedding), same init, epochs, augmentations, data, seed and schedule.

Each run keeps the checkpoint best on the validation split (zero-shot macro F1 for the text twin,
class-head macro F1 for the CE twin); the test split is only read to score those checkpoints.
Image-text models are read by image-to-text similarity (the class prompt ensemble) and by probes on
their embeddings; CE models by their head (and the same probes). Paired bootstrap tests on the test
split compare the twins overall and per class (scoring and the report live in the studies layer,
`hemaclip_research.leukaemia`, above tasks).

The colour study (`hemaclip leukemia colour`) adds arm *variants*: ``grey`` (the same recipe on luma-only
input, at training and inference: the model config's ``preprocess.colour``) and ``clusters`` (the same
recipe on a split that keeps acquisition-like colour clusters whole), and the shortcut readers of
`hemaclip.tasks.shortcuts` fitted on the same split.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hemaclip.data.datasets import ALL_FRACTIONS, CellDataset, CellRecord, load_dataset
from hemaclip.data.dedupe import file_hashes
from hemaclip.data.image_cache import decoded_images
from hemaclip.data.preprocess import preprocess_for
from hemaclip.errors import HemaclipError
from hemaclip.log import get_logger
from hemaclip.models.checkpoint import load_for_inference
from hemaclip.models.default import default_checkpoint_path
from hemaclip.models.inference import image_outputs
from hemaclip.models.text_cache import PooledTextCache
from hemaclip.models.zero_shot import build_zero_shot_classifier
from hemaclip.tasks.probes import fit_predict
from hemaclip.text.prompts import load_prompts
from hemaclip.train.config import TrainConfig, load_train_config
from hemaclip.train.trainer import stratified_subset, train

DATASET = "all"
SPLITS = ("train", "val", "test")
# Packaged training configs of the image-text twin, per named initialisation.
INIT_CONFIGS: dict[str, str] = {"default": "all-finetune", "imagenet": "all-imagenet", "scratch": "all-scratch"}
# What turns an image-text config into its supervised twin: nothing else changes.
SUPERVISED_OVERRIDES: dict[str, Any] = {"contrastive_weight": 0.0, "class_head_weight": 1.0, "select_metric": "val_head_class_macro_f1"}
OBJECTIVES = ("text", "ce")
TEXT_METHODS = ("zero-shot", "logistic", "knn20")  # how an image-text model classifies
CE_METHODS = ("head", "logistic", "knn20")  # how a supervised model classifies
SHIPPED = "shipped"  # the shipped model read as is (no ALL training): a reference row
# Arm variants of the colour study: what each changes in the arm's training config.
VARIANTS: dict[str, dict[str, Any]] = {"": {}, "grey": {"preprocess": {"colour": "grey"}}, "clusters": {}}
# Clusters of the grouped split: one per patient the source reports (Aria et al.: 89), a stand-in for
# acquisition sessions; the rule is fixed before looking at any result.
CLUSTER_K = 89

logger = get_logger(__name__)


@dataclass(frozen=True)
class Arm:
    """One training run of the study: an initialisation, an objective ('text' or 'ce') and a variant
    ('' = as packaged, 'grey' = luma-only input, 'clusters' = the cluster-grouped split)."""

    init: str
    objective: str
    variant: str = ""

    @property
    def label(self) -> str:
        return init_label(self.init)

    @property
    def name(self) -> str:
        return f"{self.label}-{self.objective}" + (f"-{self.variant}" if self.variant else "")

    @property
    def methods(self) -> tuple[str, ...]:
        return TEXT_METHODS if self.objective == "text" else CE_METHODS


def init_label(init: str) -> str:
    """Short name of an initialisation: the named ones as they are, a checkpoint path by its file stem."""
    return init if init in INIT_CONFIGS else Path(init).stem


def arms_for(inits: Sequence[str]) -> list[Arm]:
    """The text twin and the CE twin for each initialisation, in order."""
    labels = [init_label(i) for i in inits]
    if len(set(labels)) != len(labels):
        raise HemaclipError(f"initialisations must have distinct names, got {', '.join(labels)}")
    for init in inits:
        if init not in INIT_CONFIGS and not Path(init).is_file():
            raise HemaclipError(f"--init {init}: not one of {', '.join(INIT_CONFIGS)} and no such checkpoint file")
    return [Arm(init, objective) for init in inits for objective in OBJECTIVES]


def supervised_twin(config: TrainConfig) -> TrainConfig:
    """The plain cross-entropy classifier matching an image-text config (same tower, data, schedule)."""
    return dataclasses.replace(config, **SUPERVISED_OVERRIDES)


def arm_config(arm: Arm, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Training config of an arm: the packaged ALL config of its init, `overrides` on top, then its objective."""
    if arm.objective not in OBJECTIVES:
        raise HemaclipError(f"unknown objective '{arm.objective}' (choose from {', '.join(OBJECTIVES)})")
    if arm.variant not in VARIANTS:
        raise HemaclipError(f"unknown variant '{arm.variant}' (choose from {', '.join(v or 'none' for v in VARIANTS)})")
    extra = {**dict(overrides or {}), **VARIANTS[arm.variant]}
    if arm.init in INIT_CONFIGS:
        config = load_train_config(INIT_CONFIGS[arm.init], extra)
    else:
        config = load_train_config(INIT_CONFIGS["default"], {**extra, "init_checkpoint": str(arm.init)})
    return supervised_twin(config) if arm.objective == "ce" else config


# ------------------------------------------------------------------------------------------------
# The split: counts, duplicates, leakage checks
# ------------------------------------------------------------------------------------------------


def split_audit(data_root: str | Path | None, split_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Counts per split and class, what deduplication dropped, and checks that the split cannot leak.

    Checks: no file in two splits, no identical content (SHA-1) in two splits, and the split saved in
    `split_dir` reloads to exactly the same assignment.
    """
    dataset = load_dataset(DATASET, data_root=data_root, split_dir=split_dir, seed=seed)
    again = load_dataset(DATASET, data_root=data_root, split_dir=split_dir, seed=seed)
    first = {str(r.path): r.split for r in dataset.records}
    second = {str(r.path): r.split for r in again.records}
    by_split = {s: {str(r.path) for r in dataset.split(s)} for s in SPLITS}
    path_overlap = sum(len(by_split[a] & by_split[b]) for i, a in enumerate(SPLITS) for b in SPLITS[i + 1 :])
    hashes = file_hashes([r.path for r in dataset.records])
    splits_of_hash: dict[str, set[str]] = {}
    for record in dataset.records:
        splits_of_hash.setdefault(hashes[record.path], set()).add(record.split)
    summary = dataset.summary()
    return {
        "files_found": dataset.files_found,
        "records_after_dedup": len(dataset.records),
        "duplicates": summary["duplicates"],
        "dropped_by_class": dict(Counter(_folder_label(p) for p in dataset.duplicates.dropped)) if dataset.duplicates else {},
        "split_sizes": summary["split_sizes"],
        "per_split_class": summary["per_split_class"],
        "path_overlap_across_splits": path_overlap,
        "hashes_in_two_splits": sum(1 for s in splits_of_hash.values() if len(s) > 1),
        "duplicate_hashes_kept": len(dataset.records) - len(splits_of_hash),
        "reload_identical": first == second,
        "split_file": str(split_dir / f"all_seed{seed}.csv"),
        "seed": seed,
    }


def _folder_label(path: Path) -> str:
    return path.parent.name


def split_file(split_dir: Path, seed: int = 0) -> Path:
    """Where a run keeps its ALL split (the trainer reads and writes it there)."""
    return split_dir / f"all_seed{seed}.csv"


def make_cluster_split(split_dir: Path, data_root: str | Path | None = None, k: int = CLUSTER_K, seed: int = 0) -> dict[str, str]:
    """Cluster the deduplicated ALL images on colour and background statistics (k-means, `k` clusters),
    assign whole clusters to train/val/test (:func:`hemaclip.data.splits.grouped_stratified_split`, 70/10/20
    of the images per class) and save the split with each image's cluster as its ``group`` column in
    `split_dir`, where training picks it up. Returns key -> split. An existing split is kept."""
    from hemaclip.data.paths import resolve_data_root
    from hemaclip.data.splits import check_groups_within_splits, grouped_stratified_split, save_split
    from hemaclip.tasks.shortcuts import acquisition_clusters, cluster_features

    path = split_file(split_dir, seed)
    if path.is_file():
        return {row["key"]: row["split"] for row in _read_rows(path)}
    dataset = load_dataset(DATASET, data_root=data_root, split_dir=None, seed=seed)
    root = resolve_data_root(data_root)
    keys = [str(Path(r.path).relative_to(root)) for r in dataset.records]
    labels = [r.label for r in dataset.records]
    clusters = [str(c) for c in acquisition_clusters(cluster_features([r.path for r in dataset.records]), k, seed)]
    assignment = grouped_stratified_split(keys, labels, clusters, ALL_FRACTIONS, seed)
    check_groups_within_splits(assignment, dict(zip(keys, clusters)), str(path))
    save_split(path, assignment, dict(zip(keys, labels)), dict(zip(keys, clusters)))
    return assignment


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def cluster_audit(split_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Clusters per split, clusters found in more than one split (must be 0), class balance per split,
    cluster sizes and purity, read back from the saved split's ``group`` column."""
    rows = _read_rows(split_file(split_dir, seed))
    if not rows or "group" not in rows[0]:
        raise HemaclipError(f"{split_file(split_dir, seed)}: not a cluster-grouped split (no group column)")
    split = {r["key"]: r["split"] for r in rows}
    label = {r["key"]: r["label"] for r in rows}
    cluster_of = {r["key"]: r["group"] for r in rows}
    splits_of: dict[str, set[str]] = {}
    classes_of: dict[str, Counter] = {}
    for key, c in cluster_of.items():
        splits_of.setdefault(c, set()).add(split[key])
        classes_of.setdefault(c, Counter())[label[key]] += 1
    sizes = {c: sum(n.values()) for c, n in classes_of.items()}
    purity = {c: max(n.values()) / sizes[c] for c, n in classes_of.items()}
    return {
        "k": len(sizes),
        "clusters_per_split": {s: sum(1 for v in splits_of.values() if v == {s}) for s in SPLITS},
        "clusters_in_two_splits": sum(1 for v in splits_of.values() if len(v) > 1),
        "per_split_class": {s: dict(sorted(Counter(label[k] for k in split if split[k] == s).items())) for s in SPLITS},
        "split_sizes": {s: sum(1 for v in split.values() if v == s) for s in SPLITS},
        "cluster_sizes": {"min": min(sizes.values()), "median": float(np.median(list(sizes.values()))), "max": max(sizes.values())},
        "mean_cluster_purity": float(np.mean(list(purity.values()))),
        "images_in_one_class_clusters": int(sum(n for c, n in sizes.items() if purity[c] == 1.0)),
        "split_file": str(split_file(split_dir, seed)),
    }


def cluster_groups(split_dir: Path, keys: Sequence[str], seed: int = 0) -> np.ndarray:
    """The cluster of each key (in order) from a cluster-grouped split: the groups of a cluster bootstrap."""
    cluster_of = {r["key"]: r["group"] for r in _read_rows(split_file(split_dir, seed))}
    return np.array([cluster_of[k] for k in keys])


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _run_finished(run_dir: Path, epochs: int) -> bool:
    last = run_dir / "last.pt"
    if not last.is_file():
        return False
    state = torch.load(last, map_location="cpu", weights_only=True)["extra"]["train_state"]
    return state["epoch"] >= epochs and state["step"] == 0


def _check_same_config(run_dir: Path, config: TrainConfig) -> None:
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return
    # Through the dataclass, so options added after the run was made compare at their defaults.
    saved = TrainConfig.from_dict(json.loads(saved_path.read_text())["train"], source=str(saved_path)).to_dict()
    wanted = config.to_dict()
    differing = sorted(k for k in wanted if k != "device" and saved[k] != wanted[k])
    if differing:
        raise HemaclipError(f"{run_dir}: holds a run with other settings ({', '.join(differing)}); choose another --runs folder")


def train_arms(
    arms: Sequence[Arm],
    runs_dir: Path,
    overrides: Mapping[str, Any] | None = None,
    data_root: str | Path | None = None,
    progress: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Train each arm into `runs_dir/<arm>` (finished runs are kept, stopped ones resumed).

    Returns per arm whether it was trained now and the wall seconds of this session's training.
    """
    done: dict[str, dict[str, Any]] = {}
    for arm in arms:
        config = arm_config(arm, overrides)
        run_dir = runs_dir / arm.name
        _check_same_config(run_dir, config)
        if arm.variant == "clusters":
            make_cluster_split(run_dir / "splits", data_root, seed=config.seed)
        if _run_finished(run_dir, config.epochs):
            logger.info("%s: finished run found in %s, kept", arm.name, run_dir)
            done[arm.name] = {"trained_now": False}
            continue
        resume = (run_dir / "last.pt").is_file()
        logger.info("%s: %s in %s", arm.name, "resuming" if resume else "training", run_dir)
        tick = time.perf_counter()
        train(config, run_dir, resume=resume, data_root=data_root, progress=progress)
        done[arm.name] = {"trained_now": True, "wall_seconds": time.perf_counter() - tick, "resumed": resume}
    return done


def run_history(run_dir: Path) -> dict[str, Any]:
    """Epoch rows of a run, the epoch its best.pt comes from, and the training-loop time they record."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config = json.loads((run_dir / "config.json").read_text())["train"]
    best_meta = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)["extra"]
    n_train = _train_count(run_dir, config)
    images_per_epoch = (n_train // config["batch_size"]) * config["batch_size"]
    return {
        "epochs": rows,
        "best_epoch": best_meta["metrics"]["epoch"],
        "select_metric": config.get("select_metric"),
        "train_images": n_train,
        # Images per epoch over measured images/s: the optimisation loop only (validation excluded).
        "train_loop_seconds": float(sum(images_per_epoch / r["train_images_per_s"] for r in rows)),
    }


def _train_count(run_dir: Path, config: Mapping[str, Any]) -> int:
    split_file = run_dir / "splits" / f"all_seed{config['seed']}.csv"
    lines = split_file.read_text().splitlines()[1:]
    count = sum(1 for line in lines if line.rsplit(",", 1)[-1].strip() == "train")
    limit = config.get("max_train_images")
    return min(count, limit) if limit else count


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


@dataclass
class Embedded:
    """One model's reading of the records of every split: embeddings, class-head logits, labels."""

    features: dict[str, np.ndarray]
    class_logits: dict[str, np.ndarray | None]
    labels: dict[str, np.ndarray]


def embed_splits(
    model: torch.nn.Module, records: Mapping[str, Sequence[CellRecord]], classes: Sequence[str], device: str = "cpu", progress: bool = False
) -> Embedded:
    """Embed each split's images once (decoded-image cache at the model's size); keep the class head if it fits."""
    index = {c: i for i, c in enumerate(classes)}
    features, logits, labels = {}, {}, {}
    for split, recs in records.items():
        images = decoded_images([r.path for r in recs], model.config.image_size, progress=progress, preprocess=preprocess_for(model))
        out = image_outputs(model, images, device=device, progress=progress)
        features[split] = out["features"].numpy()
        head = out["class_logits"]
        if head is not None and tuple(model.class_names) == tuple(classes):
            logits[split] = head.numpy()
        else:
            logits[split] = None
        labels[split] = np.array([index[r.label] for r in recs], dtype=np.int64)
    return Embedded(features, logits, labels)


def predict(model: torch.nn.Module, emb: Embedded, method: str, classes: Sequence[str], prompts_file: str | None = None) -> dict[str, np.ndarray]:
    """Predicted class indices on val and test for one method ('zero-shot', 'head' or a probe name)."""
    out: dict[str, np.ndarray] = {}
    if method == "zero-shot":
        class_prompts = load_prompts(prompts_file).class_prompts(DATASET)
        weights = build_zero_shot_classifier(model, {c: class_prompts[c] for c in classes}, PooledTextCache(model.text)).cpu().numpy()
        for split in ("val", "test"):
            out[split] = np.argmax(emb.features[split] @ weights.T, axis=1)
    elif method == "head":
        for split in ("val", "test"):
            logits = emb.class_logits[split]
            if logits is None:
                raise HemaclipError("this model has no class head for the ALL classes")
            out[split] = np.argmax(logits, axis=1)
    else:
        names = np.asarray(classes, dtype=object)
        train_y = names[emb.labels["train"]]
        index = {c: i for i, c in enumerate(classes)}
        n_val = len(emb.features["val"])
        # Fitted once on the training split, then applied to val and test together.
        predicted, _ = fit_predict(method, emb.features["train"], train_y, np.concatenate([emb.features["val"], emb.features["test"]]))
        as_index = np.array([index[p] for p in predicted], dtype=np.int64)
        out["val"], out["test"] = as_index[:n_val], as_index[n_val:]
    return out


def study_records(split_dir: Path, data_root: str | Path | None = None, max_eval_images: int | None = None) -> tuple[list[str], dict[str, list[CellRecord]]]:
    """The classes and the records of each split a study reads (a stratified subset with `max_eval_images`)."""
    dataset: CellDataset = load_dataset(DATASET, data_root=data_root, split_dir=split_dir)
    return list(dataset.classes), {s: stratified_subset(dataset.split(s), max_eval_images, 0) for s in SPLITS}


def predict_shortcuts(split_dir: Path, data_root: str | Path | None = None, max_eval_images: int | None = None) -> dict[str, Any]:
    """Every shortcut reader of `hemaclip.tasks.shortcuts` fitted on the train split of `split_dir`, C
    chosen on val: ``predictions`` ("<name>:logistic" -> split -> class indices), ``truth`` and ``fits``
    (chosen C, validation scores per C, training size)."""
    from hemaclip.tasks.shortcuts import SHORTCUTS, fit_shortcut, shortcut_features

    classes, records = study_records(split_dir, data_root, max_eval_images)
    empty = [s for s in SPLITS if not records[s]]
    if empty:
        raise HemaclipError(f"{split_file(split_dir)}: the {', '.join(empty)} split is empty (too few clusters?); shortcut readers need all three")
    index = {c: i for i, c in enumerate(classes)}
    labels = {s: np.array([index[r.label] for r in records[s]], dtype=np.int64) for s in SPLITS}
    predictions, fits = {}, {}
    for name in SHORTCUTS:
        features = {s: shortcut_features(name, [r.path for r in records[s]]) for s in SPLITS}
        fit = fit_shortcut(features, {s: labels[s] for s in ("train", "val")}, len(classes))
        predictions[f"{name}:logistic"] = fit.pop("predictions")
        fit.pop("model")
        fits[name] = fit
    return {"classes": classes, "truth": {s: labels[s] for s in ("val", "test")}, "predictions": predictions, "fits": fits}


def predict_study(
    arms: Sequence[Arm],
    runs_dir: Path,
    data_root: str | Path | None = None,
    include_shipped: bool = True,
    max_eval_images: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    split_dir: Path | None = None,
    shipped_grey: bool = False,
) -> dict[str, Any]:
    """Predictions on val and test of every arm's best.pt (and the shipped model as is), per reading, on
    the split the arms were trained on (or `split_dir`, which every arm must share). `shipped_grey` also
    reads the shipped model on luma-only input ("shipped-grey": its probes; no training).

    Returns ``classes``, ``truth`` (split -> class indices), ``predictions`` ("<model>:<reading>" ->
    split -> class indices) and ``eval_seconds`` per model. Scoring is left to the caller (the studies layer).
    """
    split_dir = split_dir or runs_dir / arms[0].name / "splits"
    reference = split_file(split_dir).read_text()
    for arm in arms:
        other = runs_dir / arm.name / "splits" / "all_seed0.csv"
        if other.read_text() != reference:
            raise HemaclipError(f"{other}: the runs were trained on different splits; they cannot be compared")
    classes, records = study_records(split_dir, data_root, max_eval_images)
    models: list[tuple[str, Path, tuple[str, ...]]] = []
    if include_shipped:
        models.append((SHIPPED, default_checkpoint_path(), TEXT_METHODS))
    if shipped_grey:
        models.append((f"{SHIPPED}-grey", default_checkpoint_path(), ("logistic", "knn20")))
    models += [(arm.name, runs_dir / arm.name / "best.pt", arm.methods) for arm in arms]
    predictions: dict[str, dict[str, np.ndarray]] = {}
    timings: dict[str, float] = {}
    truth: dict[str, np.ndarray] = {}
    for name, checkpoint, methods in models:
        tick = time.perf_counter()
        model, meta = load_for_inference(checkpoint)
        if name == f"{SHIPPED}-grey":
            model.config = model.config.replace(preprocess={**model.config.preprocess, "colour": "grey"})
        model.to(device)
        prompts_file = ((meta.get("extra") or {}).get("train_config") or {}).get("prompts")
        emb = embed_splits(model, records, classes, device=device, progress=progress)
        truth = {s: emb.labels[s] for s in ("val", "test")}
        for method in methods:
            predictions[f"{name}:{method}"] = predict(model, emb, method, classes, prompts_file)
        timings[name] = time.perf_counter() - tick
        logger.info("%s: embedded and read in %.0f s", name, timings[name])
    return {"classes": classes, "truth": truth, "predictions": predictions, "eval_seconds": timings}
