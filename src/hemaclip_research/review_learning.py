"""Do a lab's corrections teach the model? The learning curve of the review adapter on another lab's cells.

Protocol (fixed before any number was seen):

* **Reviewed cells** are drawn at random (as a reviewer meets them on slides, not class-balanced) from the
  other lab's **val** part only: 0, 20, 50 and 100 cells, 5 draws per size (seeds 0-4); their dataset labels
  stand in for the reviewer's corrections. A cell is a **source cell**: where a lab holds several near-duplicate
  crops of one cell (LISC: 4-6), N reviewed cells are N source-cell groups with all their crops (issue 27; before,
  N counted crops), and the adapter's cross-validation folds by those groups. Sizes larger than the val part's
  number of source cells are left out.
* **Scored** on that lab's **test** part, which shares no source cell with val (LISC: near-duplicate crops of
  one cell are grouped and whole groups split). Macro F1 over the lab's classes, a prediction outside them
  (the model also knows erythroblasts, immature granulocytes, platelets) counted as an error.
* **Intervals**: the 95 % cluster bootstrap of the test cells (whole groups resampled) for draw 0, and the
  spread (mean ± sd, min-max) over the 5 draws, which is the reviewer-sample variation.
* **Calibration** (before and after; added in a later round, on the same draws): top-label ECE (15 bins) of the adapter's probabilities on the test part,
  for draw 0 and over the draws, beside its floor (:func:`hemaclip.metrics.calibration.ece_floor`: what a
  perfectly calibrated model would show on the same cells, since binned ECE is biased upwards on a few dozen
  cells), and reliability diagrams of the model and of the adapter after the most reviewed cells.
* **A lab with fewer val cells than the largest size** also gets a row with every val cell reviewed (added
  after the first curve, for Zheng 2's 31 val cells; its draws differ only in the cross-validation folds).
* **Cross-fitted, every cell of the lab** (added with the calibration part, because Zheng 2's val part holds only
  31 cells): the lab's val and test cells together, split by source cell (near-duplicate groups stay whole) into
  5 folds; the adapter learns from 4 folds (about 80 % of the lab's cells) and reads the 5th; the out-of-fold
  probabilities of all cells are scored together (ECE beside its floor, accuracy, macro F1), 3 seeded repeats.
  Every cell is read by an adapter that never saw it; nothing is chosen on these numbers.
* **Arms**: the adapter (:mod:`hemaclip.tasks.adapter`: the model's calibrated scores plus an L2-penalised
  linear correction on the frozen embedding, penalty by cross-validation on the reviewed cells), and, for
  comparison, a logistic regression on the embeddings alone (scikit-learn, C = 1), which forgets the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.errors import HemaclipError

if TYPE_CHECKING:
    from hemaclip.data.datasets import CellRecord
    from hemaclip.tasks.describe import Describer

__all__ = ["SIZES", "describe_records", "learning_curve", "write_learning_curve"]

SIZES = (0, 20, 50, 100)
DRAWS = 5
CROSS_FIT_FOLDS = 5
CROSS_FIT_REPEATS = 3


def describe_records(describer: Describer, records: Sequence[CellRecord], batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N, D], calibrated class probabilities [N, C]) of each record's first cell, as `review` reads it."""
    first: dict[str, Any] = {}
    for d in describer.describe_paths([r.path for r in records], batch_size=batch_size, progress=False):
        if d.error is not None:
            raise HemaclipError(d.error)
        first.setdefault(d.source, d)
    described = [first[str(r.path)] for r in records]
    return np.stack([d.embedding for d in described]), np.stack([d.class_probabilities for d in described])


def _embedding_only(features: np.ndarray, labels: Sequence[str], test: np.ndarray) -> list[str]:
    from sklearn.linear_model import LogisticRegression

    if len(set(labels)) < 2:
        return [labels[0]] * len(test)
    model = LogisticRegression(C=1.0, max_iter=2000).fit(features, labels)
    return [str(p) for p in model.predict(test)]


