"""Unseen classes read from their description: the generalised zero-shot protocol behind
``hemaclip evaluate --protocol unseen-classes --holdout CLASS``.

A checkpoint trained with ``holdout_classes`` (no image and no sentence of those classes) reads every image of the
evaluated split against all classes at once: the seen ones through their class prompts, the held-out ones through a
description in attribute vocabulary only (the prompt file's ``class_descriptions``, with its literature source).
As the generalised zero-shot literature scores it (Xian et al., "Zero-Shot Learning: A Comprehensive Evaluation of
the Good, the Bad and the Ugly", TPAMI 2019): accuracy on seen classes S and on unseen classes U, each the mean of
per-class accuracy (recall), and their harmonic mean H = 2SU / (S + U); plus per-class F1 beside the trivial
baselines, and Precision@10 of retrieving the held-out class's images from its description. Whether the
checkpoint really never saw the held-out classes is read from its training config and said in the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hemaclip.errors import HemaclipError
from hemaclip.io import display_path, write_json
from hemaclip.log import get_logger, run_log
from hemaclip.metrics.baselines import trivial_baselines
from hemaclip.metrics.retrieval import retrieval_metrics
from hemaclip.metrics.statistics import bootstrap_ci
from hemaclip.metrics.summary import classification_metrics
from hemaclip_research.report import Section, Table, write_report

__all__ = ["PROTOCOL", "gzsl_accuracies", "harmonic_mean", "run_unseen_classes", "stack_logits", "stacking_gamma", "trained_without", "write_summary"]

PROTOCOL = "unseen-classes"
logger = get_logger(__name__)

# Calibrated stacking (Chao et al., ECCV 2016): subtract gamma from every seen class's logit so held-out classes get
# read at all. Gamma is the largest on this grid (logit units) that costs the *seen* val images at most
# SEEN_ACCURACY_BUDGET of their accuracy; held-out-class images take no part in the choice.
STACKING_GRID = tuple(round(0.25 * k, 2) for k in range(41))
SEEN_ACCURACY_BUDGET = 0.01


def stack_logits(logits: np.ndarray, names: Sequence[str], holdout: Sequence[str], gamma: float) -> np.ndarray:
    """A float copy of `logits` [N, C] with `gamma` subtracted from every seen class's column (calibrated stacking)."""
    out = np.asarray(logits, dtype=np.float64).copy()
    out[:, [i for i, c in enumerate(names) if c not in holdout]] -= gamma
    return out


def stacking_gamma(logits: np.ndarray, y_true: Sequence[str], names: Sequence[str], holdout: Sequence[str]) -> dict[str, Any]:
    """The calibrated-stacking gamma from a val reading: the seen-class images only (a held-out class's images are
    dropped before anything is computed), the largest gamma keeping their accuracy within the budget."""
    rows = np.array([y not in holdout for y in y_true])
    if not rows.any():
        raise HemaclipError("no seen-class image in the val split to set the stacking gamma")
    logits = np.asarray(logits)[rows]
    truth = np.array([list(names).index(y) for y, keep in zip(y_true, rows) if keep])

    def seen_accuracy(gamma: float) -> float:
        return float(np.mean(stack_logits(logits, names, holdout, gamma).argmax(axis=1) == truth))

    base = seen_accuracy(0.0)
    chosen = max(g for g in STACKING_GRID if seen_accuracy(g) >= base - SEEN_ACCURACY_BUDGET)
    return {"gamma": chosen, "val_seen_images": int(rows.sum()), "val_seen_accuracy_at_0": base,
            "val_seen_accuracy_at_gamma": seen_accuracy(chosen), "budget": SEEN_ACCURACY_BUDGET,
            "rule": "largest gamma on the grid costing the seen val images at most the budget of their accuracy"}


def stacked(reading: Mapping[str, Any], gamma: float) -> dict[str, Any]:
    """The reading with gamma subtracted from every seen class's logits."""
    return {**reading, "logits": stack_logits(reading["logits"], reading["class_names"], reading["holdout"], gamma)}


def harmonic_mean(seen: float, unseen: float) -> float:
    """H = 2SU / (S + U), 0 when both are 0."""
    return 2 * seen * unseen / (seen + unseen) if seen + unseen > 0 else 0.0


