"""Throughput of `hemaclip describe` on 1,000 real PBC images (shipped model, 128 px, default reference index).

Measured in one process, after the default reference index exists (its one-time build is timed
separately and reported, not counted):

* describe: `Describer.describe_paths` end to end (decode, model, calibrated read-outs, sentence,
  5 neighbours), the way the CLI runs it;
* baseline: bare embedding of the same files (decode + `image_outputs`), so the ratio shows what the
  description itself costs;
* a breakdown: decoding alone and the model alone on already-decoded arrays, and the model alone
  as loaded for training (no `prepare_for_inference`: BatchNorm folding and static "same" padding):
  the before/after of that speed-up.

Peak resident memory comes from `resource.getrusage` (the process's high-water mark, read after each
phase). Writes bench/results/describe_speed.json.
"""

from __future__ import annotations

import argparse
import resource
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.machine import machine_info

from hemaclip.data.datasets import load_dataset
from hemaclip.data.preprocess import decode_image
from hemaclip.io import write_json


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "describe_speed.json")
    args = parser.parse_args()

    from hemaclip.models.inference import image_outputs
    from hemaclip.tasks.describe import Describer
    from hemaclip.tasks.index import default_reference_index

    records = sorted(load_dataset("pbc").split("test"), key=lambda r: str(r.path))
    pick = np.random.default_rng(0).choice(len(records), size=args.n, replace=False)
    paths = [records[i].path for i in sorted(pick)]
    result: dict = {"what": f"hemaclip describe on {args.n} PBC test images (seeded sample), shipped model, 128 px",
                    "date": date.today().isoformat(), "n_images": args.n, "batch_size": args.batch_size,
                    "rss_mib_at_start": peak_rss_mib()}

    start = time.perf_counter()
    describer = Describer.from_checkpoint(None, index=None)
    result["load_model_seconds"] = round(time.perf_counter() - start, 2)
    from hemaclip.models.default import resolve_checkpoint

    start = time.perf_counter()
    describer.index = default_reference_index(describer.model, resolve_checkpoint(None), progress=False)
    result["reference_index_seconds"] = round(time.perf_counter() - start, 2)
    result["reference_index_size"] = len(describer.index)
    result["calibrated"] = describer.calibrated

    for p in paths:  # warm the OS file cache, so every timed pass reads from memory
        Path(p).read_bytes()
    list(describer.describe_paths(paths[: args.batch_size], batch_size=args.batch_size, progress=False))  # warm-up
    rss_before = peak_rss_mib()

    start = time.perf_counter()
    described = list(describer.describe_paths(paths, batch_size=args.batch_size, progress=False))
    describe_s = time.perf_counter() - start
    rss_describe = peak_rss_mib()  # before anything below holds all images at once
    errors = sum(d.error is not None for d in described)

    start = time.perf_counter()
    arrays = [describer.prepare(decode_image(p)) for p in paths]
    decode_s = time.perf_counter() - start
    stacked = np.stack(arrays)
    start = time.perf_counter()
    image_outputs(describer.model, stacked, batch_size=args.batch_size)
    model_s = time.perf_counter() - start
    # before/after of prepare_for_inference, which Describer.from_checkpoint applies (same arrays, same process)
    from hemaclip.models.checkpoint import load_checkpoint

    unprepared, _ = load_checkpoint(resolve_checkpoint(None))
    image_outputs(unprepared, stacked[: args.batch_size], batch_size=args.batch_size)  # warm-up
    start = time.perf_counter()
    image_outputs(unprepared, stacked, batch_size=args.batch_size)
    unprepared_s = time.perf_counter() - start
    del stacked, arrays, unprepared

    start = time.perf_counter()
    for i in range(0, len(paths), args.batch_size):
        batch = np.stack([describer.prepare(decode_image(p)) for p in paths[i : i + args.batch_size]])
        image_outputs(describer.model, batch, batch_size=args.batch_size)
    baseline_s = time.perf_counter() - start

    result.update({
        "describe_seconds": round(describe_s, 2),
        "describe_images_per_second": round(args.n / describe_s, 1),
        "baseline": "decode + resize + image_outputs (embedding and heads) of the same files, batch by batch",
        "baseline_seconds": round(baseline_s, 2),
        "baseline_images_per_second": round(args.n / baseline_s, 1),
        "describe_vs_baseline_throughput_ratio": round(baseline_s / describe_s, 3),
        "decode_only_images_per_second": round(args.n / decode_s, 1),
        "model_only_images_per_second": round(args.n / model_s, 1),
        "model_only_unprepared_images_per_second": round(args.n / unprepared_s, 1),
        "prepare_for_inference_speedup": round(unprepared_s / model_s, 3),
        "errors": errors,
        "peak_rss_mib_before_describe": rss_before,
        "peak_rss_mib_after_describe": rss_describe,
        "peak_rss_mib_end": peak_rss_mib(),
        "target_images_per_second": 100,
        "machine": machine_info(),
    })
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
