"""Does a base model that has already seen more than one lab adapt better to a new one? (issue 26, development pools)

Chossegros et al. (2024) start their few-cell fine-tune from a two-source base. Here the shipped model (PBC only) is
continued on PBC plus every *other* lab's labelled cells (leave-one-lab-out: for LISC the base sees Zheng 1 and
Zheng 2; for Zheng 1 it sees LISC's train part and Zheng 2; for Zheng 2, LISC's train part and Zheng 1), with the
lab fine-tune's own trainer (:func:`hemaclip.train.finetune.fine_tune_image_tower`: image tower and class head,
each batch half second-source cells and half PBC reference cells, `--base-steps` steps). Then, on each target lab's
**val part only** (no test cell is read):

* **0 cells**: the class head read as it comes, over the white-cell classes, one crop per source cell;
* **N cells, frozen read-out**: `lab add`'s default selection picks N source cells of the val part (on that base's own
  features and uncertainty), `lab fit --no-fine-tune`'s read-out is fitted on them and scored on the val part's
  other source cells (as in bench.lab_selection: macro F1 over classes with >= 3 scored cells, accuracy), 5 draws;
* **N cells, fine-tuned** (`--fine-tune-draws K`, the first K draws): `lab fit`'s default fine-tune from that base,
  then the same read-out.

Arms: ``pbc`` (the shipped model) and ``multi`` (the continued base). Both read through the same code (features
and softmax of the class head from :func:`bench.lab_common.model_read`).
    python -m bench.lab_multisource [--base-steps 300] [--sizes 10 20] [--draws 5] [--fine-tune-draws 0]
"""

from __future__ import annotations

import argparse
import copy
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from bench.machine import machine_info

from hemaclip.io import write_json

LABS = ("lisc", "zheng1", "zheng2")
WHITE_CELLS = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")


def second_sources(target: str) -> list[tuple[str, tuple[str, ...]]]:
    """The other labs' labelled cells a leave-`target`-out base may see: (dataset, splits). LISC's val and test
    parts stay out of every base, so LISC's own onboarding rows never meet a cell it was trained on."""
    return [(lab, ("train",) if lab == "lisc" else ("val", "test")) for lab in LABS if lab != target]


