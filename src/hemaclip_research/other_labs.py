"""Other labs: how checkpoints read cells from labs, stains and cameras they never trained on.

Each cell is read exactly as ``hemaclip describe`` reads it (the model's own preprocessing with cell
finding, its calibrated class read-out, its familiarity sidecar), and scored over the five white-cell
classes the other labs label: a prediction of any other class (erythroblast, ig, platelet) is wrong, as
it is for a user. Leave-one-lab-out: a checkpoint whose training used a lab (its ``dataset`` or
``extra_datasets``) is not scored on that lab; the table says so instead of printing a flattering number.

Per checkpoint, lab and adaptation (``none``; ``bn`` = AdaBN on the lab's cells first; ``entropy`` = Tent,
the class read-out's entropy minimised on the lab's cells first; ``reinhard`` /
``macenko`` = stain normalisation to the PBC reference first; ``white-cells`` = the class read-out renormalised over
the five white-cell classes, as ``describe --classes`` does for a folder known to hold only white cells): macro F1 and
accuracy with 95 % bootstrap intervals (whole near-duplicate groups resampled where the lab has them,
as LISC does), per-class F1, confusion, top-label ECE of the calibrated probabilities, mean confidence,
the share flagged unfamiliar with the accuracy on the cells not flagged, and the folder-shift verdict.
Paired tests compare each checkpoint against the first one (the baseline) on the same cells.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.errors import HemaclipError

if TYPE_CHECKING:
    from hemaclip.data.datasets import CellRecord
    from hemaclip.tasks.describe import Describer

WHITE_CELL_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
OTHER_LABS = ("lisc", "zheng1", "zheng2")
# Test-time options: AdaBN, Tent, stain normalisation to PBC, the read-out restricted to the labs' white-cell classes.
ADAPTATIONS = ("none", "bn", "entropy", "reinhard", "macenko", "white-cells")
MODEL_ADAPTATIONS = ("bn", "entropy")  # the ones that change the model on the lab's own cells
N_RESAMPLES = 2000
CHUNK = 256  # cells per model call when reading a lab
# Below this many cells of a class in a lab's part, its F1 rests on a handful of calls: the macro F1 is also
# reported over the classes with at least this many cells, naming the ones left out.
MIN_CLASS_CELLS = 5


@dataclass(frozen=True)
class ModelEntry:
    """One checkpoint to score: a short name for the tables, its path (None = the shipped model)."""

    name: str
    checkpoint: str | None


@dataclass
class LabReading:
    """What one checkpoint said about every cell of one lab's split."""

    truth: list[str]
    groups: list[str]
    predicted: list[str]
    probability: np.ndarray  # top calibrated probability per cell
    probs: np.ndarray  # [N, C] calibrated class probabilities over the model's vocabulary
    class_names: list[str]
    unfamiliar: np.ndarray | None  # bool per cell, None without a familiarity sidecar
    scores: np.ndarray | None
    shift: dict[str, Any] | None
    seconds: float
    features: np.ndarray | None = None  # [N, D] embeddings (to compare unfamiliarity scores on the same reading)
    # Flags under the bar that applies to the lab's folder as a whole (stricter when the shift warning fires).
    unfamiliar_in_folder: np.ndarray | None = None


def trained_datasets(checkpoint: str | None) -> set[str]:
    """The datasets a checkpoint's training read (its ``dataset`` and ``extra_datasets``)."""
    from hemaclip.models.checkpoint import load_checkpoint
    from hemaclip.models.default import resolve_checkpoint

    _model, meta = load_checkpoint(resolve_checkpoint(checkpoint))
    config = (meta.get("extra") or {}).get("train_config") or {}
    return {str(d) for d in [config.get("dataset"), config.get("val_dataset"), *(config.get("extra_datasets") or [])] if d}


