"""Does fine-tuning the image tower on a lab's labelled cells beat the read-out on frozen features? (issue 26)

The published recipe (Chossegros et al. 2024) fine-tunes the whole network on the target lab's few cells. Here, on
the rest-of-the-lab protocol of `hemaclip_research.onboarding` (the lab's val+test cells are the pool, `lab add`'s own
selection (`--selection`, default typical-kcenter) chooses 50 (and 20) source cells, the read-out is scored on every
other source cell; or, with `--protocol val-test`, cells chosen from the lab's val part and scored on its test part),
5 draws (the study's seeds; a block per protocol and selection rule, :func:`block_name`):

* **frozen**: `lab fit --no-fine-tune` (towers ``model``): the read-out on the model's frozen embedding;
* **fine-tuned**: `lab fit`'s default training (:func:`hemaclip.train.finetune.fine_tune_image_tower`: the
  model's whole image tower and class head, `--steps` steps, AdamW lr 1e-4, weight decay 0.05, the training
  augmentation plus blur and JPEG, each batch half the lab's labelled cells and half PBC training cells, 40 per
  class), then the same `lab fit` read-out on the fine-tuned embedding and class head;
* **fine-tuned + DINOv2**: the same read-out on the fine-tuned embedding beside the frozen DINOv2 ViT-S/14 features
  (`lab add --towers model,dinov2` then `lab fit --fine-tune`).

Features of the frozen arm and the selection come from the study's cache (run scripts/onboarding_curve.py first).
Writes bench/results/lab_finetune.json after every draw; a run with the same --steps resumes from it.
    python -m bench.lab_finetune [--steps 150] [--draws 5] [--sizes 50 20] [--protocol rest|val-test]
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from bench.machine import machine_info

from hemaclip.io import write_json

SIZES = (50, 20)
ARMS = ("frozen", "fine_tuned", "fine_tuned_dinov2")
PROTOCOLS = {"rest": "by_n", "val-test": "val_test_by_n"}  # protocol -> its block in the JSON


def block_name(protocol: str, selection: str) -> str:
    """The JSON block of a protocol and selection rule: ``by_n`` / ``val_test_by_n`` for `lab add`'s default rule,
    with ``_<rule>`` appended for any other (the blocks measured before typical-kcenter became the default are
    ``*_kcenter``)."""
    from hemaclip.tasks.onboarding import DEFAULT_SELECTION

    return PROTOCOLS[protocol] + ("" if selection == DEFAULT_SELECTION else f"_{selection}")


def _previous(path: Path, steps: int) -> dict:
    """The file of an earlier run with the same number of steps (a run resumes from its draws), else {}."""
    import json

    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    return old if old.get("steps") == steps else {}


def _done_draws(previous: dict, key: str) -> dict[str, dict[str, list[dict]]]:
    """Draws already measured under `key` (a protocol), by labelled-cell count and lab."""
    return {n: {lab: list(block.get("draws", [])) for lab, block in labs.items()} for n, labs in previous.get(key, {}).items()}


def _summary(rows: list[dict]) -> dict:
    return {"draws": rows, **{f"{arm}_{k}": float(np.mean([r[arm][k] for r in rows]))
                              for arm in ARMS for k in ("macro_f1", "accuracy", "ece")},
            **{f"{arm}_macro_f1_sd": float(np.std([r[arm]["macro_f1"] for r in rows], ddof=1)) if len(rows) > 1 else 0.0
               for arm in ARMS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="labelled source cells per draw")
    parser.add_argument("--datasets", nargs="+", default=["zheng1", "zheng2", "lisc"])
    parser.add_argument("--protocol", choices=list(PROTOCOLS), default="rest",
                        help="rest: cells chosen from the whole lab, scored on its other source cells (by_n); val-test: "
                             "chosen from the lab's val part, scored on its test part (val_test_by_n; sizes above the "
                             "val part's source cells are skipped)")
    parser.add_argument("--selection", default=None, help="lab add's selection rule (default: its default)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lab_finetune.json")
    args = parser.parse_args()

    from bench.lab_common import model_read, shipped_model
    from hemaclip.cache import cache_dir
    from hemaclip.data.datasets import load_dataset
    from hemaclip_research import onboarding as study
    from hemaclip.tasks.lab import reference_cells
    from hemaclip.tasks.onboarding import Standardiser, check_selection
    from hemaclip.train.finetune import FineTuneSettings, fine_tune_image_tower

    torch.set_num_threads(2)
    shipped = shipped_model()
    describer, sha1, raw, classes = shipped.describer, shipped.sha1, shipped.raw, shipped.classes
    pbc_arrays, pbc_targets = reference_cells(describer, None)  # what `lab fit --fine-tune` mixes in
    selection = check_selection(args.selection)
    key = block_name(args.protocol, selection)
    previous = _previous(args.out, args.steps)
    done = _done_draws(previous, key)
    result = {**previous, "what": __doc__.splitlines()[0], "date": date.today().isoformat(), "machine": machine_info(),
              "steps": args.steps, "command": f"python -m bench.lab_finetune --steps {args.steps} --draws {args.draws} "
                                              f"--protocol {{{'|'.join(PROTOCOLS)}}} [--selection RULE]",
              key: {str(n): {lab: _summary(rows) for lab, rows in labs.items() if rows} for n, labs in done.items()}}
    for dataset in args.datasets:
        cache = cache_dir() / "onboarding" / f"{dataset}-{sha1[:12]}-model-dinov2.npz"
        data = dict(np.load(cache))
        data["model_dim"] = int(raw.config.embed_dim)
        records = [r for r in load_dataset(dataset).records if r.split in ("val", "test")]
        arrays = [describer.preprocess.load(r.path) for r in records]
        everything = np.arange(len(records))
        pool = everything if args.protocol == "rest" else np.flatnonzero(data["split"] == "val")
        cols = study._columns(data, "model")
        z = Standardiser.fit(data["features"][pool][:, cols])(data["features"][:, cols])
        for n_labelled in [n for n in args.sizes if n <= len(set(data["group"][pool]))]:
            rows = [r for r in done.get(str(n_labelled), {}).get(dataset, []) if r["draw"] < args.draws]
            for draw in range(len(rows), args.draws):
                pick = study._choose(data, z, pool, n_labelled, selection, draw)  # the learning curve's draws
                rest = (everything[~np.isin(data["group"], data["group"][pick])] if args.protocol == "rest"
                        else np.flatnonzero(data["split"] == "test"))
                truth, groups = data["label"][rest], data["group"][rest]
                pred, probs, head_classes, _s = study._fit_and_read(data, cols, pool, pick, rest)
                frozen = study._score(truth, pred, probs, head_classes, groups, 200)
                start = time.perf_counter()
                tuned = fine_tune_image_tower(raw, [arrays[i] for i in pick], [classes.index(str(data["label"][i])) for i in pick],
                                              pbc_arrays, pbc_targets, FineTuneSettings(steps=args.steps), seed=draw)
                tune_s = time.perf_counter() - start
                tuned_data = {**data, **model_read(tuned, np.stack(arrays)), "model_dim": int(raw.config.embed_dim),
                              "towers": np.array(["model"])}
                pred, probs, head_classes, _s = study._fit_and_read(tuned_data, np.arange(tuned_data["features"].shape[1]), pool, pick, rest)
                fine = study._score(truth, pred, probs, head_classes, groups, 200)
                dino = data["features"][:, data["model_dim"]:]  # frozen DINOv2 block of the study's cache
                both = {**tuned_data, "features": np.concatenate([tuned_data["features"], dino], axis=1)}
                pred, probs, head_classes, _s = study._fit_and_read(both, np.arange(both["features"].shape[1]), pool, pick, rest)
                fine_dino = study._score(truth, pred, probs, head_classes, groups, 200)
                row = {"draw": draw, "frozen": {k: frozen[k] for k in ("macro_f1", "accuracy", "ece")},
                       "fine_tuned": {k: fine[k] for k in ("macro_f1", "accuracy", "ece")},
                       "fine_tuned_dinov2": {k: fine_dino[k] for k in ("macro_f1", "accuracy", "ece")}, "fine_tune_seconds": round(tune_s, 1),
                       "scored_cells": int(len(rest)), "scored_source_cells": int(len(set(groups)))}
                rows.append(row)
                print(dataset, n_labelled, row, flush=True)
                result[key].setdefault(str(n_labelled), {})[dataset] = _summary(rows)
                write_json(args.out, result)  # after every draw: an interrupted run resumes where it stopped
    write_json(args.out, result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
