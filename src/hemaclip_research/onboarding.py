"""How many of its own labelled cells does hemaclip need to read a new lab? The onboarding learning curve.

Protocol (fixed before the curve was run; `reports/other-labs/onboarding/`):

* **Labs**: every other lab in the data folder (LISC, Zheng 1, Zheng 2). The shipped model trained on PBC alone, so
  each is left out of training.
* **Labelled cells** come from the lab's **val** part only, N = 0, 10, 20, 50, 100 **source cells** (LISC's
  near-duplicate crops are grouped; one crop per source cell is labelled, and no source cell is on both sides),
  chosen by hemaclip's own selection (:func:`hemaclip.tasks.onboarding.select_cells`) or at random; 5 draws per
  size (random: seeds 0-4; the selection is deterministic, so its draws 1-4 start from a pool missing a random
  10 % of the val cells). Sizes above the val part's source cells are left out (Zheng 2 has 31 val cells).
* **Scored** on the lab's **test** part, never read while fitting: accuracy and macro F1 (over the lab's classes
  with >= 5 test cells, on the test cells of those classes; and over every class), each with a 95 % cluster
  bootstrap interval (whole source cells resampled) for draw 0 and the mean and spread over draws; top-label ECE
  (15 bins) beside its floor; seconds to fit.
* **The rest-of-the-lab protocol** (how labs nobody in the project has seen are checked): the pool is every cell
  of the lab, `lab add --budget N` chooses N, and the read-out is scored on the cells of every other source cell.
* **Recipes**: the read-out on the model's embedding alone (``model``), and on the model's embedding with the
  frozen DINOv2 ViT-S/14 features (``model+dinov2``). N = 0 rows: the model as it comes, and with ``--classes``
  (its read-out renormalised over the five white-cell classes).
* **Which recipe is recommended** is decided on val only: each lab's val part split in two halves by source cell
  (20 cells labelled from one half, scored on the other, 5 splits); the recipe with the higher mean macro F1 over
  the labs wins. The test rows are read once after that.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hemaclip.errors import HemaclipError

__all__ = ["RECIPES", "SIZES", "lab_features", "onboarding_curve", "write_onboarding"]

SIZES = (0, 10, 20, 50, 100)
DRAWS = 5
MIN_TEST_CELLS = 5
WHITE_CELLS = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
RECIPES: dict[str, tuple[str, ...]] = {"model": ("model",), "model+dinov2": ("model", "dinov2")}
CHOICE_SIZE = 20


def lab_features(describer: Any, dataset: str, towers: Sequence[str], data_root: str | Path | None, cache: Path | None) -> dict[str, Any]:
    """Every val/test cell of `dataset`: features of `towers` (as `hemaclip lab add` computes them), the model's
    probabilities, labels, splits and source-cell groups. Cached in `cache` (an .npz) when given."""
    from hemaclip.data.datasets import load_dataset
    from hemaclip.tasks.lab import tower_features

    if cache is not None and cache.is_file():
        with np.load(cache) as data:
            return {k: data[k] for k in data.files}
    ds = load_dataset(dataset, data_root=data_root)
    records = [r for r in ds.records if r.split in ("val", "test")]
    first: dict[str, Any] = {}
    for d in describer.describe_paths([r.path for r in records], progress=True):
        if d.error is not None:
            raise HemaclipError(d.error)
        first.setdefault(d.source, d)
    described = [first[str(r.path)] for r in records]
    out = {"features": tower_features(towers, described, describer), "probabilities": np.stack([d.class_probabilities for d in described]),
           "label": np.array([r.label for r in records]), "split": np.array([r.split for r in records]),
           "group": np.array([r.group or str(r.path) for r in records]), "towers": np.array(list(towers)),
           "model_classes": np.array(describer.readout.class_names)}
    if cache is not None:
        from hemaclip.io import atomic_write

        with atomic_write(cache, "wb") as handle:
            np.savez(handle, **out)
    return out


def _columns(data: dict[str, Any], recipe: str) -> np.ndarray:
    """The feature columns of a recipe inside features computed for every tower (model first, 256-d)."""
    towers = [str(t) for t in data["towers"]]
    widths = {"model": data["model_dim"], "dinov2": data["features"].shape[1] - data["model_dim"]}
    start, cols = 0, []
    for tower in towers:
        if tower in RECIPES[recipe]:
            cols.extend(range(start, start + widths[tower]))
        start += widths[tower]
    return np.array(cols)


def _one_per_group(pool: np.ndarray, groups: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    unique = np.array(sorted(set(groups[pool])))
    rng.shuffle(unique)
    return np.array([rng.choice(pool[groups[pool] == g]) for g in unique[:n]], dtype=int)


def _choose(data: dict[str, Any], z: np.ndarray, pool: np.ndarray, n: int, selection: str, draw: int) -> np.ndarray:
    """`n` cells of `pool` for one draw: "random" (one crop of n random source cells), or "tool" (`lab add`'s default
    rule) or any rule of SELECTION_RULES on the whole pool (draw 0) or a 90 % subsample (later draws)."""
    from hemaclip.tasks.onboarding import DEFAULT_SELECTION, select_cells, uncertainty

    groups = data["group"]
    rng = np.random.default_rng(draw)
    if selection == "random":
        return _one_per_group(pool, groups, n, rng)
    sub = pool if draw == 0 else pool[rng.random(len(pool)) > 0.1]
    rule = DEFAULT_SELECTION if selection == "tool" else selection
    return sub[select_cells(z[sub], uncertainty(data["probabilities"][sub]), groups[sub], n, rule=rule, seed=draw)]


def _score(truth: np.ndarray, pred: Sequence[str], probs: np.ndarray, classes: Sequence[str], groups: np.ndarray,
           n_resamples: int) -> dict[str, Any]:
    from hemaclip.metrics.calibration import ece_floor, reliability_bins
    from hemaclip.metrics.statistics import cluster_bootstrap_accuracy, cluster_bootstrap_macro_f1

    pred = np.array(list(pred))
    labels = [c for c in WHITE_CELLS if c in set(truth)]
    present = [c for c in labels if (truth == c).sum() >= MIN_TEST_CELLS]
    keep = np.isin(truth, present)
    f1_present = cluster_bootstrap_macro_f1(truth[keep], pred[keep], present, groups[keep], n_resamples=n_resamples)
    f1_all = cluster_bootstrap_macro_f1(truth, pred, labels, groups, n_resamples=n_resamples)
    acc = cluster_bootstrap_accuracy(truth, pred, labels, groups, n_resamples=n_resamples)
    # a true class the read-out does not hold (not labelled in this draw) is an extra column of probability 0: always wrong
    index = {c: i for i, c in enumerate(classes)}
    truth_index = np.array([index.get(t, len(classes)) for t in truth])
    probs = np.concatenate([probs, np.zeros((len(probs), 1))], axis=1)
    return {"macro_f1": f1_present["point"], "macro_f1_ci": [f1_present["low"], f1_present["high"]],
            "macro_f1_all_classes": f1_all["point"], "accuracy": acc["point"], "accuracy_ci": [acc["low"], acc["high"]],
            "ece": reliability_bins(probs, truth_index)["ece"], "ece_floor": ece_floor(probs),
            "classes_scored": present, "test_cells": int(len(truth)), "test_source_cells": int(len(set(groups)))}


def _fit_and_read(data: dict[str, Any], cols: np.ndarray, pool: np.ndarray, pick: np.ndarray, test: np.ndarray) -> tuple[list[str], np.ndarray, list[str], float]:
    from hemaclip.tasks.onboarding import fit_lab_head

    x = data["features"][:, cols]
    start = time.perf_counter()
    head = fit_lab_head(x[pick], data["probabilities"][pick], [str(y) for y in data["label"][pick]],
                        [str(g) for g in data["group"][pick]], [str(c) for c in data["model_classes"]], x[pool])
    seconds = time.perf_counter() - start
    return head.predict(x[test], data["probabilities"][test]), head.probabilities(x[test], data["probabilities"][test]), head.classes, seconds


def _model_rows(data: dict[str, Any], test: np.ndarray, n_resamples: int) -> list[dict[str, Any]]:
    from hemaclip.tasks.readout import restrict_probabilities

    classes = [str(c) for c in data["model_classes"]]
    probs = data["probabilities"][test]
    truth, groups = data["label"][test], data["group"][test]
    rows = [{"n": 0, "recipe": "model as it comes", **_score(truth, [classes[i] for i in probs.argmax(1)], probs, classes, groups, n_resamples)}]
    mask = np.array([c in WHITE_CELLS for c in classes])
    restricted = restrict_probabilities(probs, mask)
    rows.append({"n": 0, "recipe": "model --classes (white cells)",
                 **_score(truth, [classes[i] for i in restricted.argmax(1)], restricted, classes, groups, n_resamples)})
    return rows


def _curve_rows(data: dict[str, Any], recipe: str, pool: np.ndarray, test_of: Any, sizes: Sequence[int], draws: int,
                n_resamples: int, protocol: str) -> list[dict[str, Any]]:
    from hemaclip.tasks.lab import selection_columns
    from hemaclip.tasks.onboarding import Standardiser

    cols = _columns(data, recipe)
    on = selection_columns([str(t) for t in data["towers"]], data["features"].shape[1], data["model_dim"])  # as `lab add`
    z = Standardiser.fit(data["features"][pool][:, on])(data["features"][:, on])
    pool_groups = len(set(data["group"][pool]))
    rows = []
    for n in [s for s in sizes if 0 < s <= pool_groups]:
        for selection in ("tool", "random"):
            per_draw = []
            for draw in range(draws):
                pick = _choose(data, z, pool, n, "random" if selection == "random" else "tool", draw)
                test = test_of(pick)
                pred, probs, classes, seconds = _fit_and_read(data, cols, pool, pick, test)
                score = _score(data["label"][test], pred, probs, classes, data["group"][test], n_resamples if draw == 0 else 200)
                per_draw.append({**score, "fit_seconds": seconds, "labelled_classes": classes})
            rows.append(_summarise(n, recipe, selection, protocol, per_draw))
    return rows


def _summarise(n: int, recipe: str, selection: str, protocol: str, per_draw: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n, "recipe": recipe, "selection": selection, "protocol": protocol, "draws": len(per_draw),
                           "draw0": per_draw[0]}
    for key in ("macro_f1", "macro_f1_all_classes", "accuracy", "ece", "ece_floor", "fit_seconds"):
        values = np.array([d[key] for d in per_draw], dtype=float)
        out[key] = float(values.mean())
        out[f"{key}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return out


def _val_choice(data: dict[str, Any], recipe: str, splits: int = DRAWS) -> float:
    """Mean macro F1 of a recipe with CHOICE_SIZE cells labelled from one half of the val part, scored on the other."""
    from hemaclip.metrics.classification import macro_f1

    val = np.flatnonzero(data["split"] == "val")
    groups = np.array(sorted(set(data["group"][val])))
    cols = _columns(data, recipe)
    scores = []
    for split in range(splits):
        rng = np.random.default_rng(100 + split)
        half = set(rng.permutation(groups)[: len(groups) // 2])
        a = val[np.isin(data["group"][val], list(half))]
        b = val[~np.isin(data["group"][val], list(half))]
        pick = _one_per_group(a, data["group"], min(CHOICE_SIZE, len(half)), rng)
        if len(set(data["label"][pick])) < 2:
            continue
        pred, _probs, _classes, _s = _fit_and_read(data, cols, val, pick, b)
        scores.append(macro_f1(list(data["label"][b]), list(pred), sorted(set(data["label"][b]))))
    return float(np.mean(scores)) if scores else float("nan")


def onboarding_curve(describer: Any, dataset: str, data_root: str | Path | None = None, sizes: Sequence[int] = SIZES,
                     draws: int = DRAWS, n_resamples: int = 2000, cache: Path | None = None) -> dict[str, Any]:
    """The curve on one other-lab dataset (see the module docstring)."""
    data = dict(lab_features(describer, dataset, ("model", "dinov2"), data_root, cache))
    data["model_dim"] = int(describer.model.config.embed_dim)
    split = data["split"]
    val, test = np.flatnonzero(split == "val"), np.flatnonzero(split == "test")
    everything = np.flatnonzero(np.isin(split, ["val", "test"]))
    rows = _model_rows(data, test, n_resamples)
    for recipe in RECIPES:
        rows += _curve_rows(data, recipe, val, lambda pick: test, sizes, draws, n_resamples, "val->test")
        rows += _curve_rows(data, recipe, everything,
                            lambda pick: everything[~np.isin(data["group"][everything], data["group"][pick])],
                            [s for s in sizes if s in (20, 50)], draws, 200, "rest of the lab")
    choice = {recipe: _val_choice(data, recipe) for recipe in RECIPES}
    return {"dataset": dataset, "val_cells": int(len(val)), "val_source_cells": int(len(set(data["group"][val]))),
            "test_cells": int(len(test)), "test_source_cells": int(len(set(data["group"][test]))), "rows": rows,
            "val_choice_macro_f1": choice}


def headline(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """The rows a summary quotes, by name: ``{lab: {"<protocol>/<recipe>/<selection>/n<N>" or "n0/<recipe>": {...}}}``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in results:
        rows = out.setdefault(r["dataset"], {})
        for row in r["rows"]:
            key = (f"n0/{'classes' if 'classes' in row['recipe'] else 'as-is'}" if row["n"] == 0
                   else f"{'valtest' if row['protocol'] == 'val->test' else 'rest'}/{row['recipe']}/{row['selection']}/n{row['n']}")
            rows[key] = {k: round(float(row[k]), 4) for k in ("macro_f1", "accuracy", "ece") if k in row}
            if "macro_f1_sd" in row:
                rows[key]["macro_f1_sd"] = round(float(row["macro_f1_sd"]), 4)
    return out