def read_lab(describer: Describer, records: Sequence[CellRecord], adapt: str) -> LabReading:
    """Read every record's cell with `describer` (cell finding, calibrated read-out, familiarity), after
    adapting the model to these cells first when `adapt` is one of :data:`MODEL_ADAPTATIONS`."""
    from hemaclip.data.image_cache import decoded_images
    from hemaclip.data.preprocess import CellView

    start = time.perf_counter()
    pre = describer.preprocess
    arrays = decoded_images([r.path for r in records], pre.image_size, preprocess=pre, progress=False)
    if adapt in MODEL_ADAPTATIONS:
        describer.adapt_to(arrays)
    side = pre.image_size
    normalise = describer.stain_normalizer or (lambda a: a)
    views = [CellView(normalise(np.asarray(a)), (0, 0, side, side)) for a in arrays]
    descriptions = []
    for start_row in range(0, len(views), CHUNK):  # bounded memory: the model sees CHUNK cells at a time
        chunk = slice(start_row, start_row + CHUNK)
        descriptions += describer.describe_views(views[chunk], [str(r.path) for r in records[chunk]], [0] * len(views[chunk]))
    probs = np.stack([d.class_probabilities for d in descriptions]).astype(np.float64)
    unfamiliar = None if descriptions[0].unfamiliar is None else np.array([bool(d.unfamiliar) for d in descriptions])
    scores = None if descriptions[0].unfamiliarity is None else np.array([float(d.unfamiliarity) for d in descriptions])
    shift = folder_flagged = None
    if scores is not None:
        verdict, folder_flagged = describer.familiarity.folder_flags(scores)
        shift = verdict.to_dict() if verdict is not None else None
    return LabReading(
        truth=[r.label for r in records], groups=[str(r.group or r.path) for r in records],
        predicted=[d.label for d in descriptions], probability=np.array([d.probability for d in descriptions]),
        probs=probs, class_names=list(describer.readout.class_names), unfamiliar=unfamiliar, scores=scores,
        shift=shift, seconds=time.perf_counter() - start, features=np.stack([d.embedding for d in descriptions]),
        unfamiliar_in_folder=folder_flagged)


