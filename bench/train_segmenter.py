"""Train the cell segmenter (TinyUNet of hemaclip.data.cells) out of sample, and write its training record.

By default it trains on the Zheng 2018 images of the *val* parts only (zheng1 and zheng2, the project's seeded
30/70 val/test split that the other-labs and onboarding studies use), so the test parts stay unseen and
bench/cell_finding_out_of_sample.py can score on them. Any folder pair of images and masks (0 background,
128 cytoplasm, 255 nucleus; same file names) can be given instead.

    nice -n 19 python -m bench.train_segmenter                          # Zheng val parts -> cache folder
    nice -n 19 python -m bench.train_segmenter --images DIR --masks DIR --out seg.pt --steps 500

The weights go to the cache folder (hemaclip.cache.cache_dir()/segmenter/) unless --out says otherwise; the
record (config, the images that trained it, loss curve, wall time, machine, command) is written beside them
as <weights>.json. Load the result with hemaclip.data.cells.load_model(path).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import date
from pathlib import Path

import torch

from bench.machine import machine_info

from hemaclip.cache import cache_dir
from hemaclip.data.datasets import load_dataset
from hemaclip.errors import HemaclipError
from hemaclip.io import write_json
from hemaclip.train.segmenter import MaskedImage, SegmenterTrainConfig, load_pair, pairs_from_folders, train_segmenter

ZHENG_SETS = ("zheng1", "zheng2")
TRAIN_SPLIT = "val"  # the Zheng sets have no train part; val is what a study may tune on, test is scored


def zheng_pairs(data_root: Path | None, split: str = TRAIN_SPLIT) -> tuple[list[MaskedImage], list[str]]:
    """The images (with masks) of one split of both Zheng sets, and their keys `<dataset>/<file>`."""
    pairs, keys = [], []
    for name in ZHENG_SETS:
        for record in load_dataset(name, data_root=data_root).split(split):
            pairs.append(load_pair(record.path, record.mask_path))
            keys.append(f"{name}/{Path(record.path).name}")
    return pairs, keys


def record_path(weights: Path) -> Path:
    """Where the training record of a weights file is written."""
    return weights.with_name(weights.name + ".json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="folder of training images (default: the Zheng val parts)")
    parser.add_argument("--masks", type=Path, help="folder of their masks, same file names (with --images)")
    parser.add_argument("--data", type=Path, help="data root holding zheng2018/ (default: $HEMACLIP_DATA or ../shared/data)")
    parser.add_argument("--out", type=Path, default=None, help="weights file (default: the cache folder)")
    parser.add_argument("--steps", type=int, default=SegmenterTrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=SegmenterTrainConfig.batch_size)
    parser.add_argument("--crop", type=int, default=SegmenterTrainConfig.crop)
    parser.add_argument("--seed", type=int, default=SegmenterTrainConfig.seed)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine one thread trained 3x faster per step than two)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        if (args.images is None) != (args.masks is None):
            raise HemaclipError("--images and --masks go together")
        config = SegmenterTrainConfig(steps=args.steps, batch_size=args.batch_size, crop=args.crop, seed=args.seed)
        if args.images is not None:
            pairs = pairs_from_folders(args.images, args.masks)
            keys, source = [p.name for p in pairs], f"{args.images} with masks {args.masks}"
        else:
            pairs, keys = zheng_pairs(args.data)
            source = f"Zheng 2018 {TRAIN_SPLIT} parts ({', '.join(ZHENG_SETS)}; seeded split of hemaclip.data.other_labs)"
        out = args.out or cache_dir() / "segmenter" / f"segmenter-zheng-{TRAIN_SPLIT}-seed{config.seed}.pt"
        print(f"training on {len(pairs)} images ({source}), {config.steps} steps", flush=True)
        record = train_segmenter(pairs, out, config, progress=lambda s, loss: print(f"step {s}: loss {loss:.4f}", flush=True))
    except HemaclipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    record.update({"what": "cell segmenter training record", "date": date.today().isoformat(), "source": source,
                   "images": keys,
                   "command": "python -m bench.train_segmenter " + shlex.join(argv if argv is not None else sys.argv[1:]),
                   "machine": machine_info()})
    write_json(record_path(Path(out)), record)
    print(f"{out} ({record['train_seconds']} s); record {record_path(Path(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
