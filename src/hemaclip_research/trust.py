"""Know what it does not know: the report behind ``hemaclip trust`` (``reports/trust/``).

Everything is read as ``hemaclip describe`` reads it (:func:`hemaclip_research.other_labs.read_lab`): the
model's preprocessing, its calibrated class read-out and its unfamiliarity score (threshold fitted on PBC
val by ``hemaclip calibrate``, never on anything scored here). Parts:

* **In-lab false flags**: share flagged on PBC test and WBCAtt test, and the folder verdict on in-lab splits
  (it must stay silent there).
* **Other labs**: per lab (test part), share flagged, accuracy on all cells and on unflagged cells, ECE before
  and after AdaBN, and the folder verdict (it must fire).
* **Atypical cells (external)**: ALL lymphoblasts (early pre-B, pre-B, pro-B) against PBC test cells (AUROC),
  split into lab shift (ALL benign haematogones against PBC test lymphocytes: the same cell type, another lab)
  and cell type (blasts against haematogones: the same lab).
* **Leave-classes-out**: a checkpoint trained without a class; its test images against the seen classes'
  test images (AUROC, flag rate at the in-lab threshold), and every built-in score on val (where the method
  in use was chosen) and test.
* **Flags never change the class**: every PBC test reading with and without the familiarity score.
* **Worked examples**: cells with their reading, score and verdict.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.errors import HemaclipError
from hemaclip.metrics.detection import separation_auroc
from hemaclip.tasks.familiarity import METHODS, SHIFTED_FOLDER_QUANTILE

if TYPE_CHECKING:
    from hemaclip.data.datasets import CellRecord
    from hemaclip.tasks.describe import Describer
    from hemaclip_research.other_labs import LabReading

ALL_BLASTS = ("early", "pre", "pro")
ALL_BENIGN = "benign"
N_RESAMPLES = 2000


def _describer(checkpoint: str | None, data_root: str | Path | None, adapt: str | None = None) -> Describer:
    from hemaclip.tasks.describe import Describer

    describer = Describer.from_checkpoint(checkpoint, index=None, data_root=data_root, adapt=adapt)
    if describer.familiarity is None:
        raise HemaclipError(f"{checkpoint or 'the shipped model'} has no familiarity sidecar: run hemaclip calibrate --checkpoint CKPT first")
    return describer


def _auroc_block(negative: np.ndarray, positive: np.ndarray, threshold: float, n_resamples: int, seed: int) -> dict[str, Any]:
    from hemaclip.metrics.detection import flag_rate, roc_points

    auc = separation_auroc(negative, positive, n_resamples, seed)
    fpr, tpr = roc_points(negative, positive)
    return {"auroc": auc, "flagged_positive": flag_rate(positive, threshold), "flagged_negative": flag_rate(negative, threshold),
            "_roc": (fpr, tpr, auc["point"])}


def run_trust_report(
    checkpoint: str | None,
    out: str | Path,
    holdouts: Mapping[str, str] | None = None,
    labs: Sequence[str] = ("lisc", "zheng1", "zheng2"),
    data_root: str | Path | None = None,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``reports/trust``-style metrics.json, report.md/html and figures for `checkpoint`; `holdouts` maps a
    held-out class name to a checkpoint trained without it (each needs its own familiarity sidecar)."""
    from hemaclip.data.datasets import load_dataset
    from hemaclip_research import plots
    from hemaclip_research.other_labs import MODEL_ADAPTATIONS, read_lab, score_reading
    from hemaclip_research.report import Section, Table, write_report

    start = time.perf_counter()
    out = Path(out)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        if progress:
            print(text, flush=True)

    describer = _describer(checkpoint, data_root)
    fam = describer.familiarity
    threshold = float(fam.threshold)
    metrics: dict[str, Any] = {"checkpoint": checkpoint or "shipped default", "method": fam.method, "k": fam.k if fam.method == "knn" else None,
                               "threshold": threshold, "fitted_on": fam.fitted_on,
                               "n_resamples": n_resamples, "seed": seed}
    sections: list[Any] = []

    # -- in-lab ------------------------------------------------------------------------------------
    say("in-lab splits ...")
    pbc = load_dataset("pbc", data_root=data_root)
    wbcatt = load_dataset("wbcatt", data_root=data_root)
    in_lab: dict[str, Any] = {}
    readings: dict[str, Any] = {}
    for name, records in (("pbc val", pbc.split("val")), ("pbc test", pbc.split("test")), ("wbcatt test", wbcatt.split("test"))):
        reading = read_lab(describer, records, "none")
        readings[name] = (records, reading)
        in_lab[name] = {"n": len(records), "flagged_share": float(reading.unfamiliar.mean()), "folder_shift": reading.shift}
    metrics["in_lab"] = in_lab
    # Flags never change the class: the same cells read without the familiarity score.
    pbc_test_records, pbc_test = readings["pbc test"]
    plain = copy.copy(describer)
    plain.familiarity = None
    without = read_lab(plain, pbc_test_records, "none")
    metrics["flags_change_no_class"] = {"n": len(pbc_test_records), "identical": bool(without.predicted == pbc_test.predicted)}
    rows = [[k, v["n"], v["flagged_share"], "fires" if (v["folder_shift"] or {}).get("shifted") else "silent"] for k, v in in_lab.items()]
    sections.append(Section(
        "In-lab cells: false flags",
        f"Score: {fam.label}. Threshold {threshold:.4g} = {fam.fitted_on}. The PBC val share is the target of the fit (about 4 %); test shares are "
        f"measured. Class readings with and without the flag on PBC test: "
        f"{'identical' if metrics['flags_change_no_class']['identical'] else 'DIFFERENT'} on {len(pbc_test_records)} cells.",
        [Table(["split", "cells", "flagged", "folder warning"], rows)]))

    # -- other labs ----------------------------------------------------------------------------------
    adapted = {method: _describer(checkpoint, data_root, adapt=method) for method in MODEL_ADAPTATIONS}
    lab_rows, lab_metrics, examples = [], {}, []
    for lab in labs:
        say(f"{lab} ...")
        records = load_dataset(lab, data_root=data_root).split("test")
        reading = read_lab(describer, records, "none")
        scored = score_reading(reading, n_resamples, seed)
        after = {method: score_reading(read_lab(d, records, method), n_resamples, seed) for method, d in adapted.items()}
        lab_metrics[lab] = {"none": {k: v for k, v in scored.items() if k != "reliability"},
                            **{method: {k: v for k, v in a.items() if k != "reliability"} for method, a in after.items()}}
        bar = scored.get("folder_bar") or {}
        lab_rows.append([lab, scored["n"], scored["flagged_share"], scored["accuracy"]["point"], scored["accuracy_unflagged"],
                         scored["n_unflagged"], bar.get("flagged_share"), bar.get("accuracy_unflagged"), bar.get("n_unflagged"),
                         scored["ece"],
                         *[value for method in MODEL_ADAPTATIONS for value in (after[method]["ece"], after[method]["accuracy"]["point"])],
                         "fires" if (scored.get("folder_shift") or {}).get("shifted") else "silent"])
        plots.plot_reliability(scored["reliability"], figures / f"reliability_{lab}.png", title=f"{lab} test: reliability (no adaptation)")
        examples += _examples(lab, records, reading, 3)
    metrics["other_labs"] = lab_metrics
    names = {"bn": "AdaBN", "entropy": "Tent"}
    sections.append(Section(
        "Other labs: selective reading and calibration",
        "Test part of each lab; five white-cell classes, any other reading wrong. `acc unflagged` is the accuracy on the cells "
        "the score does not flag at the in-lab threshold; the `folder bar` columns use the bar that applies once the folder "
        "warning fires (a cell passes only if its score lies within the range of the "
        f"{SHIFTED_FOLDER_QUANTILE:.0%} most typical in-lab val cells; chosen on the labs' val parts by bench/shifted_folder_bar.py); ECE is top-label (15 bins) of the calibrated probabilities, before and after test-time "
        "adaptation on the lab's cells (AdaBN: BatchNorm statistics re-estimated; Tent: BatchNorm scales and shifts trained to "
        "minimise the class read-out's entropy). The folder warning is the verdict `describe` prints for the whole folder.",
        [Table(["lab", "cells", "flagged", "accuracy", "acc unflagged", "unflagged cells", "flagged (folder bar)",
                "acc unflagged (folder bar)", "unflagged cells (folder bar)", "ECE",
                *[f"{h} after {names.get(m, m)}" for m in MODEL_ADAPTATIONS for h in ("ECE", "accuracy")], "folder warning"], lab_rows)],
        [(figures / f"reliability_{lab}.png", f"{lab}: reliability diagram") for lab in labs]))

    # -- atypical cells: ALL -------------------------------------------------------------------------
    say("ALL lymphoblasts ...")
    all_records = load_dataset("all", data_root=data_root).split("all")
    all_reading = read_lab(describer, all_records, "none")
    all_scores = np.asarray(all_reading.scores)
    is_blast = np.array([r.label in ALL_BLASTS for r in all_records])
    is_benign = np.array([r.label == ALL_BENIGN for r in all_records])
    pbc_scores = np.asarray(pbc_test.scores)
    pbc_lymph = pbc_scores[np.array([r.label == "lymphocyte" for r in pbc_test_records])]
    atypical = {
        "ALL blasts vs PBC test cells": _auroc_block(pbc_scores, all_scores[is_blast], threshold, n_resamples, seed),
        "lab shift: ALL haematogones vs PBC test lymphocytes": _auroc_block(pbc_lymph, all_scores[is_benign], threshold, n_resamples, seed),
        "cell type: ALL blasts vs ALL haematogones": _auroc_block(all_scores[is_benign], all_scores[is_blast], threshold, n_resamples, seed),
    }
    examples += _examples("ALL", all_records, all_reading, 3)

    # -- leave-classes-out ---------------------------------------------------------------------------
    # Each held-out class on PBC val (where the score's method and k were chosen) and test (confirmation),
    # scored by every built-in method from the same embeddings.
    candidates: dict[str, Any] = {}
    candidate_rows = []
    for held, held_checkpoint in (holdouts or {}).items():
        say(f"held-out {held} ...")
        held_describer = _describer(held_checkpoint, data_root)
        known = set(held_describer.readout.class_names)
        if held in known:
            raise HemaclipError(f"{held_checkpoint} knows '{held}': it was not trained with that class held out")
        held_fam = held_describer.familiarity
        for split in ("val", "test"):
            recs = pbc.split(split)
            mask = np.array([r.label == held for r in recs])
            if not mask.any():
                raise HemaclipError(f"no PBC {split} image of the held-out class '{held}'")
            reading = read_lab(held_describer, recs, "none")
            if split == "test":
                scores = np.asarray(reading.scores)
                block = _auroc_block(scores[~mask], scores[mask], float(held_fam.threshold), n_resamples, seed)
                block["checkpoint"] = held_checkpoint
                atypical[f"held-out {held} vs seen PBC test classes"] = block
            for method in METHODS:
                if method == "knn" and held_fam.train_features is None:
                    continue
                other = held_fam.score(reading.features, method=method)
                auroc = float(separation_auroc(other[~mask], other[mask], n_resamples=0)["point"])
                candidates.setdefault(held, {}).setdefault(method, {})[split] = auroc
                candidate_rows.append([held, split, method + (" (in use)" if method == held_fam.method else ""),
                                       int(mask.sum()), int((~mask).sum()), auroc])
    metrics["score_candidates"] = candidates
    metrics["atypical"] = {k: {kk: vv for kk, vv in v.items() if kk != "_roc"} for k, v in atypical.items()}
    plots.plot_roc_curves({k: v["_roc"] for k, v in atypical.items()}, figures / "roc.png", title="Unfamiliarity score: ROC")
    plots.plot_score_histograms({"PBC val": readings["pbc val"][1].scores, "PBC test": pbc_scores, "ALL blasts": all_scores[is_blast],
                                 "ALL haematogones": all_scores[is_benign]}, threshold, figures / "scores.png")
    rows = [[k, v["auroc"]["n_positive"], v["auroc"]["n_negative"], (v["auroc"]["point"], v["auroc"]["low"], v["auroc"]["high"]),
             v["flagged_positive"], v["flagged_negative"]] for k, v in atypical.items()]
    sections.append(Section(
        "Atypical and unseen cells",
        "AUROC of the unfamiliarity score separating the cells that should be flagged (positives) from the others, with a 95 % "
        "bootstrap interval; flag rates at the in-lab threshold. The ALL rows split the blast signal into lab shift (same cell "
        "type, another lab) and cell type (same lab). Leave-classes-out rows use a checkpoint trained without that class (its "
        "own threshold, fitted on PBC val without the class). The second table scores the same embeddings with every built-in "
        "unfamiliarity score: the method in use was chosen on the val rows; the test rows only confirm.",
        [Table(["positives vs negatives", "positives", "negatives", "AUROC [95 %]", "flagged positives", "flagged negatives"], rows)]
        + ([Table(["held-out class", "PBC split", "score", "held-out cells", "seen cells", "AUROC"], candidate_rows)] if candidate_rows else []),
        [(figures / "roc.png", "ROC curves"), (figures / "scores.png", "Score distributions and the flag threshold")]))

    # -- examples ------------------------------------------------------------------------------------
    if examples:
        plots.plot_retrieval_grid([e[0] for e in examples], [e[1] for e in examples], figures / "examples.png", k=3,
                                  title="Worked examples (green frame: reading right, red: wrong; caption: reading, score, verdict)")
        sections.append(Section("Worked examples", "", figures=[(figures / "examples.png", "Cells with reading, score and verdict")]))
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    write_report(out, "Trust: unfamiliar and atypical cells", sections, metrics, checkpoint=checkpoint or "shipped default")
    return metrics


def _examples(name: str, records: Sequence[CellRecord], reading: LabReading, k: int) -> list[tuple[str, list[tuple[Any, bool, str]]]]:
    """Up to `k` flagged and `k` unflagged cells of one set (evenly spread over the set, deterministic)."""
    rows = []
    for flagged in (True, False):
        idx = [i for i, u in enumerate(reading.unfamiliar) if bool(u) == flagged]
        picked = idx[:: max(1, len(idx) // k)][:k] if idx else []
        hits = [(records[i].path, reading.predicted[i] == reading.truth[i],
                 f"{reading.predicted[i]} p={reading.probability[i]:.2f}, score {reading.scores[i]:.3g}"
                 + (", UNFAMILIAR" if flagged else "")) for i in picked]
        if hits:
            rows.append((f"{name}: {'flagged' if flagged else 'not flagged'} (truth: "
                         + ", ".join(records[i].label for i in picked) + ")", hits))
    return rows