def _cross_fitted(features: np.ndarray, probs: np.ndarray, truth: Sequence[str], groups: Sequence[str], classes: list[str],
                  labels: list[str], folds: int = CROSS_FIT_FOLDS, repeats: int = CROSS_FIT_REPEATS) -> dict[str, Any]:
    """Out-of-fold adapter probabilities for every cell (folds by source-cell group), scored together per repeat."""
    from hemaclip.metrics.calibration import ece_floor, reliability_bins
    from hemaclip.metrics.classification import macro_f1
    from hemaclip.tasks.adapter import fit_adapter

    truth_index = np.array([classes.index(y) for y in truth])
    unique = sorted(set(groups))
    members = {g: [i for i, h in enumerate(groups) if h == g] for g in unique}
    runs = []
    for repeat in range(repeats):
        order = np.random.default_rng(repeat).permutation(len(unique))
        out = np.zeros_like(probs)
        reviewed = []
        for fold in np.array_split(order, folds):
            held = np.array([i for g in fold for i in members[unique[g]]], dtype=int)
            learn = np.setdiff1d(np.arange(len(truth)), held)
            adapter = fit_adapter(features[learn], probs[learn], [truth[i] for i in learn], classes, seed=repeat,
                                  groups=[groups[i] for i in learn])
            out[held] = adapter.probabilities(features[held], probs[held])
            reviewed.append(len(unique) - len(fold))
        predicted = [classes[i] for i in out.argmax(axis=1)]
        runs.append({"ece": reliability_bins(out, truth_index)["ece"], "ece_floor": ece_floor(out),
                     "accuracy": float(np.mean(out.argmax(axis=1) == truth_index)), "macro_f1": macro_f1(list(truth), predicted, labels),
                     "reviewed_per_fold": reviewed})
    summary = {key: {"mean": float(np.mean([r[key] for r in runs])), "sd": float(np.std([r[key] for r in runs], ddof=1)) if repeats > 1 else 0.0}
               for key in ("ece", "ece_floor", "accuracy", "macro_f1")}
    return {"cells": len(unique), "crops": len(truth), "folds": folds, "repeats": repeats, "reviewed_mean": float(np.mean([n for r in runs for n in r["reviewed_per_fold"]])),
            "model_ece": reliability_bins(probs, truth_index)["ece"], "model_ece_floor": ece_floor(probs), **summary, "runs": runs}


