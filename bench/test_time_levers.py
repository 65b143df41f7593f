"""Test-time levers for other labs, on the shipped model: do any of them help without retraining? (None did.)

Arms, each read exactly as `hemaclip other-labs` reads a lab (calibrated read-out over the model's classes,
5 white-cell classes scored, any other class wrong), on the val and test parts of LISC, Zheng 1 and Zheng 2:

* ``none``: the shipped model as shipped (the baseline in the same run; every arm's ratio is against it).
* ``frame-2.0`` / ``frame-2.4`` / ``frame-2.8``: the white cell found and framed at 2.0 / 2.4 / 2.8 x its diameter
  before the model reads it. The shipped model reads whole PBC pictures, where the cell's diameter is about 0.41
  of the side (1 / 2.4); other labs' crops frame their cells tighter or looser, so this puts every lab's cell at
  PBC's scale.
* ``entropy-source``: Tent (:func:`hemaclip.models.adapt.adapt_entropy`, the `--adapt entropy` option) with the
  training lab's BatchNorm statistics: one pass over the lab's cells, BatchNorm scales and shifts only.
* ``entropy-batch``: the same after AdaBN (the lab's own statistics), closer to the original Tent.

Entropy adaptation is transductive: it adapts on the cells it then reads, as a user's folder would be.
Intervals: 95 % bootstrap (LISC resamples whole near-duplicate groups). Nothing here was chosen on a test part;
the frames were fixed before any number was seen.

Writes bench/results/test_time_levers.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path


from bench.machine import machine_info

from hemaclip.data.datasets import load_dataset
from hemaclip.data.image_cache import decoded_images
from hemaclip.data.preprocess import Preprocess
from hemaclip.io import write_json
from hemaclip.models.adapt import EntropySettings, adapt_entropy
from hemaclip.models.inference import prepare_for_inference
from hemaclip_research.other_labs import OTHER_LABS, read_lab, score_reading
from hemaclip.tasks.describe import Describer

FRAMES = ("2.0", "2.4", "2.8")
ENTROPY_ARMS = {"entropy-source": EntropySettings(statistics="source"), "entropy-batch": EntropySettings(statistics="batch")}


def _summary(score: dict) -> dict:
    return {"n": score["n"], "macro_f1": score["macro_f1"], "accuracy": score["accuracy"], "ece": score["ece"],
            "mean_confidence": score["mean_confidence"], "per_class_f1": score["per_class_f1"],
            "flagged_share": score.get("flagged_share"), "accuracy_unflagged": score.get("accuracy_unflagged")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "test_time_levers.json")
    parser.add_argument("--splits", default="val,test")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    start = time.perf_counter()
    describer = Describer.from_checkpoint(None, index=None, adapt="entropy")
    shipped_model, whole = describer.model, describer.preprocess
    results: dict = {}
    for split in [s.strip() for s in args.splits.split(",") if s.strip()]:
        for lab in OTHER_LABS:
            records = load_dataset(lab).split(split)
            arms: dict = {}
            describer.model, describer.preprocess = shipped_model, whole
            arms["none"] = _summary(score_reading(read_lab(describer, records, "none"), args.n_boot))
            for frame in FRAMES:
                describer.preprocess = Preprocess(whole.image_size, whole.mean, whole.std, (("frame", frame), ("locate", "cell")))
                arms[f"frame-{frame}"] = _summary(score_reading(read_lab(describer, records, "none"), args.n_boot))
            describer.preprocess = whole
            arrays = decoded_images([r.path for r in records], whole.image_size, preprocess=whole, progress=False)
            for name, settings in ENTROPY_ARMS.items():
                describer.model = prepare_for_inference(adapt_entropy(describer.training_model, arrays, settings))
                arms[name] = _summary(score_reading(read_lab(describer, records, "none"), args.n_boot))
            base = arms["none"]["macro_f1"]["point"]
            for arm in arms.values():
                arm["macro_f1_ratio_vs_none"] = round(arm["macro_f1"]["point"] / base, 4) if base else None
            results[f"{lab}/{split}"] = arms
            print(lab, split, {k: round(v["macro_f1"]["point"], 3) for k, v in arms.items()}, flush=True)
    write_json(args.out, {
        "what": "test-time levers on the shipped model, other labs' val and test parts (5 white-cell classes, any other class wrong)",
        "date": str(date.today()), "arms": ["none", *(f"frame-{f}" for f in FRAMES), *ENTROPY_ARMS],
        "entropy_settings": {k: vars(v) for k, v in ENTROPY_ARMS.items()}, "results": results,
        "n_boot": args.n_boot, "seconds": round(time.perf_counter() - start, 1), "machine": machine_info(),
    })
    print("wrote", args.out)


if __name__ == "__main__":
    sys.exit(main())