def write_onboarding(results: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    """onboarding.json, onboarding.md and learning_curve.png under `out`."""
    import json

    from hemaclip.io import atomic_write

    choice = {recipe: float(np.nanmean([r["val_choice_macro_f1"][recipe] for r in results])) for recipe in RECIPES}
    recommended = max(choice, key=lambda k: choice[k])
    payload = {"meta": meta, "protocol": __doc__, "val_choice_mean_macro_f1": choice, "recommended_recipe": recommended,
               "headline": headline(results), "labs": {r["dataset"]: r for r in results}}
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "onboarding.json") as handle:
        json.dump(payload, handle, indent=1, default=float)
    lines = ["# Onboarding a new lab: the learning curve", "",
             f"Recommended recipe (chosen on val only, mean macro F1 with {CHOICE_SIZE} labelled cells): **{recommended}** "
             f"({', '.join(f'{k} {v:.3f}' for k, v in choice.items())}).", "",
             "Test part, val -> test, mean of the draws (sd); macro F1 over classes with >= 5 test cells; 95 % cluster interval of draw 0.", ""]
    for r in results:
        lines += [f"## {r['dataset']} ({r['val_source_cells']} val / {r['test_source_cells']} test source cells)", "",
                  "| N | recipe | selection | protocol | macro F1 | draw-0 95 % CI | all-class F1 | accuracy | ECE (floor) | fit s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            d0 = row.get("draw0", row)
            lines.append(f"| {row['n']} | {row['recipe']} | {row.get('selection', '-')} | {row.get('protocol', 'val->test')} | "
                         f"{row['macro_f1']:.3f} ({row.get('macro_f1_sd', 0):.3f}) | {d0['macro_f1_ci'][0]:.3f}-{d0['macro_f1_ci'][1]:.3f} | "
                         f"{row['macro_f1_all_classes']:.3f} | {row['accuracy']:.3f} | {row['ece']:.3f} ({row['ece_floor']:.3f}) | "
                         f"{row.get('fit_seconds', 0):.1f} |")
        lines.append("")
    with atomic_write(out / "onboarding.md") as handle:
        handle.write("\n".join(lines) + "\n")
    _plot(results, out / "learning_curve.png")


def _plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        base = next(row for row in r["rows"] if row["recipe"].startswith("model --classes"))
        for recipe in RECIPES:
            for selection, style in (("tool", "-"), ("random", ":")):
                rows = [row for row in r["rows"] if row["recipe"] == recipe and row.get("selection") == selection and row["protocol"] == "val->test"]
                xs = [0] + [row["n"] for row in rows]
                ys = [base["macro_f1"]] + [row["macro_f1"] for row in rows]
                ax.plot(xs, ys, style, marker="o", label=f"{recipe}, {selection}")
        ax.axhline(0.9, color="grey", lw=0.8)
        ax.set_title(r["dataset"])
        ax.set_xlabel("labelled source cells")
        ax.set_ylim(0.3, 1.0)
    axes[0][0].set_ylabel("test macro F1")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    from hemaclip.io import atomic_write

    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
