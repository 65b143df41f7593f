"""Which cells should a lab label first? The selection rules of `hemaclip lab add --selection`, compared on
development pools only (issue 26).

No lab's test part is read. The pools:

* **each other lab's val part** (LISC, Zheng 1, Zheng 2: 31-90 source cells): N source cells chosen from it, the
  read-out of `lab fit --no-fine-tune` (towers ``model``) fitted on them and scored on the val part's other source
  cells (one crop per source cell);
* **the ALL set** (another lab and another task: benign, early pre-B, pre-B, pro-B): N images chosen from 300,
  600 or all 2,252 of its training images, scored on its 320 val images. The model's classes are not ALL's, so the
  read-out here has no prior from the model (uniform), while the selection still weighs the model's uncertainty.
  It stands in for what the three small val parts cannot show: a lab's whole folder, hundreds to thousands of
  cells, which is how a new lab is onboarded (`lab add --labels-from-folders --budget 50` over its folder).

Rules (:data:`hemaclip.tasks.onboarding.SELECTION_RULES`): kcenter (the rule before this comparison),
typical-kcenter (the default after it), typiclust (Hacohen et al., ICML 2022) and random; 5 draws each (draw 0 the
whole pool, then 90 % subsamples, as in the learning curve); mean macro F1 over classes with >= 3 scored cells,
accuracy and the number of classes the chosen cells cover.
    python -m bench.lab_selection [--sizes 10 20 50] [--draws 5]
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import numpy as np

from bench.lab_common import one_per_group, pool_score, shipped_model
from bench.machine import machine_info

from hemaclip.io import write_json

ALL_POOLS = (300, 600, None)  # ALL training images in the pool (None: all of them); fixed subsample seed below
ALL_SUBSAMPLE_SEED = 123


def _score(data: dict, pool: np.ndarray, scored: np.ndarray | None, n: int, rule: str, draws: int) -> dict:
    from hemaclip.tasks.onboarding import Standardiser, fit_lab_head, select_cells, uncertainty

    x, y, groups = data["features"], data["label"], data["group"]
    z = Standardiser.fit(x[pool])(x)
    rows = []
    for draw in range(draws):
        rng = np.random.default_rng(draw)
        sub = pool if draw == 0 else pool[rng.random(len(pool)) > 0.1]
        pick = sub[select_cells(z[sub], uncertainty(data["selection_probabilities"][sub]), groups[sub], n, rule=rule, seed=draw)]
        rest = scored if scored is not None else one_per_group(pool[~np.isin(groups[pool], groups[pick])], groups)
        if len(set(y[pick])) < 2:
            rows.append({"macro_f1": 0.0, "accuracy": 0.0, "classes_covered": len(set(y[pick]))})
            continue
        head = fit_lab_head(x[pick], data["probabilities"][pick], [str(v) for v in y[pick]], [str(g) for g in groups[pick]],
                            data["model_classes"], x[pool], seed=draw)
        pred = np.array(head.predict(x[rest], data["probabilities"][rest]))
        rows.append({**pool_score(y[rest], pred), "classes_covered": len(set(y[pick]))})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} | {"draws": rows}


def _lab_pools(describer, sha1: str, model_dim: int):
    from hemaclip.cache import cache_dir
    from hemaclip_research import onboarding as study

    for lab in ("lisc", "zheng1", "zheng2"):
        dinov2_cache = cache_dir() / "onboarding" / f"{lab}-{sha1[:12]}-model-dinov2.npz"
        if dinov2_cache.is_file():  # the learning curve's cache: its first block is the model's embedding
            data = study.lab_features(describer, lab, ["model", "dinov2"], None, dinov2_cache)
            data["features"] = data["features"][:, :model_dim]
        else:
            data = study.lab_features(describer, lab, ["model"], None, cache_dir() / "onboarding" / f"{lab}-{sha1[:12]}-model.npz")
        data["selection_probabilities"] = data["probabilities"]
        data["model_classes"] = [str(c) for c in data["model_classes"]]
        yield f"{lab} val", data, np.flatnonzero(data["split"] == "val"), None


def _all_pools(describer, sha1: str):
    from hemaclip.cache import cache_dir
    from hemaclip.data.datasets import load_dataset
    from hemaclip.io import atomic_write
    from hemaclip.tasks.lab import tower_features

    cache = cache_dir() / "onboarding" / f"all-train-val-{sha1[:12]}-model.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            data = {k: stored[k] for k in stored.files}
    else:
        records = [r for r in load_dataset("all").records if r.split in ("train", "val")]
        first: dict = {}
        for d in describer.describe_paths([r.path for r in records], progress=True):
            if d.error is None:
                first.setdefault(d.source, d)
        records = [r for r in records if str(r.path) in first]
        described = [first[str(r.path)] for r in records]
        data = {"features": tower_features(["model"], described, describer),
                "selection_probabilities": np.stack([d.class_probabilities for d in described]),
                "label": np.array([r.label for r in records]), "split": np.array([r.split for r in records]),
                "group": np.array([str(r.path) for r in records])}
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache, "wb") as handle:
            np.savez(handle, **data)
    classes = sorted(set(data["label"].tolist()))
    data["model_classes"] = classes  # no prior from the model: its classes are not ALL's
    data["probabilities"] = np.full((len(data["label"]), len(classes)), 1.0 / len(classes))
    train, val = np.flatnonzero(data["split"] == "train"), np.flatnonzero(data["split"] == "val")
    for size in ALL_POOLS:
        pool = train if size is None else np.sort(np.random.default_rng(ALL_SUBSAMPLE_SEED).choice(train, size, replace=False))
        yield f"ALL train {len(pool)} -> val", data, pool, val


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lab_selection.json")
    args = parser.parse_args()

    from hemaclip.tasks.onboarding import DEFAULT_SELECTION, SELECTION_RULES

    shipped = shipped_model()
    describer, sha1, model_dim = shipped.describer, shipped.sha1, int(shipped.raw.config.embed_dim)
    pools: dict[str, dict] = {}
    for name, data, pool, scored in [*_lab_pools(describer, sha1, model_dim), *_all_pools(describer, sha1)]:
        source_cells = len(set(data["group"][pool].tolist()))
        for n in [n for n in args.sizes if n <= source_cells - 5]:  # leave something to score on
            row = {rule: _score(data, pool, scored, n, rule, args.draws) for rule in SELECTION_RULES}
            pools.setdefault(name, {"pool_source_cells": source_cells, "by_n": {}})["by_n"][str(n)] = row
            print(name, n, {rule: round(v["macro_f1"], 3) for rule, v in row.items()}, flush=True)
    mean = {rule: float(np.mean([row[rule]["macro_f1"] for p in pools.values() for row in p["by_n"].values()]))
            for rule in SELECTION_RULES}
    labs_only = {rule: float(np.mean([row[rule]["macro_f1"] for name, p in pools.items() if not name.startswith("ALL")
                                      for row in p["by_n"].values()])) for rule in SELECTION_RULES}
    write_json(args.out, {"what": __doc__.splitlines()[0], "protocol": __doc__, "date": date.today().isoformat(),
                          "machine": machine_info(), "command": f"python -m bench.lab_selection --sizes {' '.join(map(str, args.sizes))} --draws {args.draws}",
                          "default_rule": DEFAULT_SELECTION, "rules": {k: v.description for k, v in SELECTION_RULES.items()},
                          "mean_macro_f1": mean, "mean_macro_f1_lab_val_parts": labs_only, "pools": pools})
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
