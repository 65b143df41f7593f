"""In which feature space should `lab add` choose cells when the profile also holds DINOv2 features? (issue 26)

The selection rules were compared (bench.lab_selection) on the model's own 256-d embedding. A profile built with
`--towers model,dinov2` holds the model's embedding beside 768 DINOv2 columns, and its read-out uses both. Here, on
development pools only (each other lab's **val** part; no test cell is read), N source cells are chosen either on
every tower's standardised features (``all``) or on the model's block alone (``model``), by typical-kcenter,
kcenter or random choice; the read-out on both towers is fitted on them and scored on the val part's other source
cells (macro F1 over classes with >= 3 scored cells, as bench.lab_selection), 5 draws (draw 0 the whole pool, then
90 % subsamples).
    python -m bench.lab_selection_space [--draws 5]
"""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path

import numpy as np

from bench.machine import machine_info

from hemaclip.io import write_json

RULES = ("typical-kcenter", "kcenter", "random")
SIZES = (10, 20, 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lab_selection_space.json")
    args = parser.parse_args()

    from bench.lab_common import one_per_group, pool_score, shipped_model
    from hemaclip.cache import cache_dir
    from hemaclip.tasks.onboarding import Standardiser, fit_lab_head, select_cells, uncertainty
    from hemaclip_research import onboarding as study

    shipped = shipped_model()
    describer, sha1, model_dim = shipped.describer, shipped.sha1, int(shipped.raw.config.embed_dim)
    pools: dict = {}
    for lab in ("lisc", "zheng1", "zheng2"):
        d = study.lab_features(describer, lab, ["model", "dinov2"], None, cache_dir() / "onboarding" / f"{lab}-{sha1[:12]}-model-dinov2.npz")
        x, y, g = d["features"], d["label"], d["group"]
        classes = [str(c) for c in d["model_classes"]]
        pool = np.flatnonzero(d["split"] == "val")
        spaces = {"all": Standardiser.fit(x[pool])(x), "model": Standardiser.fit(x[pool][:, :model_dim])(x[:, :model_dim])}
        for n in [n for n in SIZES if n <= len(set(g[pool])) - 5]:
            for space, z in spaces.items():
                for rule in RULES:
                    scores = []
                    for draw in range(args.draws):
                        rng = np.random.default_rng(draw)
                        sub = pool if draw == 0 else pool[rng.random(len(pool)) > 0.1]
                        pick = sub[select_cells(z[sub], uncertainty(d["probabilities"][sub]), g[sub], n, rule=rule, seed=draw)]
                        rest = one_per_group(pool[~np.isin(g[pool], g[pick])], g)
                        head = fit_lab_head(x[pick], d["probabilities"][pick], [str(v) for v in y[pick]], [str(v) for v in g[pick]],
                                            classes, x[pool], seed=draw)
                        scores.append(pool_score(y[rest], np.array(head.predict(x[rest], d["probabilities"][rest])))["macro_f1"])
                    pools.setdefault(f"{lab} val", {}).setdefault(str(n), {}).setdefault(space, {})[rule] = {
                        "macro_f1": float(np.mean(scores)), "draws": scores}
                    print(lab, n, space, rule, round(float(np.mean(scores)), 3), flush=True)
    mean = {space: {rule: float(np.mean([row[space][rule]["macro_f1"] for p in pools.values() for row in p.values()]))
                    for rule in RULES} for space in ("all", "model")}
    write_json(args.out, {"what": __doc__.splitlines()[0], "protocol": __doc__, "date": date.today().isoformat(),
                          "machine": machine_info(), "command": f"python -m bench.lab_selection_space --draws {args.draws}",
                          "mean_macro_f1": mean, "pools": pools})
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
