"""Parts: probes on frozen features, n-shot curves (classes and attributes) and the LVLM-benchmark preset."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.data.attributes import ATTRIBUTES
from hemaclip.errors import DataError
from hemaclip.metrics.baselines import trivial_baselines
from hemaclip.metrics.classification import macro_f1
from hemaclip.metrics.summary import classification_metrics
from hemaclip_research import plots
from hemaclip_research.evaluate.classes import (
    BASELINE_NOTE,
    ZeroShotReading,
    attribute_block,
    attribute_section,
    attribute_summary,
    reference_labels,
)
from hemaclip_research.evaluate.inputs import EvalInputs, Figures, Part
from hemaclip_research.report import Section, Table
from hemaclip.tasks.features import FeatureSet

if TYPE_CHECKING:
    from hemaclip.tasks.probes import LVLMBenchmarkPreset

__all__ = ["NSHOT_KINDS", "PROBE_KINDS", "attribute_probe_part", "fit_probes", "lvlm_part", "nshot_part", "probe_part"]

NSHOT_KINDS: tuple[str, ...] = ("logistic", "knn1")
PROBE_KINDS: tuple[str, ...] = ("logistic", "knn1", "knn20", "mlp")
LVLM_FEW_SHOT = 5
ATTRIBUTE_NSHOT_SHOTS = (1, 5, 10, 25, 50, 100, 200)


def fit_probes(inputs: EvalInputs) -> dict[str, dict[str, Any]] | None:
    """Each probe fitted on the train split's features and run on the evaluated split (None: no train split)."""
    from hemaclip.tasks.probes import run_probes

    if inputs.train_features is None or len(inputs.train_features) == 0:
        return None
    return run_probes(inputs.train_features, inputs.eval_features, kinds=PROBE_KINDS, seed=inputs.seed)


def probe_part(inputs: EvalInputs, probes: Mapping[str, Mapping[str, Any]] | None) -> Part:
    """Logistic, kNN and MLP probes on frozen features: metrics with intervals."""
    if probes is None:
        return Part(notes=["Probes skipped: " + (inputs.train_missing or "no train images.")])
    out: dict[str, Any] = {}
    rows = []
    for kind, r in probes.items():
        res = classification_metrics(r["y_true"], r["y_pred"], r["classes"], inputs.n_boot, inputs.seed,
                                     cis=("accuracy", "macro_f1", "weighted_f1"))
        res.update(n_train=r["n_train"], n_test=r["n_test"], unseen_test_labels=r["unseen_test_labels"])
        out[kind] = res
        rows.append([kind, r["n_train"], r["n_test"], res["macro_f1"], res["weighted_f1"], res["accuracy"]])
    first = next(iter(probes.values()))
    base = trivial_baselines(first["y_true"], first["classes"], *reference_labels(inputs))
    for name in ("majority", "prior_random"):
        rows.append([f"baseline: {name.replace('_', ' ')}", None, first["n_test"], base[name]["macro_f1"], base[name]["weighted_f1"],
                     base[name]["accuracy"]])
    text = ("Probes on frozen, L2-normalised image features, fitted on the train split and tested on the evaluated split "
            "(fixed hyper-parameters, see hemaclip.tasks.probes). " + BASELINE_NOTE)
    return Part({"probes": out, "probe_baselines": base}, [Section("Linear, kNN and MLP probes", text,
                                          [Table(["Probe", "Train images", "Test images", "Macro F1", "Weighted F1", "Accuracy"], rows,
                                                 caption="Probes (95 % bootstrap intervals)")])])


