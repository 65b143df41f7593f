"""Does fine-tuning the image tower on a lab's labelled cells beat the read-out on frozen features? (issue 26)

The published recipe (Chossegros et al. 2024) fine-tunes the whole network on the target lab's few cells. Here, on
the rest-of-the-lab protocol of `hemaclip_research.onboarding` (the lab's val+test cells are the pool, `lab add`'s own
selection chooses 50 source cells, the read-out is scored on every other source cell), for draws 0-2:

* **frozen**: the shipped recipe (`lab fit`, towers ``model``) on the model's frozen embedding;
* **fine-tuned**: `lab fit --fine-tune`'s training (:func:`hemaclip.train.finetune.fine_tune_image_tower`: the
  model's whole image tower and class head, `--steps` steps, AdamW lr 1e-4, weight decay 0.05, the training
  augmentation plus blur and JPEG, each batch half the lab's 50 labelled cells and half PBC training cells, 40 per
  class), then the same `lab fit` read-out on the fine-tuned embedding and class head;
* **fine-tuned + DINOv2**: the same read-out on the fine-tuned embedding beside the frozen DINOv2 ViT-S/14 features
  (`lab add --towers model,dinov2` then `lab fit --fine-tune`).

Features of the frozen arm and the selection come from the study's cache (run scripts/onboarding_curve.py first).
Writes bench/results/lab_finetune.json.   python -m bench.lab_finetune [--steps 150]
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

N_LABELLED = 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", default=["zheng1", "zheng2", "lisc"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lab_finetune.json")
    args = parser.parse_args()

    from scipy.special import softmax

    from hemaclip.cache import cache_dir, file_sha1
    from hemaclip.data.datasets import load_dataset
    from hemaclip.models.checkpoint import load_checkpoint
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.models.inference import image_outputs
    from hemaclip_research import onboarding as study
    from hemaclip.tasks.describe import Describer
    from hemaclip.tasks.lab import reference_cells
    from hemaclip.tasks.onboarding import Standardiser
    from hemaclip.train.finetune import FineTuneSettings, fine_tune_image_tower

    torch.set_num_threads(2)
    path = resolve_checkpoint(None)
    sha1 = file_sha1(path)
    describer = Describer.from_checkpoint(path, index=None)
    raw, _meta = load_checkpoint(path)
    classes = [str(c) for c in describer.readout.class_names]
    pbc_arrays, pbc_targets = reference_cells(describer, None)  # what `lab fit --fine-tune` mixes in
    result = {"what": __doc__.splitlines()[0], "date": date.today().isoformat(), "machine": machine_info(), "steps": args.steps,
              "command": f"python -m bench.lab_finetune --steps {args.steps}", "labs": {}}
    for dataset in args.datasets:
        cache = cache_dir() / "onboarding" / f"{dataset}-{sha1[:12]}-model-dinov2.npz"
        data = dict(np.load(cache))
        data["model_dim"] = int(raw.config.embed_dim)
        records = [r for r in load_dataset(dataset).records if r.split in ("val", "test")]
        arrays = [describer.preprocess.load(r.path) for r in records]
        everything = np.arange(len(records))
        cols = study._columns(data, "model")
        z = Standardiser.fit(data["features"][:, cols])(data["features"][:, cols])
        rows = []
        for draw in range(args.draws):
            pick = study._choose(data, z, everything, N_LABELLED, "tool", draw)
            rest = everything[~np.isin(data["group"], data["group"][pick])]
            truth, groups = data["label"][rest], data["group"][rest]
            pred, probs, head_classes, _s = study._fit_and_read(data, cols, everything, pick, rest)
            frozen = study._score(truth, pred, probs, head_classes, groups, 200)
            start = time.perf_counter()
            tuned = fine_tune_image_tower(raw, [arrays[i] for i in pick], [classes.index(str(data["label"][i])) for i in pick],
                                          pbc_arrays, pbc_targets, FineTuneSettings(steps=args.steps), seed=draw)
            tune_s = time.perf_counter() - start
            out = image_outputs(tuned, np.stack(arrays))
            tuned_data = {**data, "features": out["features"].numpy(), "model_dim": int(raw.config.embed_dim),
                          "towers": np.array(["model"]), "probabilities": softmax(out["class_logits"].numpy(), axis=1)}
            pred, probs, head_classes, _s = study._fit_and_read(tuned_data, np.arange(out["features"].shape[1]), everything, pick, rest)
            fine = study._score(truth, pred, probs, head_classes, groups, 200)
            dino = data["features"][:, data["model_dim"]:]  # frozen DINOv2 block of the study's cache
            both = {**tuned_data, "features": np.concatenate([tuned_data["features"], dino], axis=1)}
            pred, probs, head_classes, _s = study._fit_and_read(both, np.arange(both["features"].shape[1]), everything, pick, rest)
            fine_dino = study._score(truth, pred, probs, head_classes, groups, 200)
            row = {"draw": draw, "frozen": {k: frozen[k] for k in ("macro_f1", "accuracy", "ece")},
                   "fine_tuned": {k: fine[k] for k in ("macro_f1", "accuracy", "ece")},
                   "fine_tuned_dinov2": {k: fine_dino[k] for k in ("macro_f1", "accuracy", "ece")}, "fine_tune_seconds": round(tune_s, 1),
                   "scored_cells": int(len(rest)), "scored_source_cells": int(len(set(groups)))}
            rows.append(row)
            print(dataset, row, flush=True)
        result["labs"][dataset] = {"draws": rows, **{f"{arm}_{k}": float(np.mean([r[arm][k] for r in rows]))
                                                      for arm in ("frozen", "fine_tuned", "fine_tuned_dinov2") for k in ("macro_f1", "accuracy", "ece")}}
        write_json(args.out, result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
