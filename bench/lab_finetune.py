"""Does fine-tuning the image tower on a lab's labelled cells beat the read-out on frozen features? (issue 26)

The published recipe (Chossegros et al. 2024) fine-tunes the whole network on the target lab's few cells. Here, on
the rest-of-the-lab protocol of `hemaclip.studies.onboarding` (the lab's val+test cells are the pool, `lab add`'s own
selection chooses 50 source cells, the read-out is scored on every other source cell), for draws 0-2:

* **frozen**: the shipped recipe (`lab fit`, towers ``model``) on the model's frozen embedding;
* **fine-tuned**: the model's whole image tower and class head trained for `--steps` steps (AdamW, lr 1e-4, weight
  decay 0.05, the training augmentation: crops, flips, 90-degree turns, colour jitter, plus blur and JPEG), each batch
  half the lab's 50 labelled cells and half PBC training cells (so the model keeps PBC), cross-entropy on the class
  head; then the same `lab fit` read-out on the fine-tuned embedding and class head.

Features of the frozen arm and the selection come from the study's cache (run scripts/onboarding_curve.py first).
Writes bench/results/lab_finetune.json.   python -m bench.lab_finetune [--steps 150]
"""

from __future__ import annotations

import argparse
import copy
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.machine import machine_info

from hemaclip.io import write_json

N_LABELLED = 50
PBC_PER_CLASS = 40


def _fine_tune(raw, lab_arrays, lab_targets, pbc_arrays, pbc_targets, steps: int, seed: int):
    from hemaclip.data.preprocess import preprocess_for
    from hemaclip.data.transforms import AugmentConfig

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = copy.deepcopy(raw).train()
    preprocess = preprocess_for(model)
    transform = preprocess.train_transform(AugmentConfig(blur_p=0.2, jpeg_p=0.2))
    params = list(model.visual.parameters()) + list(model.class_head.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    for _step in range(steps):
        a = rng.integers(0, len(lab_arrays), 16)
        b = rng.integers(0, len(pbc_arrays), 16)
        arrays = [lab_arrays[i] for i in a] + [pbc_arrays[i] for i in b]
        targets = torch.tensor([lab_targets[i] for i in a] + [pbc_targets[i] for i in b])
        batch = preprocess.batch(arrays, transform)
        logits = model.class_head(model.encode_image(batch, normalize=False))
        loss = F.cross_entropy(logits, targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


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
    from hemaclip.studies import onboarding as study
    from hemaclip.tasks.describe import Describer
    from hemaclip.tasks.onboarding import Standardiser

    torch.set_num_threads(2)
    path = resolve_checkpoint(None)
    sha1 = file_sha1(path)
    describer = Describer.from_checkpoint(path, index=None)
    raw, _meta = load_checkpoint(path)
    classes = [str(c) for c in describer.readout.class_names]
    pbc = load_dataset("pbc")
    rng = np.random.default_rng(0)
    pbc_records = []
    for c in classes:
        members = [r for r in pbc.split("train") if r.label == c]
        pbc_records += [members[i] for i in rng.choice(len(members), min(PBC_PER_CLASS, len(members)), replace=False)]
    pbc_arrays = [describer.preprocess.load(r.path) for r in pbc_records]
    pbc_targets = [classes.index(r.label) for r in pbc_records]
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
            tuned = _fine_tune(raw, [arrays[i] for i in pick], [classes.index(str(data["label"][i])) for i in pick],
                               pbc_arrays, pbc_targets, args.steps, draw)
            tune_s = time.perf_counter() - start
            out = image_outputs(tuned, np.stack(arrays))
            tuned_data = {**data, "features": out["features"].numpy(), "model_dim": int(raw.config.embed_dim),
                          "towers": np.array(["model"]), "probabilities": softmax(out["class_logits"].numpy(), axis=1)}
            pred, probs, head_classes, _s = study._fit_and_read(tuned_data, np.arange(out["features"].shape[1]), everything, pick, rest)
            fine = study._score(truth, pred, probs, head_classes, groups, 200)
            row = {"draw": draw, "frozen": {k: frozen[k] for k in ("macro_f1", "accuracy", "ece")},
                   "fine_tuned": {k: fine[k] for k in ("macro_f1", "accuracy", "ece")}, "fine_tune_seconds": round(tune_s, 1),
                   "scored_cells": int(len(rest)), "scored_source_cells": int(len(set(groups)))}
            rows.append(row)
            print(dataset, row, flush=True)
        result["labs"][dataset] = {"draws": rows, **{f"{arm}_{k}": float(np.mean([r[arm][k] for r in rows]))
                                                      for arm in ("frozen", "fine_tuned") for k in ("macro_f1", "accuracy", "ece")}}
        write_json(args.out, result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
