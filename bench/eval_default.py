"""Test-split numbers of a checkpoint (default: the shipped model) on WBCAtt: zero-shot class and
attribute macro F1 through text prompts (the trained wording and the held-out, unseen wording), and the
supervised heads. Writes bench/results/eval_default.json.

Until the evaluation command lands this is the script issue 3 asks for; it reuses the very function
that validates during training, pointed at the test split (never used for any choice in training).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

from bench.machine import machine_info

from hemaclip.data.datasets import load_dataset
from hemaclip.data.image_cache import decoded_images
from hemaclip.io import display_path, write_json
from hemaclip.models.checkpoint import load_checkpoint
from hemaclip.models.default import default_checkpoint_path
from hemaclip.models.text_cache import PooledTextCache
from hemaclip.text.prompts import load_prompts
from hemaclip.train.validate import validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval_default.json")
    args = parser.parse_args()
    checkpoint = args.checkpoint or default_checkpoint_path()
    start = time.perf_counter()
    model, meta = load_checkpoint(checkpoint)
    dataset = load_dataset("wbcatt")
    records = dataset.split(args.split)
    images = decoded_images([r.path for r in records], model.config.image_size)
    prompts = load_prompts()
    cache = PooledTextCache(model.text)
    by_wording = {}
    for wording in ("train", "heldout"):
        metrics = validate(model, images, records, dataset.classes, prompts, "wbcatt", cache, "cpu", wording=wording)
        by_wording[wording] = {k.replace("val_", f"{args.split}_", 1): v for k, v in metrics.items()}
    result = {
        "what": f"WBCAtt {args.split} split ({len(records)} images), macro F1",
        "n_images": len(records),
        "checkpoint": display_path(checkpoint),
        "date": date.today().isoformat(),
        "seconds": round(time.perf_counter() - start, 1),
        "metrics": by_wording["train"],
        "metrics_unseen_wording": {k: v for k, v in by_wording["heldout"].items() if "_zs_" in k},
        "wordings": {"metrics": "trained wording: the prompt file's training part (training sentences)",
                     "metrics_unseen_wording": "unseen wording: the prompt file's held-out part, in no training sentence"},
        "machine": machine_info(),
    }
    write_json(args.out, result)
    print(json.dumps({"trained wording": {k: round(v, 4) for k, v in result["metrics"].items()},
                      "unseen wording": {k: round(v, 4) for k, v in result["metrics_unseen_wording"].items()}}, indent=1))


if __name__ == "__main__":
    main()