def gzsl_accuracies(y_true: np.ndarray, y_pred: np.ndarray, seen: Sequence[int], unseen: Sequence[int]) -> tuple[float, float, float]:
    """(S, U, H) of integer labels: S and U the mean per-class accuracy over the seen / unseen classes present."""
    def mean_recall(classes: Sequence[int]) -> float:
        recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in classes if np.any(y_true == c)]
        return float(np.mean(recalls)) if recalls else 0.0

    s, u = mean_recall(seen), mean_recall(unseen)
    return s, u, harmonic_mean(s, u)


def trained_without(meta: Mapping[str, Any], holdout: Sequence[str]) -> tuple[bool, str]:
    """Whether the checkpoint's training config held out every class of `holdout`, and a sentence saying so."""
    config = (meta.get("extra") or {}).get("train_config") or {}
    held = set(config.get("holdout_classes") or [])
    if not config:
        return False, "the checkpoint carries no training config: whether it saw the held-out classes is unknown, so this is NOT a zero-shot result"
    missing = [c for c in holdout if c not in held]
    if missing:
        return False, (f"the checkpoint was trained with images and sentences of {', '.join(missing)} (its training config holds out "
                       f"{', '.join(sorted(held)) or 'nothing'}): NOT a zero-shot result, a check of the protocol only")
    return True, f"the checkpoint was trained with holdout_classes = {sorted(held)}: no image and no sentence naming them"


def run_unseen_classes(
    checkpoint: str | Path | None,
    dataset: str,
    split: str,
    holdout: Sequence[str],
    out: str | Path,
    data_root: str | Path | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    progress: bool = False,
    max_per_class: int | None = None,
) -> dict[str, Any]:
    """Score seen and held-out classes together on `dataset`/`split`; write metrics.json, report.md/html into
    `out` and refresh the summary table of `out`'s parent folder. Returns the metrics."""
    from hemaclip.data.datasets import load_dataset
    from hemaclip.models.checkpoint import load_checkpoint
    from hemaclip.models.text_cache import PooledTextCache
    from hemaclip_research.evaluate.inputs import load_model_features, split_records
    from hemaclip.tasks.zero_shot import generalised_zero_shot
    from hemaclip.text.prompts import load_prompts

    holdout = list(dict.fromkeys(str(c) for c in holdout))
    if not holdout:
        raise HemaclipError("--protocol unseen-classes needs at least one --holdout CLASS")
    out = Path(out)
    start = time.perf_counter()
    with run_log(out, "evaluate --protocol unseen-classes"):
        prompts = load_prompts()
        for name in holdout:
            prompts.description(name)  # one-line error before any image is read
        ds = load_dataset(dataset, data_root=data_root, seed=seed)
        unknown = [c for c in holdout if c not in ds.classes]
        if unknown:
            raise HemaclipError(f"--holdout {', '.join(unknown)}: not a class of '{dataset}' ({', '.join(ds.classes)})")
        records = split_records(ds, split, max_per_class, seed)
        train_labels = [r.label for r in ds.split("train")]
        wanted = {split: records}
        if split != "val" and ds.split("val"):
            wanted["val"] = split_records(ds, "val", max_per_class, seed)  # sets the stacking gamma (seen-class images only)
        model, path, sha1, sets = load_model_features(checkpoint, wanted, progress=progress)
        _, meta = load_checkpoint(path)
        honest, provenance = trained_without(meta, holdout)
        logger.info("unseen classes %s on %s/%s (%d images): %s", holdout, dataset, split, len(records), provenance)
        cache = PooledTextCache(model.text)
        reading = generalised_zero_shot(model, sets[split], prompts, dataset, holdout, cache)
        metrics = score_reading(reading, prompts, train_labels, n_boot, seed)
        if "val" in sets and split != "val":
            val = generalised_zero_shot(model, sets["val"], prompts, dataset, holdout, cache)
            choice = stacking_gamma(val["logits"], val["y_true"], val["class_names"], holdout)
            again = score_reading(stacked(reading, choice["gamma"]), prompts, train_labels, n_boot, seed)
            metrics["stacking"] = {**choice, "gzsl": again["gzsl"], "seen_f1_min": again["seen_f1_min"],
                                   "unseen_f1": again["unseen_f1"], "per_class_f1": {c: v["f1"] for c, v in again["classification"]["per_class"].items()}}
        metrics.update({
            "protocol": PROTOCOL, "dataset": dataset, "split": split, "holdout": holdout, "zero_shot": honest,
            "provenance": provenance, "checkpoint": display_path(path), "checkpoint_sha1": sha1, "n_images": len(reading["y_true"]),
            "excluded_images": reading["missing_labels"], "excluded_label_counts": reading["missing_label_counts"],
            "max_per_class": max_per_class, "n_boot": n_boot, "seed": seed,
        })
        metrics["seconds"] = round(time.perf_counter() - start, 1)
        write_report(out, f"hemaclip unseen classes: {', '.join(holdout)} on {dataset} / {split}", sections(metrics), metrics,
                     checkpoint=path)
    write_summary(out.parent)
    return metrics