def nshot_part(inputs: EvalInputs, zero_shot_macro_f1: float | None, figures: Figures) -> Part:
    """Probes trained on n images per class (several seeds), beside the zero-shot macro F1 (n = 0)."""
    from hemaclip.tasks.probes import nshot_curve

    if inputs.train_features is None or len(inputs.train_features) == 0:
        return Part(notes=["n-shot curves skipped: " + (inputs.train_missing or "no train images.")])
    rows = nshot_curve(inputs.train_features, inputs.eval_features, shots=inputs.nshot_shots, seeds=inputs.nshot_seeds, kinds=NSHOT_KINDS)
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault((r["kind"], r["shots"]), []).append(r)
    summary = []
    for (kind, shots), group in grouped.items():
        values = []
        for r in group:
            values.append(macro_f1(r["y_true"], r["y_pred"], r["classes"]))
        summary.append({
            "kind": kind,
            "shots": int(shots),
            "macro_f1": float(np.mean(values)),
            "low": float(np.min(values)),
            "high": float(np.max(values)),
            "values": [float(v) for v in values],
            "seeds": [int(r["seed"]) for r in group],
            "n_train": [int(r["n_train"]) for r in group],
            "per_class": group[0]["per_class"],
        })
    metrics = {"shots": list(inputs.nshot_shots), "seeds": list(inputs.nshot_seeds), "kinds": list(NSHOT_KINDS), "rows": summary}
    plot_rows = [dict(r) for r in summary]
    if zero_shot_macro_f1 is not None:
        plot_rows.append({"kind": "prompts", "shots": 0, "macro_f1": zero_shot_macro_f1})
    fig = plots.plot_nshot_curves(plot_rows, figures.path("nshot_curves.png"),
                                  title="n-shot macro F1 (mean over seeds; shaded: min-max)")
    table = Table(["Probe", "Images per class", "Macro F1 (mean)", "min", "max"],
                  [[r["kind"], r["shots"], r["macro_f1"], r["low"], r["high"]] for r in summary],
                  caption=f"n-shot curves, seeds {', '.join(map(str, inputs.nshot_seeds))}")
    section = Section("n-shot curves",
                      "Probes trained on n images per class of the train split (classes with fewer images use all; "
                      "actual counts in metrics.json), tested on the whole evaluated split.",
                      [table], [(fig, "Macro F1 against training images per class.")])
    return Part({"nshot": metrics}, [section])


def attribute_probe_part(inputs: EvalInputs, figures: Figures) -> Part:
    """Logistic probe per WBCAtt attribute (train split -> evaluated split) and its n-shot curve."""
    from hemaclip.tasks.probes import attribute_labels, nshot_curve, run_probes

    if inputs.train_features is None or not any(a is not None for a in inputs.eval_features.attributes):
        return Part()
    if not any(a is not None for a in inputs.train_features.attributes):
        return Part()
    blocks: dict[str, Any] = {}
    curves: dict[int, list[float]] = {}
    for name, values in ATTRIBUTES.items():
        result = run_probes(inputs.train_features, inputs.eval_features, kinds=("logistic",), label_fn=attribute_labels(name),
                            seed=inputs.seed)["logistic"]
        blocks[name] = attribute_block(result["y_true"], result["y_pred"], list(values), inputs.n_boot, inputs.seed,
                                       reference_labels(inputs, name))
        for row in nshot_curve(inputs.train_features, inputs.eval_features, shots=ATTRIBUTE_NSHOT_SHOTS, seeds=inputs.nshot_seeds,
                               kinds=("logistic",), label_fn=attribute_labels(name)):
            curves.setdefault(int(row["shots"]), []).append(macro_f1(row["y_true"], row["y_pred"], list(values)))
    table_rows, mean = attribute_summary(blocks)
    n_seeds = len(inputs.nshot_seeds)
    summary = []
    for shots, values in sorted(curves.items()):
        per_seed = np.asarray(values).reshape(len(ATTRIBUTES), n_seeds).mean(axis=0)  # mean over attributes, per seed
        summary.append({"kind": "logistic (mean of 11 attributes)", "shots": shots, "macro_f1": float(per_seed.mean()),
                        "low": float(per_seed.min()), "high": float(per_seed.max())})
    metrics = {"logistic": blocks, "mean_macro_f1": mean, "nshot": summary}
    fig = plots.plot_per_attribute_f1(table_rows, figures.path("attribute_probe_f1.png"),
                                      reference=plots.HUMAN_INTER_ANNOTATOR_F1, title="Attribute macro F1, logistic probe")
    nfig = plots.plot_nshot_curves(summary, figures.path("attribute_nshot.png"),
                                   title="Attribute n-shot: mean macro F1 over the 11 attributes")
    section = attribute_section(
        "Attribute probes", blocks, mean, fig,
        "A logistic probe per attribute (fixed C = 1, train split -> evaluated split) and its n-shot curve "
        "(n images per attribute value, mean over the 11 attributes; shaded: min-max over seeds).")
    section.figures.append((nfig, "Attribute n-shot curve."))
    return Part({"attribute_probes": metrics}, [section])


