"""Make the committed example reviews under `reports/review/`: 200 mixed PBC test cells and 200 LISC test crops
(another lab), reviewed by the shipped model, with the true labels' differential beside the model's.

    OMP_NUM_THREADS=2 python scripts/review_examples.py [--checkpoint PATH]

Each folder is a seeded random sample of the dataset's test part, linked into runs/review-examples/NAME/ (a flat
folder, as a lab's export); the review itself goes to runs/review-examples/NAME-review/ (its review.sqlite stays
there: `hemaclip serve --review runs/review-examples/pbc-test-200-review`), and report.html, review.json and
cells.csv are copied to reports/review/NAME/, with truth.json: the differential of the true labels (Wilson
intervals) and the model's agreement with them.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np

from hemaclip.cache import file_sha1
from hemaclip.data.datasets import load_dataset
from hemaclip.io import write_json
from hemaclip.log import setup_console
from hemaclip.metrics.classification import macro_f1
from hemaclip.metrics.statistics import share_intervals
from hemaclip.models.default import resolve_checkpoint
from hemaclip.tasks.describe import Describer
from hemaclip.tasks.review import ReviewSettings, review_folder, write_review_reports

EXAMPLES = (("pbc-test-200", "pbc"), ("lisc-test-200", "lisc"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--work", type=Path, default=Path("runs/review-examples"))
    parser.add_argument("--out", type=Path, default=Path("reports/review"))
    args = parser.parse_args()
    setup_console()
    path = resolve_checkpoint(args.checkpoint)
    describer = Describer.from_checkpoint(path, index=None)
    settings = ReviewSettings()
    for name, dataset in EXAMPLES:
        test = sorted(load_dataset(dataset).split("test"), key=lambda r: str(r.path))
        pick = sorted(np.random.default_rng(0).choice(len(test), size=min(args.n, len(test)), replace=False))
        folder = args.work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        truth = {}
        for i in pick:
            record = test[i]
            link = folder / f"{record.label}_{Path(record.path).name}" if dataset == "lisc" else folder / Path(record.path).name
            os.symlink(Path(record.path).resolve(), link)
            truth[link.name] = record.label
        review = args.work / f"{name}-review"
        shutil.rmtree(review, ignore_errors=True)
        store = review_folder(describer, file_sha1(path), [folder], review, settings=settings, progress=True)
        summary = write_review_reports(store, review)
        cells = store.cells()
        store.close()
        target = args.out / name
        target.mkdir(parents=True, exist_ok=True)
        for item in ("report.html", "review.json", "cells.csv"):
            shutil.copy(review / item, target / item)
        y_true = [truth[Path(c["source"]).name] for c in cells]
        y_pred = [c["label"] for c in cells]
        counted = Counter(t for t in y_true if t not in settings.outside_differential)
        write_json(target / "truth.json", {
            "dataset": dataset, "split": "test", "cells": len(cells), "seed": 0,
            "true_differential": share_intervals({c: counted.get(c, 0) for c in summary["differential"]}),
            "model_differential": summary["differential"],
            "accuracy": float(np.mean([a == b for a, b in zip(y_true, y_pred)])),
            "macro_f1": macro_f1(y_true, y_pred, sorted(set(y_true))),
            "wrong_in_first_20_of_queue": sum(1 for q in summary["queue"][:20] if truth[Path(q["source"]).name] != q["model_label"]),
            "wrong_overall": sum(1 for a, b in zip(y_true, y_pred) if a != b),
        })
        print(name, (target / "truth.json").read_text())


if __name__ == "__main__":
    main()
