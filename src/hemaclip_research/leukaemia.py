"""The leukaemia study (`hemaclip leukemia run`): ALL subtypes with class sentences vs a plain supervised
classifier, scored with bootstrap intervals and paired tests, written as a report.

Training and prediction live in `hemaclip.tasks.leukaemia`; scoring and the report live here, in the
studies layer above tasks.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from hemaclip.errors import HemaclipError
from hemaclip.log import logged_run

DEFAULT_INITS = ("default", "imagenet")
N_RESAMPLES = 2000


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


def _class_f1(index: int) -> Callable[[np.ndarray, np.ndarray], float]:
    """F1 of one class as a metric of (y_true, y_pred), for per-class paired tests."""
    from hemaclip.metrics.classification import class_f1

    return lambda y_true, y_pred: class_f1(y_true, y_pred, index)


def score(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Accuracy and macro F1 with 95 % stratified bootstrap intervals, per-class numbers, confusion counts."""
    from hemaclip.metrics.classification import accuracy, classification_report_dict
    from hemaclip.metrics.statistics import bootstrap_ci, bootstrap_macro_f1

    report = classification_report_dict(y_true, y_pred, list(classes))
    return {
        "n": int(len(y_true)),
        "accuracy": bootstrap_ci(accuracy, y_true, y_pred, n_resamples=N_RESAMPLES, seed=seed),
        "macro_f1": bootstrap_macro_f1(y_true, y_pred, len(classes), n_resamples=N_RESAMPLES, seed=seed),
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
    }


