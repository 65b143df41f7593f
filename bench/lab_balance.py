"""Does drawing a lab's few labelled cells class-balanced during `lab fit`'s fine-tune help its rare classes? (issue 26,
development pools only)

Zheng 1's macro F1 after 50 cells is held down by its small classes (eosinophils are 7 % of its cells). Here, on each
other lab's **val part only** (no test cell is read): `lab add`'s default selection picks N source cells, the model is
fine-tuned with `lab fit`'s default settings, drawing the lab's cells uniformly (``uniform``, the default) or with
each labelled class equally likely (``balanced``, :class:`hemaclip.train.finetune.FineTuneSettings`
``balance_lab_classes``), then the same read-out is fitted and scored on the val part's other source cells (macro F1
over classes with >= 3 scored cells, accuracy; bench.lab_common.pool_score); the same cells and seeds in both arms.
    python -m bench.lab_balance [--size 20] [--draws 3]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from bench.machine import machine_info

from hemaclip.io import write_json

LABS = ("zheng1", "zheng2", "lisc")
ARMS = {"uniform": False, "balanced": True}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=20)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lab_balance.json")
    args = parser.parse_args()

    from bench.lab_common import model_read, one_per_group, pool_score, shipped_model
    from hemaclip.data.datasets import load_dataset
    from hemaclip.tasks.lab import reference_cells
    from hemaclip.tasks.onboarding import DEFAULT_SELECTION, Standardiser, fit_lab_head
    from hemaclip.train.finetune import FineTuneSettings, fine_tune_image_tower
    from hemaclip_research import onboarding as study

    torch.set_num_threads(2)
    shipped = shipped_model()
    describer, raw, classes = shipped.describer, shipped.raw, shipped.classes
    pbc_arrays, pbc_targets = reference_cells(describer, None)
    command = f"python -m bench.lab_balance --size {args.size} --draws {args.draws}"
    result = {"what": __doc__.splitlines()[0], "protocol": __doc__, "date": date.today().isoformat(), "machine": machine_info(),
              "command": command, "selection": DEFAULT_SELECTION, "labs": {}}
    if args.out.is_file() and json.loads(args.out.read_text()).get("command") == command:
        result["labs"] = json.loads(args.out.read_text())["labs"]  # resume: labs already measured are kept

    for lab in [lab for lab in LABS if lab not in result["labs"]]:
        records = [r for r in load_dataset(lab).records if r.split == "val"]
        arrays = np.stack([describer.preprocess.load(r.path) for r in records])
        labels, groups = np.array([r.label for r in records]), np.array([r.group or str(r.path) for r in records])
        pool = np.arange(len(records))
        base = {**model_read(raw, arrays), "group": groups}
        z = Standardiser.fit(base["features"])(base["features"])
        rows = {arm: [] for arm in ARMS}
        for draw in range(args.draws):
            pick = study._choose(base, z, pool, args.size, DEFAULT_SELECTION, draw)  # the learning curve's draws
            rest = one_per_group(pool[~np.isin(groups, groups[pick])], groups)
            for arm, balanced in ARMS.items():
                start = time.perf_counter()
                tuned = fine_tune_image_tower(raw, [arrays[i] for i in pick], [classes.index(str(labels[i])) for i in pick],
                                              pbc_arrays, pbc_targets, FineTuneSettings(balance_lab_classes=balanced), seed=draw)
                seconds = time.perf_counter() - start
                tuned_read = model_read(tuned, arrays)
                f, p = tuned_read["features"], tuned_read["probabilities"]
                head = fit_lab_head(f[pick], p[pick], [str(v) for v in labels[pick]], [str(g) for g in groups[pick]], classes, f[pool], seed=draw)
                rows[arm].append({**pool_score(labels[rest], np.array(head.predict(f[rest], p[rest]))), "draw": draw,
                                  "labelled_per_class": {c: int((labels[pick] == c).sum()) for c in sorted(set(labels[pick].tolist()))},
                                  "fine_tune_seconds": round(seconds, 1)})
                print(lab, arm, rows[arm][-1], flush=True)
        result["labs"][lab] = {"val_source_cells": len(set(groups.tolist())),
                               **{arm: {"macro_f1": float(np.mean([r["macro_f1"] for r in v])),
                                        "accuracy": float(np.mean([r["accuracy"] for r in v])), "draws": v} for arm, v in rows.items()}}
        write_json(args.out, result)
    result["mean_macro_f1"] = {arm: float(np.mean([v[arm]["macro_f1"] for v in result["labs"].values()])) for arm in ARMS}
    write_json(args.out, result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