def learning_curve(
    describer: Describer, dataset: str, data_root: str | Path | None = None, sizes: Sequence[int] = SIZES, draws: int = DRAWS,
    n_resamples: int = 2000,
) -> dict[str, Any]:
    """The curve on one other-lab dataset (see the module docstring for the protocol)."""
    from hemaclip.data.datasets import load_dataset
    from hemaclip.metrics.calibration import ece_floor, reliability_bins
    from hemaclip.metrics.classification import macro_f1
    from hemaclip.metrics.statistics import cluster_bootstrap_macro_f1, paired_cluster_bootstrap_macro_f1
    from hemaclip.tasks.adapter import fit_adapter

    ds = load_dataset(dataset, data_root=data_root)
    val, test = ds.split("val"), ds.split("test")
    if not val or not test:
        raise HemaclipError(f"{dataset}: needs a val and a test part")
    classes = list(describer.readout.class_names)
    labels = list(ds.classes)
    fv, pv = describe_records(describer, val)
    ft, pt = describe_records(describer, test)
    y_val = [r.label for r in val]
    y_test = [r.label for r in test]
    groups = [r.group or str(r.path) for r in test]
    val_groups = [r.group or str(r.path) for r in val]
    val_units = list(dict.fromkeys(val_groups))  # source cells of val, in order of appearance
    val_members = {g: [i for i, h in enumerate(val_groups) if h == g] for g in val_units}
    model_pred = [classes[i] for i in np.argmax(pt, axis=1)]
    truth_index = np.array([classes.index(y) for y in y_test])
    kept = [n for n in sizes if n <= len(val_units)]
    if len(val_units) < max(sizes, default=0) and len(val_units) not in kept:  # a small val part: review every source cell
        kept.append(len(val_units))
    rows = []
    for n in kept:
        per_draw: dict[str, list[float]] = {"adapter": [], "embedding_only": []}
        eces: list[float] = []
        first: dict[str, Any] = {}
        for draw in range(draws if n > 0 else 1):
            units = np.random.default_rng(draw).choice(len(val_units), size=n, replace=False) if n else []
            pick = np.array(sorted(i for u in units for i in val_members[val_units[u]]), dtype=int)
            chosen = [y_val[i] for i in pick]
            adapter = fit_adapter(fv[pick], pv[pick], chosen, classes, seed=draw, groups=[val_groups[i] for i in pick])
            probs = adapter.probabilities(ft, pt) if n else pt
            bins = reliability_bins(probs, truth_index)
            eces.append(bins["ece"])
            preds = {"adapter": adapter.predict(ft, pt) if n else model_pred}
            if n:
                preds["embedding_only"] = _embedding_only(fv[pick], chosen, ft)
            for arm, pred in preds.items():
                per_draw[arm].append(macro_f1(y_test, pred, labels))
            if draw == 0:
                first = {"preds": preds, "l2": adapter.l2, "classes_seen": sorted(set(chosen)), "crops": len(pick),
                         "paths": [str(val[i].path) for i in pick],
                         "reliability": bins, "ece_floor": ece_floor(probs)}
        row: dict[str, Any] = {"reviewed": int(n), "reviewed_crops_draw0": first["crops"], "every_val_cell": n == len(val_units),
                               "classes_seen_draw0": first["classes_seen"], "reviewed_paths_draw0": first["paths"],
                               "l2_draw0": first["l2"],
                               "calibration": {"ece_draw0": eces[0], "ece_floor_draw0": first["ece_floor"],
                                               "ece_mean": float(np.mean(eces)),
                                               "ece_sd": float(np.std(eces, ddof=1)) if len(eces) > 1 else 0.0,
                                               "reliability_draw0": first["reliability"]}}
        for arm, scores in per_draw.items():
            if not scores:
                continue
            ci = cluster_bootstrap_macro_f1(y_test, first["preds"][arm], labels, groups, n_resamples=n_resamples, seed=0)
            row[arm] = {"draw0": ci["point"], "draw0_low": ci["low"], "draw0_high": ci["high"], "mean": float(np.mean(scores)),
                        "sd": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0, "min": float(np.min(scores)),
                        "max": float(np.max(scores)), "draws": [float(s) for s in scores]}
            if n:
                diff = paired_cluster_bootstrap_macro_f1(y_test, first["preds"][arm], model_pred, labels, groups,
                                                         n_resamples=n_resamples, seed=0)
                row[arm]["minus_model_draw0"] = {k: diff[k] for k in ("difference", "low", "high", "p_value") if k in diff}
        rows.append(row)
    return {
        "dataset": dataset, "labs": sorted({str(r.lab) for r in test}), "val_cells": len(val_units), "val_crops": len(val),
        "test_cells": len(set(groups)), "test_crops": len(test), "scored_paths": [str(r.path) for r in test],
        "test_groups": len(set(groups)), "labels": labels, "model_classes": classes, "draws": draws,
        "protocol": "reviewed source cells (all their crops) drawn at random from val (labels stand in for the reviewer); scored on test "
                    "(no source cell shared); macro F1 over the lab's classes; 95 % cluster bootstrap over test groups "
                    "for draw 0, spread over draws; top-label ECE (15 bins) of the probabilities beside the floor a "
                    "perfectly calibrated model would show on the same test cells",
        "rows": rows,
        "cross_fitted": _cross_fitted(np.vstack([fv, ft]), np.vstack([pv, pt]), y_val + y_test,
                                      [r.group or str(r.path) for r in [*val, *test]], classes, labels),
    }