def lvlm_part(inputs: EvalInputs, zero_shot: ZeroShotReading | None, probe_pred: Mapping[str, Sequence[str]] | None) -> Part:
    """The LVLM-benchmark preset (50 evaluated images per class, weighted F1) beside the quoted GPT-4o numbers."""
    from hemaclip.tasks.probes import LVLM_BENCHMARK_PRESET, fit_predict, lvlm_test_subset, sample_per_class

    preset = LVLM_BENCHMARK_PRESET
    fs = inputs.eval_features
    try:
        sub_idx = lvlm_rows(fs, lvlm_test_subset, preset)
    except DataError as err:
        return Part(notes=[f"LVLM benchmark preset skipped: {err}"])
    rows_out: dict[str, Any] = {}
    wf1 = ("weighted_f1", "macro_f1")
    if zero_shot is not None:
        pos = {int(i): j for j, i in enumerate(zero_shot.indices)}
        keep = [pos[i] for i in sub_idx if i in pos]
        if keep:
            rows_out["hemaclip zero-shot (prompts)"] = classification_metrics(
                [zero_shot.y_true[j] for j in keep], [zero_shot.pred[j] for j in keep], zero_shot.class_names,
                inputs.n_boot, inputs.seed, cis=wf1)
    if probe_pred and "logistic" in probe_pred:
        labels = sorted(set(inputs.train_features.labels) | set(fs.labels))
        rows_out["logistic probe, full train split"] = classification_metrics(
            [fs.labels[i] for i in sub_idx], [probe_pred["logistic"][i] for i in sub_idx], labels, inputs.n_boot, inputs.seed,
            cis=wf1)
        pick = sample_per_class(inputs.train_features.labels, LVLM_FEW_SHOT, 0)
        pred, _ = fit_predict("logistic", inputs.train_features.features[pick], [inputs.train_features.labels[i] for i in pick],
                              fs.features[sub_idx], seed=0)
        rows_out[f"logistic probe, {LVLM_FEW_SHOT} train images per class"] = classification_metrics(
            [fs.labels[i] for i in sub_idx], [str(p) for p in pred], labels, inputs.n_boot, inputs.seed, cis=wf1)
    if not rows_out:
        return Part()
    compact = {k: {"weighted_f1": v["weighted_f1"], "macro_f1": v["macro_f1"], "n": v["n"]} for k, v in rows_out.items()}
    counts = Counter(fs.labels[i] for i in sub_idx)
    metrics = {
        "per_class": preset.per_class,
        "seed": preset.seed,
        "n_images": int(len(sub_idx)),
        "images_per_class": dict(sorted(counts.items())),
        "results": compact,
        "reference_weighted_f1": dict(preset.reference_weighted_f1),
        "reference_note": preset.reference_note,
    }
    table_rows = [[k, v["n"], v["weighted_f1"], v["macro_f1"]] for k, v in compact.items()]
    table_rows += [[f"{k} (quoted)", None, float(v), None] for k, v in preset.reference_weighted_f1.items()]
    text = (f"The cytomorphology LVLM benchmark protocol: up to {preset.per_class} evaluated images per class (seed "
            f"{preset.seed}), weighted F1. The GPT-4o rows are QUOTED from the published benchmark, not reproduced by "
            "hemaclip; its image list and class set differ from this subset, so the comparison is indicative only.")
    table = Table(["System", "Images", "Weighted F1", "Macro F1"], table_rows, caption="Weighted F1 on the benchmark-sized subset")
    return Part({"lvlm_benchmark": metrics}, [Section("LVLM benchmark preset", text, [table])])


def lvlm_rows(feature_set: FeatureSet, lvlm_test_subset: Callable[..., FeatureSet], preset: LVLMBenchmarkPreset) -> list[int]:
    """Rows of `feature_set` in the LVLM-benchmark subset (up to `preset.per_class` per label, seeded)."""
    sub = lvlm_test_subset(feature_set, per_class=preset.per_class, seed=preset.seed, split=None)
    pos = {p: i for i, p in enumerate(feature_set.paths)}
    return [pos[p] for p in sub.paths]


