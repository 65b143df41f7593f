"""Cell finding against the Zheng 2018 expert masks: white-cell box IoU, share of images with IoU >= 0.8, speed.

For every Zheng image (300 Tecom 120 px crops, 100 CellaVision 300 px crops) the primary cell that
`hemaclip.data.cells` finds (the one `describe` frames) is compared with the bounding box of the expert mask
(nucleus + cytoplasm). Baseline in the same run: the whole picture taken as the cell's box (what a reader
without cell finding frames), so the ratio shows what finding adds.

CAVEAT, stated in the JSON: the shipped segmenter was trained on these same masks (all 400 images), so these are
in-sample numbers. A segmenter trained on the val parts only (bench/train_segmenter.py) is scored on the test
parts by bench/cell_finding_out_of_sample.py. `cross_validation` below is an older development run's 5-fold CV
by image, kept with its date; its scratch scripts were never committed.

Writes bench/results/cell_finding.json.
"""

from __future__ import annotations

import argparse
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.machine import machine_info

from hemaclip.data.cells import TinyUNet, find_cells, primary_cell, segmenter_id
from hemaclip.data.datasets import load_dataset
from hemaclip.data.other_labs import load_mask
from hemaclip.data.preprocess import decode_image
from hemaclip.io import write_json

# 5-fold cross-validation by image of the same U-Net recipe (development run of 2026-12-01, scratch scripts
# train_segmenter.py / eval_segmenter.py; not in the repository): share of images with box IoU >= 0.8.
CROSS_VALIDATION = {
    "date": "2026-12-01", "protocol": "5-fold CV by image over the 400 Zheng images, automatic scale (two passes)",
    "share_box_iou_ge_0_8": {"zheng1 (Tecom)": 0.9667, "zheng2 (CellaVision)": 0.46, "all": 0.84},
    "mean_box_iou": {"zheng1 (Tecom)": 0.9406, "zheng2 (CellaVision)": 0.7753, "all": 0.8993},
    "cross_lab (train on one dataset, test on the other)": {"share_box_iou_ge_0_8_all": 0.4475},
}


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask > 0)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def score_records(records: list, name: str, model: TinyUNet | None = None) -> list[dict]:
    """Per image of `records` (with mask_path): box IoU of the primary cell found against the expert mask's box,
    the whole-picture baseline, cells found and seconds. `model` None is the shipped segmenter."""
    rows = []
    for record in records:
        image = np.asarray(decode_image(record.path))
        truth = mask_box(load_mask(record.mask_path))
        start = time.perf_counter()
        cells = find_cells(image, model=model)
        seconds = time.perf_counter() - start
        cell = primary_cell(cells, image.shape[:2])
        found = tuple(int(v) for v in cell.box) if cell is not None else None
        whole = (0, 0, image.shape[1], image.shape[0])
        rows.append({"dataset": name, "image": Path(record.path).name, "iou": box_iou(found, truth) if found else 0.0,
                     "whole_iou": box_iou(whole, truth), "found": found is not None, "cells": len(cells), "seconds": seconds})
    return rows


def summarise(rows: list[dict], names: tuple[str, ...] = ("zheng1", "zheng2", "all")) -> dict:
    """The per-dataset figures of `rows` (from score_records): share of images with IoU >= 0.8, mean IoU, baselines."""
    out = {}
    for name in names:
        part = [r for r in rows if name == "all" or r["dataset"] == name]
        iou = np.array([r["iou"] for r in part])
        whole = np.array([r["whole_iou"] for r in part])
        out[name] = {
            "images": len(part), "share_box_iou_ge_0_8": float(np.mean(iou >= 0.8)), "mean_box_iou": float(iou.mean()),
            "baseline_whole_picture_share_ge_0_8": float(np.mean(whole >= 0.8)), "baseline_whole_picture_mean_iou": float(whole.mean()),
            "ratio_mean_iou_vs_whole_picture": float(iou.mean() / whole.mean()),
            "share_no_cell_found": float(np.mean([not r["found"] for r in part])),
            "share_several_cells_found": float(np.mean([r["cells"] > 1 for r in part])),
            "ms_per_image": float(1000 * np.mean([r["seconds"] for r in part])),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cell_finding.json")
    args = parser.parse_args()
    rows = [row for name in ("zheng1", "zheng2") for row in score_records(load_dataset(name).records, name)]
    result = {"what": "white-cell box IoU of cell finding against the Zheng 2018 expert masks (in-sample: the segmenter "
                      "was trained on these masks)", "date": str(date.today()), "segmenter": segmenter_id(),
              "machine": machine_info(), "cross_validation": CROSS_VALIDATION, "per_dataset": summarise(rows)}
    write_json(args.out, result)
    for name, block in result["per_dataset"].items():
        print(name, {k: round(v, 3) for k, v in block.items()})


if __name__ == "__main__":
    main()