def score_reading(reading: Mapping[str, Any], prompts: Any, train_labels: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    """S, U, H (with bootstrap intervals), per-class metrics with baselines, description retrieval."""
    names = list(reading["class_names"])
    holdout = list(reading["holdout"])
    logits = np.asarray(reading["logits"])
    y_true = [str(y) for y in reading["y_true"]]
    y_pred = [names[i] for i in logits.argmax(axis=1)]
    codes = {c: i for i, c in enumerate(names)}
    t = np.array([codes[y] for y in y_true])
    p = logits.argmax(axis=1)
    seen_ids = [codes[c] for c in names if c not in holdout]
    unseen_ids = [codes[c] for c in holdout]
    gzsl = {}
    for index, key in enumerate(("acc_seen", "acc_unseen", "h")):
        gzsl[key] = bootstrap_ci(lambda a, b, i=index: gzsl_accuracies(a, b, seen_ids, unseen_ids)[i], t, p, n_boot, seed=seed)
    classes = classification_metrics(y_true, y_pred, names, n_boot, seed)
    classes["baselines"] = trivial_baselines(y_true, names, train_labels, "train split")
    retrieval = {}
    for name in holdout:
        relevant = (t == codes[name])[None, :]
        retrieval[name] = retrieval_metrics(logits[:, codes[name]][None, :], relevant, ks=(10,))
        retrieval[name]["n_relevant"] = int(relevant.sum())
        retrieval[name]["chance_precision@10"] = float(relevant.mean())
    seen_f1 = [classes["per_class"][c]["f1"] for c in names if c not in holdout and c in classes["per_class"]]
    return {
        "classes": names, "seen": [c for c in names if c not in holdout], "gzsl": gzsl, "classification": classes,
        "seen_f1_min": float(min(seen_f1)) if seen_f1 else None,
        "unseen_f1": {c: classes["per_class"].get(c, {}).get("f1") for c in holdout},
        "description_retrieval": retrieval,
        "descriptions": {c: {"source": prompts.description(c).source, "sentences": list(prompts.description(c).sentences)} for c in holdout},
    }


def sections(metrics: Mapping[str, Any]) -> list[Section]:
    """The report: the protocol and provenance, S/U/H, per-class F1 with baselines, retrieval, the descriptions."""
    from hemaclip_research.evaluate.classes import per_class_table

    g = metrics["gzsl"]
    status = "zero-shot" if metrics["zero_shot"] else "NOT ZERO-SHOT"
    text = (f"**{status}**: {metrics['provenance']}.\n\n{metrics['n_images']} images of {metrics['dataset']} / {metrics['split']} scored "
            f"against all {len(metrics['classes'])} classes at once: the seen ones through their class prompts, the held-out ones "
            f"({', '.join(metrics['holdout'])}) through their attribute-vocabulary descriptions. S and U: mean per-class accuracy over "
            "the seen / held-out classes; H = 2SU/(S+U) (Xian et al., TPAMI 2019). 95 % stratified bootstrap intervals. "
            "First row: no calibration of seen against unseen scores. Second row (where a val split exists): calibrated "
            "stacking (Chao et al., ECCV 2016), gamma subtracted from every seen class's logit, gamma the largest on a 0.25 "
            f"grid that costs the seen classes' val images at most {SEEN_ACCURACY_BUDGET:.0%} of their accuracy; no held-out "
            "image is used for any choice.")
    if metrics["excluded_images"]:
        text += f" {metrics['excluded_images']} image(s) of classes without prompts left out: {metrics['excluded_label_counts']}."
    head_rows = [[", ".join(metrics["holdout"]), "none", metrics["n_images"], g["acc_seen"], g["acc_unseen"], g["h"], metrics["seen_f1_min"],
                  ", ".join(f"{c} {v:.3f}" for c, v in metrics["unseen_f1"].items() if v is not None)]]
    if metrics.get("stacking"):
        st = metrics["stacking"]
        head_rows.append([", ".join(metrics["holdout"]), f"stacking, gamma {st['gamma']:g} (val seen accuracy "
                          f"{st['val_seen_accuracy_at_0']:.3f} to {st['val_seen_accuracy_at_gamma']:.3f})", metrics["n_images"],
                          st["gzsl"]["acc_seen"], st["gzsl"]["acc_unseen"], st["gzsl"]["h"], st["seen_f1_min"],
                          ", ".join(f"{c} {v:.3f}" for c, v in st["unseen_f1"].items() if v is not None)])
    head = Table(["Held out", "Seen/unseen calibration", "Images", "S (acc. seen)", "U (acc. unseen)", "H", "Lowest seen F1", "Unseen F1"],
                 head_rows, caption="Generalised zero-shot: seen and held-out classes together")
    per_class = per_class_table(metrics["classification"], baselines=metrics["classification"]["baselines"])
    rows = [[c, r["n_relevant"], r["precision@10"], r["chance_precision@10"]] for c, r in metrics["description_retrieval"].items()]
    retrieval = Table(["Held-out class", "Its images", "Precision@10 from its description", "Chance (its share)"], rows,
                      caption="Retrieval of the held-out class's images by its description (all scored images as gallery)")
    desc = "\n\n".join(f"**{c}** ({d['source']}): " + " / ".join(f'"{s}"' for s in d["sentences"]) for c, d in metrics["descriptions"].items())
    return [Section("Unseen classes from their description", text, [head, per_class, retrieval]),
            Section("The descriptions read", "Written in the attribute vocabulary only, from the cited literature; "
                    "never from held-out images, never tuned on a split.\n\n" + desc)]


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def write_summary(folder: str | Path) -> Path | None:
    """`folder/summary.md` and `summary.json`: one row per unseen-classes report in its subfolders (H per held-out set)."""
    folder = Path(folder)
    rows = []
    for path in sorted(folder.glob("*/metrics.json")):
        try:
            m = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if m.get("protocol") != PROTOCOL:
            continue
        rows.append({"report": path.parent.name, "holdout": m["holdout"], "dataset": m["dataset"], "split": m["split"],
                     "n_images": m["n_images"], "zero_shot": m["zero_shot"], "checkpoint": m["checkpoint"],
                     "acc_seen": m["gzsl"]["acc_seen"]["point"], "acc_unseen": m["gzsl"]["acc_unseen"]["point"],
                     "h": m["gzsl"]["h"]["point"], "seen_f1_min": m["seen_f1_min"], "unseen_f1": m["unseen_f1"],
                     "h_stacked": (m.get("stacking") or {}).get("gzsl", {}).get("h", {}).get("point"),
                     "seen_f1_min_stacked": (m.get("stacking") or {}).get("seen_f1_min"),
                     "precision@10": {c: r["precision@10"] for c, r in m["description_retrieval"].items()}})
    if not rows:
        return None
    lines = ["# Unseen classes: one row per held-out set", "",
             "Generalised zero-shot (seen and held-out classes together); S, U = mean per-class accuracy; H = 2SU/(S+U). "
             "'zero-shot' = the checkpoint's training config held these classes out.", "",
             "| report | held out | dataset / split | images | zero-shot | S | U | H | lowest seen F1 | H, stacking | lowest seen F1, stacking | unseen F1 | P@10 | checkpoint |",
             "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"]
    for r in rows:
        unseen = ", ".join(f"{c} {v:.3f}" for c, v in r["unseen_f1"].items() if v is not None)
        p10 = ", ".join(f"{c} {v:.2f}" for c, v in r["precision@10"].items())
        lines.append(f"| {r['report']} | {', '.join(r['holdout'])} | {r['dataset']} / {r['split']} | {r['n_images']} | "
                     f"{'yes' if r['zero_shot'] else 'NO'} | {r['acc_seen']:.3f} | {r['acc_unseen']:.3f} | {r['h']:.3f} | "
                     f"{r['seen_f1_min']:.3f} | {_number(r['h_stacked'])} | {_number(r['seen_f1_min_stacked'])} | {unseen} | {p10} | "
                     f"{r['checkpoint']} |")
    from hemaclip.io import atomic_write

    write_json(folder / "summary.json", rows)
    with atomic_write(folder / "summary.md") as handle:
        handle.write("\n".join(lines) + "\n")
    return folder / "summary.md"