def paired_comparison(a: str, b: str, predictions: Mapping[str, Mapping[str, np.ndarray]], y_true: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Paired bootstrap test of reading `a` against reading `b` on the test split: accuracy, macro F1 and
    each class's F1 (differences A - B with 95 % intervals and p)."""
    from hemaclip.metrics.classification import accuracy
    from hemaclip.metrics.statistics import paired_bootstrap_macro_f1, paired_bootstrap_test

    pa, pb = predictions[a]["test"], predictions[b]["test"]
    return {
        "a": a,
        "b": b,
        "accuracy": paired_bootstrap_test(accuracy, y_true, pa, pb, n_resamples=N_RESAMPLES),
        "macro_f1": paired_bootstrap_macro_f1(y_true, pa, pb, len(classes), n_resamples=N_RESAMPLES),
        "per_class_f1": {c: paired_bootstrap_test(_class_f1(i), y_true, pa, pb, n_resamples=N_RESAMPLES) for i, c in enumerate(classes)},
    }


def compare_twins(arm_names: Sequence[str], predictions: Mapping[str, Mapping[str, np.ndarray]], y_true: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    """Paired bootstrap tests on the test split: each reading of a text twin against its CE twin.

    Overall accuracy and macro F1, plus per-class F1 differences (where language helps or hurts).
    """
    pairs = []
    inits = dict.fromkeys(name.rsplit("-", 1)[0] for name in arm_names)
    for init in inits:
        text, ce = f"{init}-text", f"{init}-ce"
        if text not in arm_names or ce not in arm_names:
            continue
        for a, b in ((f"{text}:zero-shot", f"{ce}:head"), (f"{text}:logistic", f"{ce}:head"), (f"{text}:knn20", f"{ce}:head"), (f"{text}:logistic", f"{ce}:logistic")):
            pairs.append(paired_comparison(a, b, predictions, y_true, classes))
    return pairs


def score_study(predicted: Mapping[str, Any], arm_names: Sequence[str]) -> dict[str, Any]:
    """Scores of every reading on val and test, the reading chosen on validation, and the twin comparisons."""
    classes, truth = predicted["classes"], predicted["truth"]
    methods = {
        key: {split: score(truth[split], pred[split], classes) for split in ("val", "test")} for key, pred in predicted["predictions"].items()
    }
    # Chosen on validation only (accuracy, then macro F1); the test split never picks anything.
    selected = max(methods, key=lambda k: (methods[k]["val"]["accuracy"]["point"], methods[k]["val"]["macro_f1"]["point"]))
    return {
        "classes": classes,
        "methods": methods,
        "selected_on_val": selected,
        "comparisons": compare_twins(arm_names, predicted["predictions"], truth["test"], classes),
        "eval_seconds": predicted["eval_seconds"],
    }


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    import os
    import platform

    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _plot_per_class_f1(methods: Mapping[str, Any], classes: Sequence[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hemaclip.io import atomic_write

    keys = [k for k in methods if k.split(":")[1] in ("zero-shot", "head")]
    fig, ax = plt.subplots(figsize=(8.5, 3.8))
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        per_class = methods[key]["test"]["per_class"]
        ax.bar(np.arange(len(classes)) + i * width, [per_class[c]["f1"] for c in classes], width, label=key)
    ax.set_xticks(np.arange(len(classes)) + width * (len(keys) - 1) / 2, list(classes))
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test F1")
    ax.set_title("per-class F1 on the test split")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path


def write_leukaemia_report(
    out: Path,
    audit: Mapping[str, Any],
    study: Mapping[str, Any],
    histories: Mapping[str, Mapping[str, Any]],
    runs_dir: Path,
    command: str,
    training: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write report.md, report.html and metrics.json with confusion matrices, F1 bars and training curves."""
    from hemaclip_research.plots import plot_confusion
    from hemaclip_research.report import Section, Table, write_report
    from hemaclip.tasks.leukaemia import SPLITS

    out.mkdir(parents=True, exist_ok=True)
    classes = study["classes"]
    methods = study["methods"]
    confusions = []
    for key in methods:
        name, method = key.split(":")
        if method in ("zero-shot", "head"):
            path = plot_confusion(methods[key]["test"]["confusion_matrix"], classes, out / f"confusion-{name}-{method}.png", normalized=True, title=f"{key} (test)")
            confusions.append((path, f"{key}: test confusion matrix, rows normalised"))
    curves = []
    for name in histories:
        source = runs_dir / name / "curves.png"
        if source.is_file():
            target = out / f"curves-{name}.png"
            shutil.copyfile(source, target)
            curves.append((target, f"{name}: training loss and validation macro F1 per epoch"))
    f1_bars = _plot_per_class_f1(methods, classes, out / "per-class-f1.png")

    dropped = ", ".join(f"{k}: {v}" for k, v in audit["dropped_by_class"].items()) or "none"
    data_text = (
        f"ALL set (Aria et al.): {audit['files_found']} files found; {audit['duplicates']['files_dropped']} exact duplicates "
        f"dropped before splitting (by folder: {dropped}); {audit['records_after_dedup']} images kept and split 70/10/20, "
        f"stratified by class, seed {audit['seed']} (saved as CSV in each run's `splits/`).\n\n"
        f"Checks: files in two splits: {audit['path_overlap_across_splits']}; identical contents (SHA-1) in two splits: "
        f"{audit['hashes_in_two_splits']}; the saved split reloads identically: {'yes' if audit['reload_identical'] else 'NO'}.\n\n"
        "Patient identifiers are not available, so the split is per image: cells of one patient can sit in both train "
        "and test, which makes every number below optimistic for unseen patients."
    )
    data_rows = [[split, *[audit["per_split_class"][split].get(c, 0) for c in classes], audit["split_sizes"][split]] for split in SPLITS]

    run_rows = []
    for name, hist in histories.items():
        last = hist["epochs"][-1]
        wall = (training or {}).get(name, {}).get("wall_seconds")
        run_rows.append([
            name, len(hist["epochs"]), hist["train_images"], hist["best_epoch"], hist["select_metric"],
            float(np.mean([r["train_images_per_s"] for r in hist["epochs"]])), hist["train_loop_seconds"] / 60,
            wall / 60 if wall else None, last.get("val_zs_class_macro_f1"), last.get("val_head_class_macro_f1"),
        ])

    selected = study["selected_on_val"]
    chosen = methods[selected]["test"]
    method_rows = [[key, r["val"]["accuracy"]["point"], r["val"]["macro_f1"]["point"], r["test"]["accuracy"], r["test"]["macro_f1"]] for key, r in methods.items()]
    results_text = (
        "One row per model and reading. `INIT-text`: trained with the ALL class sentences as the text side "
        "(image-text); `INIT-ce`: a plain cross-entropy classifier of the same tower, same init, epochs, "
        "augmentations and data; `shipped`: the shipped model with no ALL training (reference). Readings: "
        "`zero-shot` = image-to-text similarity with the class prompt ensemble, `head` = the class head, "
        "`logistic` / `knn20` = probes fitted on the training split's embeddings. 95 % stratified bootstrap "
        f"intervals ({N_RESAMPLES} resamples) over the {chosen['n']} test images.\n\n"
        f"Chosen on validation accuracy alone (then validation macro F1, then table order): **{selected}**: test accuracy {chosen['accuracy']['point']:.3f} "
        f"[{chosen['accuracy']['low']:.3f}, {chosen['accuracy']['high']:.3f}], test macro F1 {chosen['macro_f1']['point']:.3f} "
        f"[{chosen['macro_f1']['low']:.3f}, {chosen['macro_f1']['high']:.3f}]."
    )
    comparison_rows, per_class_rows = [], []
    for comp in study["comparisons"]:
        acc, f1 = comp["accuracy"], comp["macro_f1"]
        label = f"{comp['a']} − {comp['b']}"
        comparison_rows.append([label, acc["metric_a"], acc["metric_b"], (acc["difference"], acc["low"], acc["high"]), acc["p_value"], (f1["difference"], f1["low"], f1["high"]), f1["p_value"]])
        for c in classes:
            d = comp["per_class_f1"][c]
            per_class_rows.append([label, c, d["metric_a"], d["metric_b"], (d["difference"], d["low"], d["high"]), d["p_value"]])

    summary = _comparison_summary(study["comparisons"], classes)
    sections = [
        Section("What was measured", f"Command: `{command}` on {_machine()['cpu_count']} CPU cores, no GPU. "
                "Each run kept the checkpoint best on the validation split; probes were fitted on the training split; "
                "the test split only scored the chosen checkpoints. Research software: not a diagnostic performance claim."),
        Section("Data and split", data_text, tables=[Table(["split", *classes, "total"], data_rows, caption="images per split and class")]),
        Section("Training runs", "Training-loop minutes = images per epoch / the images/s each epoch recorded (validation "
                "excluded); wall minutes (only for runs trained by this invocation) include validation and checkpoints. "
                "Speeds are as measured and include any other load the machine carried at the time.",
                tables=[Table(["run", "epochs", "train images", "best epoch", "selected on", "img/s", "train-loop min", "wall min", "last val zero-shot F1", "last val head F1"], run_rows)],
                figures=curves),
        Section("Results on the held-out test split", results_text,
                tables=[Table(["model:reading", "val accuracy", "val macro F1", "test accuracy [95 % CI]", "test macro F1 [95 % CI]"], method_rows)],
                figures=[*confusions, (f1_bars, "per-class F1 on the test split")]),
        Section("Does language help? Paired bootstrap tests", "Differences A − B on the same test images (paired "
                f"percentile bootstrap, {N_RESAMPLES} resamples; two-sided p by the centred method; no correction for "
                f"multiple comparisons).\n\n{summary}",
                tables=[Table(["A − B", "accuracy A", "accuracy B", "difference [95 % CI]", "p", "macro F1 difference [95 % CI]", "p"], comparison_rows),
                        Table(["A − B", "class", "F1 A", "F1 B", "F1 difference [95 % CI]", "p"], per_class_rows, caption="per class")]),
    ]
    metrics = {
        "command": command,
        "machine": _machine(),
        "split": dict(audit),
        "runs": dict(histories),
        "training_sessions": dict(training or {}),
        "methods": methods,
        "selected_on_val": selected,
        "comparisons": study["comparisons"],
        "eval_seconds": study["eval_seconds"],
    }
    return write_report(out, "Leukaemia subtypes (ALL): class sentences vs a plain classifier", sections, metrics, checkpoint=str(runs_dir))


def _comparison_summary(comparisons: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> str:
    """Plain sentences read off the paired tests: which differences have a 95 % interval excluding zero."""
    lines = []
    for comp in comparisons:
        acc = comp["accuracy"]
        verdict = "higher" if acc["low"] > 0 else "lower" if acc["high"] < 0 else "not distinguishable (interval includes 0)"
        where = [f"{c} ({comp['per_class_f1'][c]['difference']:+.3f})" for c in classes
                 if comp["per_class_f1"][c]["low"] > 0 or comp["per_class_f1"][c]["high"] < 0]
        lines.append(
            f"- {comp['a']} vs {comp['b']}: accuracy {acc['metric_a']:.3f} vs {acc['metric_b']:.3f}, A is {verdict}; "
            f"per-class F1 differences with an interval excluding 0: {', '.join(where) if where else 'none'}."
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The whole study
# ------------------------------------------------------------------------------------------------


@logged_run("leukaemia")
def run_study(
    out: Path,
    runs_dir: Path,
    inits: Sequence[str] = DEFAULT_INITS,
    overrides: Mapping[str, Any] | None = None,
    data_root: Path | None = None,
    train_missing: bool = True,
    include_shipped: bool = True,
    max_eval_images: int | None = None,
    bench: Path | None = None,
    command: str = "hemaclip leukemia run",
    progress: bool | None = None,
) -> dict[str, Path]:
    """Train (or reuse) both twins per init, score them, write the report (and optionally a bench JSON)."""
    from hemaclip.io import write_json
    from hemaclip.tasks.leukaemia import arms_for, predict_study, run_history, split_audit, train_arms

    arms = arms_for(list(inits))
    tick = time.perf_counter()
    training: dict[str, dict[str, Any]] = {}
    if train_missing:
        training = train_arms(arms, runs_dir, overrides, data_root=data_root, progress=progress)
    missing = [str(runs_dir / a.name / "best.pt") for a in arms if not (runs_dir / a.name / "best.pt").is_file()]
    if missing:
        raise HemaclipError(f"{missing[0]}: run not trained (drop --no-train to train it)")
    histories = {a.name: run_history(runs_dir / a.name) for a in arms}
    audit = split_audit(data_root, runs_dir / arms[0].name / "splits")
    predicted = predict_study(arms, runs_dir, data_root=data_root, include_shipped=include_shipped, max_eval_images=max_eval_images,
                              progress=progress is not False)
    study = score_study(predicted, [a.name for a in arms])
    paths = write_leukaemia_report(out, audit, study, histories, runs_dir, command, training)
    if bench is not None:
        write_json(bench, {
            "command": command,
            "machine": _machine(),
            "total_seconds": time.perf_counter() - tick,
            "runs": {name: {"train_images": h["train_images"], "epochs": len(h["epochs"]), "train_loop_seconds": h["train_loop_seconds"],
                            "mean_train_images_per_s": float(np.mean([r["train_images_per_s"] for r in h["epochs"]])),
                            **training.get(name, {})} for name, h in histories.items()},
            "eval_seconds": study["eval_seconds"],
            "selected_on_val": study["selected_on_val"],
            "test": {k: {"accuracy": v["test"]["accuracy"]["point"], "macro_f1": v["test"]["macro_f1"]["point"]} for k, v in study["methods"].items()},
        })
        paths["bench"] = bench
    return paths
