"""Stain studies: does stain normalisation help on stain-shifted / other-lab images, and does HED stain
jitter at training time make a model more robust to stain shift?

  python -m bench.stain_studies normalisation          # -> bench/results/stain_normalisation.json
  python -m bench.stain_studies augmentation --runs runs/stainaug-j0.0 runs/stainaug-j0.2
                                                        # -> bench/results/stain_augmentation.json

Both files carry a `report_section` that `hemaclip robustness --study FILE` renders into its report.
Numbers are on a fixed WBCAtt test subset (60 images per class, seed 0); no bootstrap intervals here,
so small differences (a few hundredths of F1 on 300 images) should not be over-read.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np

from bench.machine import machine_info

from hemaclip.data.datasets import load_dataset
from hemaclip.data.image_cache import decoded_images
from hemaclip.data.stain import NORMALIZER_NAMES, get_normalizer, normalize_batch
from hemaclip.io import display_path, write_json
from hemaclip.models.checkpoint import load_checkpoint
from hemaclip.models.default import resolve_checkpoint
from hemaclip.models.inference import image_outputs
from hemaclip.models.text_cache import PooledTextCache
from hemaclip.tasks.probes import sample_per_class
from hemaclip.tasks.robustness import RobustnessConfig, run_robustness
from hemaclip.tasks.zero_shot import class_embeddings
from hemaclip.text.prompts import load_prompts

RESULTS = Path(__file__).parent / "results"
PER_CLASS = 60
SEED = 0
METRICS = ("zs_class", "head_class", "zs_attr", "head_attr")


def _test_subset(size: int) -> tuple[list, np.ndarray]:
    records = sorted(load_dataset("wbcatt").split("test"), key=lambda r: str(r.path))
    records = [records[i] for i in sample_per_class([r.label for r in records], PER_CLASS, SEED)]
    return records, decoded_images([r.path for r in records], size, progress=False)


def _round(d: dict) -> dict:
    return {k: round(v, 4) for k, v in d.items()}


def normalisation(checkpoint: Path | None, out: Path) -> None:
    t0 = time.perf_counter()
    path = resolve_checkpoint(checkpoint)
    model, _ = load_checkpoint(path)
    size = int(model.config.image_size)
    prompts = load_prompts()
    classes = list(prompts.classes("wbcatt"))
    records, images = _test_subset(size)
    config = RobustnessConfig(corruptions=("stain_shift",), severities=(4, 5), seed=SEED, baseline=False)
    shifted: dict[str, dict] = {}
    for name in NORMALIZER_NAMES:
        normalizer = get_normalizer(name)
        result = run_robustness(model, records, images, prompts, "wbcatt", classes, config, stain_normalizer=normalizer)
        shifted[name] = {k: _round(v) for k, v in result["scores"].items()}
        shifted[name]["fallbacks"] = int(getattr(normalizer, "fallbacks", 0))
        print(name, shifted[name], flush=True)

    # The ALL set (another lab, 3,216 unique images): every cell is lymphoid (benign hematogones or
    # B-lymphoblasts), so among the five WBCAtt classes "lymphocyte" is the only right answer.
    all_records = load_dataset("all").split("all")
    all_images = decoded_images([r.path for r in all_records], size, progress=False)
    weights = class_embeddings(model, prompts.class_prompts("wbcatt"), PooledTextCache(model.text))
    head_cols = [list(model.class_names).index(c) for c in classes]
    all_set: dict[str, dict] = {}
    for name in NORMALIZER_NAMES:
        normalizer = get_normalizer(name)
        out_ = image_outputs(model, normalize_batch(all_images, normalizer), batch_size=128)
        zs = [classes[i] for i in np.argmax(out_["features"].numpy() @ weights.T, axis=1)]
        head = [classes[i] for i in np.argmax(out_["class_logits"].numpy()[:, head_cols], axis=1)]
        all_set[name] = {
            "zs_lymphocyte_fraction": round(float(np.mean([p == "lymphocyte" for p in zs])), 4),
            "head_lymphocyte_fraction": round(float(np.mean([p == "lymphocyte" for p in head])), 4),
            "zs_predictions": dict(sorted(Counter(zs).items())),
            "head_predictions": dict(sorted(Counter(head).items())),
            "fallbacks": int(getattr(normalizer, "fallbacks", 0)),
        }
        print(name, all_set[name], flush=True)

    rows = []
    for name in NORMALIZER_NAMES:
        s = shifted[name]
        rows.append([name, s["clean/0"]["head_class"], s["stain_shift/4"]["head_class"], s["stain_shift/5"]["head_class"],
                     s["clean/0"]["head_attr"], s["stain_shift/5"]["head_attr"], s["clean/0"]["zs_class"], s["stain_shift/5"]["zs_class"],
                     all_set[name]["zs_lymphocyte_fraction"], all_set[name]["head_lymphocyte_fraction"]])
    payload = {
        "what": "stain normalisation (none / Macenko / Reinhard, shipped PBC reference) before the default model",
        "date": str(date.today()),
        "command": "python -m bench.stain_studies normalisation",
        "checkpoint": display_path(path),
        "wbcatt_test_subset": {"per_class": PER_CLASS, "seed": SEED, "n_images": len(records),
                               "corruption": "stain_shift severities 4 and 5 (hemaclip.data.corruptions)", "scores": shifted},
        "all_set": {"n_images": len(all_records), "note": "every ALL image is lymphoid; fraction predicted 'lymphocyte' "
                    "among the five WBCAtt classes is a proxy for transfer to another lab", "results": all_set},
        "machine": machine_info(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    payload["report_section"] = {
        "title": "Stain normalisation",
        "text": (f"Default model; images normalised (after the corruption) to the shipped PBC reference. WBCAtt test "
                 f"subset: {len(records)} images ({PER_CLASS} per class), clean and with stain shift at severities 4 and 5. "
                 f"ALL set: all {len(all_records)} unique images of another lab; every cell is lymphoid, so the fraction "
                 "called 'lymphocyte' (among the five WBCAtt classes) is a rough proxy of transfer. No intervals: "
                 "differences of a few hundredths are within noise."),
        "columns": ["normalisation", "head class F1 clean", "head class F1 stain 4", "head class F1 stain 5",
                    "head attr F1 clean", "head attr F1 stain 5", "zero-shot class F1 clean", "zero-shot class F1 stain 5",
                    "ALL: zero-shot 'lymphocyte'", "ALL: head 'lymphocyte'"],
        "rows": rows,
        "caption": "Macro F1 on the WBCAtt test subset; fraction of ALL images called lymphocyte",
    }
    write_json(out, payload)
    print(f"wrote {out}")


def augmentation(runs: list[Path], out: Path) -> None:
    t0 = time.perf_counter()
    prompts = load_prompts()
    classes = list(prompts.classes("wbcatt"))
    config = RobustnessConfig(corruptions=("stain_shift",), severities=(1, 2, 3, 4, 5), seed=SEED, baseline=False)
    arms = {}
    for run in runs:
        train_config = json.loads((run / "config.json").read_text())["train"]
        checkpoint = run / "best.pt"
        model, _ = load_checkpoint(checkpoint)
        records, images = _test_subset(int(model.config.image_size))
        result = run_robustness(model, records, images, prompts, "wbcatt", classes, config)
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        arms[str(train_config["stain_jitter"])] = {
            "run": str(run),
            "checkpoint": "best.pt",
            "train_config": {k: train_config[k] for k in ("epochs", "max_train_images", "max_val_images", "warmup_steps",
                                                          "stain_jitter", "seed", "model", "dataset")},
            "train_images_per_s": [round(r["train_images_per_s"], 1) for r in history],
            "val_history": [{k: round(v, 4) for k, v in r.items() if k.startswith("val_") and k.endswith("macro_f1")} for r in history],
            "scores": {k: _round(v) for k, v in result["scores"].items()},
            "errors": {m: {"clean_f1": round(e["clean_f1"], 4), "stain_shift_ce": round(e["per_corruption"]["stain_shift"]["ce"], 4),
                           "stain_shift_mean_f1": round(e["per_corruption"]["stain_shift"]["mean_f1"], 4)}
                       for m, e in result["errors"].items()},
        }
        print(run, arms[str(train_config["stain_jitter"])]["errors"], flush=True)
    rows = []
    for jitter, arm in arms.items():
        for metric in METRICS:
            e = arm["errors"][metric]
            rows.append([jitter, metric, e["clean_f1"], arm["scores"]["stain_shift/3"][metric], arm["scores"]["stain_shift/5"][metric],
                         e["stain_shift_mean_f1"], e["stain_shift_ce"]])
    payload = {
        "what": "two identical short trainings, with and without HED stain jitter, scored clean and under stain shift",
        "date": str(date.today()),
        "command": ("hemaclip train --config default --out runs/stainaug-jJ --set epochs=2 --set max_train_images=3000 "
                    "--set max_val_images=500 --set warmup_steps=30 --set stain_jitter=J (J = 0.0, 0.2); "
                    "python -m bench.stain_studies augmentation --runs runs/stainaug-j0.0 runs/stainaug-j0.2"),
        "test_subset": {"per_class": PER_CLASS, "seed": SEED},
        "arms": arms,
        "machine": machine_info(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    payload["report_section"] = {
        "title": "Stain augmentation at training time",
        "text": ("Two short trainings that differ only in `stain_jitter` (HED-space jitter of training images; 2 epochs on a "
                 "stratified 3,000-image subset of the PBC training split, ImageNet init), scored on the WBCAtt test subset "
                 f"({PER_CLASS} per class) clean and under the stain-shift corruption at severities 1-5. The corruption and the "
                 "augmentation are both HED-space perturbations, so this test favours the augmentation by construction; it says "
                 "nothing about real lab-to-lab differences. One seed per arm, no intervals."),
        "columns": ["stain_jitter", "metric", "clean F1", "stain 3 F1", "stain 5 F1", "mean stain F1", "stain CE"],
        "rows": rows,
        "caption": "Macro F1 (class: 5 WBCAtt classes; attr: mean over 11 attributes)",
    }
    write_json(out, payload)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["normalisation", "augmentation"])
    parser.add_argument("--checkpoint", type=Path, default=None, help="normalisation: checkpoint (default: shipped model)")
    parser.add_argument("--runs", type=Path, nargs="+", help="augmentation: the run folders to compare")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.study == "normalisation":
        normalisation(args.checkpoint, args.out or RESULTS / "stain_normalisation.json")
    else:
        if not args.runs:
            parser.error("augmentation needs --runs")
        augmentation(args.runs, args.out or RESULTS / "stain_augmentation.json")


if __name__ == "__main__":
    main()