def write_learning_curve(results: Sequence[dict[str, Any]], out: str | Path, meta: dict[str, Any]) -> None:
    """learning_curve.json, learning_curve.md, learning_curve.png and reliability diagrams (the model, and the
    adapter after the most reviewed cells, per lab) in `out` (atomically)."""
    from hemaclip.io import atomic_write, write_json
    from hemaclip_research.plots import _new_figure, _save, plot_reliability

    out = Path(out)
    write_json(out / "learning_curve.json", {"meta": meta, "datasets": list(results)})
    lines = ["# Corrections that teach: other-lab macro F1 and calibration after n reviewed cells", "",
             f"Checkpoint SHA-1 {meta.get('checkpoint_sha1', '')[:12]}; {results[0]['protocol'] if results else ''}.", ""]
    for res in results:
        lines += [f"## {res['dataset']} ({', '.join(res['labs'])}): {res['val_cells']} val source cells ({res['val_crops']} crops) "
                  f"to draw from, {res['test_cells']} test source cells ({res['test_crops']} crops)", "",
                  "| reviewed cells | adapter, draw 0 [95 % CI] | adapter, 5 draws mean ± sd | adapter − model, draw 0 [95 % CI] | "
                  "embeddings-only LR, mean ± sd | ECE, draw 0 (floor) | ECE, mean ± sd |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in res["rows"]:
            a = row["adapter"]
            d = a.get("minus_model_draw0")
            e = row.get("embedding_only")
            p_text = "p < 0.001" if d and d["p_value"] < 0.001 else f"p = {d['p_value']:.3f}" if d else ""
            diff = "(the model)" if not d else f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] ({p_text})"
            other = f"{e['mean']:.3f} ± {e['sd']:.3f}" if e else ""
            cal = row["calibration"]
            reviewed = f"{row['reviewed']} (every val cell)" if row["every_val_cell"] and row["reviewed"] else str(row["reviewed"])
            lines.append(f"| {reviewed} | {a['draw0']:.3f} [{a['draw0_low']:.3f}, {a['draw0_high']:.3f}] | "
                         f"{a['mean']:.3f} ± {a['sd']:.3f} | {diff} | {other} | {cal['ece_draw0']:.3f} ({cal['ece_floor_draw0']:.3f}) | "
                         f"{cal['ece_mean']:.3f} ± {cal['ece_sd']:.3f} |")
        lines += ["", "ECE floor: the ECE a perfectly calibrated model would show on the same test cells (labels drawn from "
                  "its own probabilities); a row can only be said to miss an ECE target that lies well above its floor.", ""]
        cf = res.get("cross_fitted")
        if cf:
            lines += [f"Cross-fitted over all {cf['cells']} cells of the lab ({cf['folds']} folds by source cell, about "
                      f"{cf['reviewed_mean']:.0f} reviewed cells per fold, {cf['repeats']} repeats, mean ± sd): ECE "
                      f"{cf['ece']['mean']:.3f} ± {cf['ece']['sd']:.3f} (floor {cf['ece_floor']['mean']:.3f}; the model on the same "
                      f"cells {cf['model_ece']:.3f}, floor {cf['model_ece_floor']:.3f}), accuracy {cf['accuracy']['mean']:.3f} ± "
                      f"{cf['accuracy']['sd']:.3f}, macro F1 {cf['macro_f1']['mean']:.3f} ± {cf['macro_f1']['sd']:.3f}.", ""]
        first, last = res["rows"][0], res["rows"][-1]
        plot_reliability(first["calibration"]["reliability_draw0"], out / f"reliability_{res['dataset']}_model.png",
                         title=f"{res['dataset']} test: the model")
        plot_reliability(last["calibration"]["reliability_draw0"], out / f"reliability_{res['dataset']}_reviewed_{last['reviewed']}.png",
                         title=f"{res['dataset']} test: adapter after {last['reviewed']} reviewed cells")
    with atomic_write(out / "learning_curve.md") as handle:
        handle.write("\n".join(lines) + "\n")
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ticks: set[int] = set()
    for res in results:
        ticks.update(r["reviewed"] for r in res["rows"])
        for arm, style in (("adapter", "-o"), ("embedding_only", "--s")):
            pts = [(r["reviewed"], r[arm]) for r in res["rows"] if arm in r]
            if not pts:
                continue
            x = [p[0] for p in pts]
            mean = np.array([p[1]["mean"] for p in pts])
            sd = np.array([p[1]["sd"] for p in pts])
            ax.errorbar(x, mean, yerr=sd, fmt=style, capsize=3, label=f"{res['dataset']}: {arm.replace('_', ' ')}")
    ax.set_xticks(sorted(ticks))
    ax.set_xlabel("reviewed cells (drawn from the lab's val part)")
    ax.set_ylabel("test macro F1 (mean ± sd, 5 draws)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, out / "learning_curve.png")