def _zero_cells(data: dict, pool: np.ndarray, classes: list[str]) -> dict:
    from bench.lab_common import one_per_group, pool_score

    rest = one_per_group(pool, data["group"])
    white = np.array([c in WHITE_CELLS for c in classes])
    probs = np.where(white, data["probabilities"][rest], 0.0)
    return pool_score(data["label"][rest], np.array([classes[i] for i in probs.argmax(1)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--fine-tune-draws", type=int, default=0, help="fine-tuned arm on the first K draws (2 min each)")
    parser.add_argument("--fine-tune-size", type=int, default=20)
    parser.add_argument("--labs", nargs="+", default=list(LABS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lab_multisource.json")
    args = parser.parse_args()

    from bench.lab_common import model_read, one_per_group, pool_score, shipped_model
    from bench.lab_selection import _score
    from hemaclip.cache import cache_dir
    from hemaclip.data.datasets import load_dataset
    from hemaclip.tasks.lab import reference_cells
    from hemaclip.tasks.onboarding import DEFAULT_SELECTION, Standardiser, fit_lab_head
    from hemaclip_research import onboarding as study
    from hemaclip.train.finetune import FineTuneSettings, fine_tune_image_tower

    torch.set_num_threads(2)
    shipped = shipped_model()
    describer, sha1, raw, classes = shipped.describer, shipped.sha1, shipped.raw, shipped.classes
    pbc_arrays, pbc_targets = reference_cells(describer, None)
    result = {"what": __doc__.splitlines()[0], "protocol": __doc__, "date": date.today().isoformat(), "machine": machine_info(),
              "command": f"python -m bench.lab_multisource --base-steps {args.base_steps} --sizes {' '.join(map(str, args.sizes))} "
                         f"--draws {args.draws} --fine-tune-draws {args.fine_tune_draws}",
              "selection": DEFAULT_SELECTION, "labs": {}}
    if args.out.is_file():
        import json

        old = json.loads(args.out.read_text())
        if old.get("command") == result["command"]:
            result["labs"] = old.get("labs", {})
    for target in args.labs:
        if target in result["labs"]:
            continue
        sources = second_sources(target)
        source_arrays, source_targets = [], []
        for dataset, splits in sources:
            for record in load_dataset(dataset).records:
                if record.split in splits and record.label in classes:
                    source_arrays.append(describer.preprocess.load(record.path))
                    source_targets.append(classes.index(record.label))
        base_file = cache_dir() / "onboarding" / f"multisource-{target}-{sha1[:12]}-{args.base_steps}.pt"
        start = time.perf_counter()
        multi = copy.deepcopy(raw)
        if base_file.is_file():
            multi.load_state_dict(torch.load(base_file))
        else:
            multi = fine_tune_image_tower(raw, source_arrays, source_targets, pbc_arrays, pbc_targets,
                                          FineTuneSettings(steps=args.base_steps), seed=0)
            base_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(multi.state_dict(), base_file)
        base_seconds = time.perf_counter() - start
        records = [r for r in load_dataset(target).records if r.split == "val"]
        arrays = np.stack([describer.preprocess.load(r.path) for r in records])
        meta = {"label": np.array([r.label for r in records]), "group": np.array([r.group or str(r.path) for r in records]),
                "model_classes": classes}
        pool = np.arange(len(records))
        lab_row: dict = {"second_sources": [f"{d} ({'+'.join(s)})" for d, s in sources], "second_source_cells": len(source_arrays),
                         "base_seconds": round(base_seconds, 1), "val_source_cells": len(set(meta["group"].tolist())), "arms": {}}
        for arm, model in (("pbc", raw), ("multi", multi)):
            data = {**meta, **model_read(model, arrays)}
            data["selection_probabilities"] = data["probabilities"]
            row = {"0": _zero_cells(data, pool, classes)}
            for n in [n for n in args.sizes if n <= lab_row["val_source_cells"] - 5]:
                row[str(n)] = _score(data, pool, None, n, DEFAULT_SELECTION, args.draws)
            if args.fine_tune_draws:
                tuned_rows = []
                z = Standardiser.fit(data["features"][pool])(data["features"])
                for draw in range(args.fine_tune_draws):
                    pick = study._choose(data, z, pool, args.fine_tune_size, DEFAULT_SELECTION, draw)  # the curve's draws
                    tuned = fine_tune_image_tower(model, [arrays[i] for i in pick], [classes.index(str(meta["label"][i])) for i in pick],
                                                  pbc_arrays, pbc_targets, FineTuneSettings(), seed=draw)
                    t = {**meta, **model_read(tuned, arrays)}
                    rest = one_per_group(pool[~np.isin(meta["group"][pool], meta["group"][pick])], meta["group"])
                    head = fit_lab_head(t["features"][pick], t["probabilities"][pick], [str(v) for v in meta["label"][pick]],
                                        [str(g) for g in meta["group"][pick]], classes, t["features"][pool], seed=draw)
                    tuned_rows.append(pool_score(meta["label"][rest], np.array(head.predict(t["features"][rest], t["probabilities"][rest]))))
                    print(target, arm, "fine-tuned draw", draw, tuned_rows[-1], flush=True)
                row[f"fine_tuned_{args.fine_tune_size}"] = {k: float(np.mean([r[k] for r in tuned_rows])) for k in tuned_rows[0]} | {"draws": tuned_rows}
            lab_row["arms"][arm] = row
            print(target, arm, {n: round(v["macro_f1"], 3) for n, v in row.items()}, flush=True)
        result["labs"][target] = lab_row
        write_json(args.out, result)
    for arm in ("pbc", "multi"):
        keys = sorted({k for lab in result["labs"].values() for k in lab["arms"][arm]})
        result.setdefault("mean_macro_f1", {})[arm] = {k: float(np.mean([lab["arms"][arm][k]["macro_f1"] for lab in result["labs"].values()
                                                                          if k in lab["arms"][arm]])) for k in keys}
    write_json(args.out, result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