def score_reading(reading: LabReading, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """Macro F1 / accuracy with intervals, per class, confusion, ECE, selective accuracy of one reading."""
    from hemaclip.metrics.calibration import reliability_bins
    from hemaclip.metrics.classification import classes_with_at_least, classification_report_dict
    from hemaclip.metrics.statistics import cluster_bootstrap_accuracy, cluster_bootstrap_macro_f1

    labels = list(WHITE_CELL_CLASSES)
    shown = labels + sorted(set(reading.predicted) - set(labels))
    index = {c: i for i, c in enumerate(shown)}
    t = np.array([index[y] for y in reading.truth])
    p = np.array([index[y] for y in reading.predicted])
    report = classification_report_dict(t, p, shown)
    correct = (t == p).astype(float)
    grouped = len(set(reading.groups)) < len(reading.groups)
    f1 = cluster_bootstrap_macro_f1(reading.truth, reading.predicted, labels, reading.groups, n_resamples, seed=seed)
    acc = cluster_bootstrap_accuracy(reading.truth, reading.predicted, labels, reading.groups, n_resamples, seed=seed)
    vocab = {c: i for i, c in enumerate(reading.class_names)}
    probs = reading.probs
    if any(y not in vocab for y in reading.truth):  # a class the checkpoint cannot read (held out in training): always wrong
        probs = np.hstack([probs, np.zeros((len(probs), 1))])
    bins = reliability_bins(probs, np.array([vocab.get(y, len(vocab)) for y in reading.truth]))
    present = [c for c in labels if c in set(reading.truth)]
    kept = classes_with_at_least(reading.truth, present, MIN_CLASS_CELLS)
    result: dict[str, Any] = {
        "n": len(t), "n_groups": len(set(reading.groups)),
        "interval_method": "cluster bootstrap over near-duplicate groups" if grouped else "stratified bootstrap over cells",
        "macro_f1": f1, "accuracy": acc, "mean_confidence": float(reading.probability.mean()),
        "ece": bins["ece"], "reliability": bins,
        "per_class_f1": {c: report["per_class"][c]["f1"] for c in present},
        "per_class_n": {c: int(report["per_class"][c]["support"]) for c in present},
        "macro_f1_min_cells": {"min_cells": MIN_CLASS_CELLS, "classes": kept,
                               "left_out": [c for c in present if c not in kept],
                               # the per-class F1 above (all cells scored), averaged over the classes kept
                               "point": float(np.mean([report["per_class"][c]["f1"] for c in kept])) if kept else None},
        "confusion_labels": shown, "confusion_matrix": report["confusion_matrix"],
        "seconds": round(reading.seconds, 1),
    }
    if reading.unfamiliar is not None:
        keep = ~reading.unfamiliar
        result["flagged_share"] = float(reading.unfamiliar.mean())
        result["n_unflagged"] = int(keep.sum())
        result["accuracy_unflagged"] = float(correct[keep].mean()) if keep.any() else None
        result["folder_shift"] = reading.shift
    if reading.unfamiliar_in_folder is not None:  # the flags describe's folder verdict tells the user to read
        keep = ~reading.unfamiliar_in_folder
        result["folder_bar"] = {"flagged_share": float(reading.unfamiliar_in_folder.mean()), "n_unflagged": int(keep.sum()),
                                "accuracy_unflagged": float(correct[keep].mean()) if keep.any() else None}
    return result


def _paired(baseline: LabReading, other: LabReading, n_resamples: int, seed: int) -> dict[str, Any]:
    from hemaclip.metrics.statistics import paired_cluster_bootstrap_macro_f1

    return paired_cluster_bootstrap_macro_f1(baseline.truth, other.predicted, baseline.predicted, list(WHITE_CELL_CLASSES),
                                             baseline.groups, n_resamples, seed=seed)


def run_other_labs(
    models: Sequence[ModelEntry],
    out: str | Path,
    labs: Sequence[str] = OTHER_LABS,
    split: str = "test",
    adaptations: Sequence[str] = ADAPTATIONS,
    data_root: str | Path | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every model on every lab it did not train on; write metrics.json, report.md/html and
    confusion/reliability figures into `out`. The first model is the baseline of the paired tests."""
    from hemaclip.data.datasets import load_dataset
    from hemaclip_research import plots
    from hemaclip_research.report import Section, Table, write_report
    from hemaclip.tasks.describe import Describer

    if not models:
        raise HemaclipError("give at least one checkpoint to score")
    unknown = [a for a in adaptations if a not in ADAPTATIONS]
    if unknown:
        raise HemaclipError(f"unknown adaptation {', '.join(unknown)} (choose from {', '.join(ADAPTATIONS)})")
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    records = {lab: load_dataset(lab, data_root=data_root).split(split) for lab in labs}
    for lab, recs in records.items():
        if not recs:
            raise HemaclipError(f"dataset {lab} has no {split} split")
    metrics: dict[str, Any] = {"split": split, "labs": list(labs), "adaptations": list(adaptations),
                               "classes": list(WHITE_CELL_CLASSES), "models": {}, "paired_vs_baseline": {},
                               "n_resamples": n_resamples, "seed": seed,
                               "scoring": "5 white-cell classes; a prediction of any other class counts as wrong"}
    readings: dict[tuple[str, str, str], LabReading] = {}
    figures: list[tuple[Path, str]] = []
    for entry in models:
        trained = trained_datasets(entry.checkpoint)
        metrics["models"][entry.name] = {"checkpoint": entry.checkpoint or "shipped default", "trained_on": sorted(trained), "labs": {}}
        for adapt in adaptations:
            from hemaclip.data.stain import get_normalizer

            describer = Describer.from_checkpoint(entry.checkpoint, index=None, data_root=data_root,
                                                  adapt=adapt if adapt in MODEL_ADAPTATIONS else None,
                                                  stain_normalizer=get_normalizer(adapt) if adapt in ("reinhard", "macenko") else None)
            if adapt == "white-cells":  # those of the five the checkpoint reads (a class held out in training is not)
                describer.restrict_to([c for c in WHITE_CELL_CLASSES if c in describer.readout.class_names])
            for lab in labs:
                key = f"{lab}/{adapt}"
                if lab in trained:
                    metrics["models"][entry.name]["labs"][key] = {"not_scored": "lab used in training (leave-one-lab-out)"}
                    continue
                if progress:
                    print(f"{entry.name}: {lab} ({split}, adaptation {adapt}) ...", flush=True)
                reading = read_lab(describer, records[lab], adapt)
                readings[(entry.name, lab, adapt)] = reading
                result = score_reading(reading, n_resamples, seed)
                metrics["models"][entry.name]["labs"][key] = result
                path = out / "figures" / f"confusion_{entry.name}_{lab}_{adapt}.png"
                plots.plot_confusion(result["confusion_matrix"], result["confusion_labels"], path, normalized=True,
                                     title=f"{entry.name}, {lab} {split} ({adapt}): row-normalised")
                figures.append((path, f"{entry.name} on {lab} ({adapt})"))
    baseline = models[0].name
    for entry in models[1:]:
        for lab in labs:
            for adapt in adaptations:
                a, b = readings.get((baseline, lab, adapt)), readings.get((entry.name, lab, adapt))
                if a is not None and b is not None:
                    metrics["paired_vs_baseline"][f"{entry.name}/{lab}/{adapt}"] = _paired(a, b, n_resamples, seed)
    sections = _sections(metrics, figures, Table, Section)
    write_report(out, f"Other labs ({split} parts): {', '.join(m.name for m in models)}", sections, metrics,
                 checkpoint=models[-1].checkpoint or "shipped default")
    return metrics


def _sections(metrics: dict[str, Any], figures: list[tuple[Path, str]], Table: Any, Section: Any) -> list[Any]:
    rows, per_class = [], []
    for name, block in metrics["models"].items():
        for key, r in block["labs"].items():
            lab, adapt = key.split("/")
            if "not_scored" in r:
                rows.append([name, lab, adapt, "not scored: lab used in training", None, None, None, None, None, None, None, None])
                continue
            f1 = r["macro_f1"]
            big = r["macro_f1_min_cells"]
            rows.append([name, lab, adapt, r["n"], (f1["point"], f1["low"], f1["high"]), big["point"],
                         ", ".join(big["left_out"]) or "none",
                         (r["accuracy"]["point"], r["accuracy"]["low"], r["accuracy"]["high"]), r["mean_confidence"], r["ece"],
                         r.get("flagged_share"), r.get("accuracy_unflagged")])
            per_class.append([name, lab, adapt] + [v for c in WHITE_CELL_CLASSES
                                                   for v in (r["per_class_f1"].get(c), r["per_class_n"].get(c, 0))])
    paired = [[k, v["metric_a"], v["metric_b"], (v["difference"], v["low"], v["high"]), v["p_value"]]
              for k, v in metrics["paired_vs_baseline"].items()] if metrics["paired_vs_baseline"] else []
    text = (f"Split: {metrics['split']} part of each lab. {metrics['scoring']}. Intervals: 95 % percentile bootstrap "
            f"({metrics['n_resamples']} resamples; LISC resamples whole near-duplicate groups). Adaptation `bn` re-estimates "
            "BatchNorm statistics on the lab's cells before reading them (AdaBN); `entropy` trains BatchNorm's scales and "
            "shifts to minimise the entropy of the class read-out on them first (Tent); `reinhard` / `macenko` normalise each "
            "cell's stain to the PBC reference first (`--stain-norm`); `white-cells` renormalises the class read-out over the five "
            "white-cell classes, as a user who knows the folder holds only white cells can ask (`describe --classes`). `flagged` is the share of cells the "
            "familiarity score calls unfamiliar; `acc unflagged` the accuracy on the rest.")
    text += (f" `macro F1, classes ≥ {MIN_CLASS_CELLS}` averages the per-class F1 over the classes with at least "
             f"{MIN_CLASS_CELLS} cells in that part (the classes left out are named): a class with one or two cells moves "
             "the full macro F1 by a whole term on a single call.")
    sections = [Section("Per lab", text, [Table(["model", "lab", "adaptation", "cells", "macro F1",
                                                  f"macro F1, classes ≥ {MIN_CLASS_CELLS}", "left out", "accuracy",
                                                  "mean confidence", "ECE", "flagged", "acc unflagged"], rows)])]
    sections.append(Section("Per-class F1", "F1 of each class with its number of cells (n) in that part.",
                            [Table(["model", "lab", "adaptation", *[h for c in WHITE_CELL_CLASSES for h in (f"{c} F1", "n")]],
                                   per_class)]))
    if paired:
        sections.append(Section("Paired tests against the baseline",
                                f"Macro F1 of each model minus the first model ({next(iter(metrics['models']))}) on the same cells.",
                                [Table(["model/lab/adaptation", "macro F1", "baseline", "difference [95 %]", "p"], paired)]))
    sections.append(Section("Confusion matrices", "", figures=figures))
    return sections
