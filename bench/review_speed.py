"""Speed of `hemaclip review` on 1,000 real PBC cells, beside `describe` on the same cells (the baseline).

Measured in one process on the seeded sample of bench/describe_speed.py (1,000 PBC test images), shipped model:

* baseline: `Describer.describe_paths` over the files (decode, model, calibrated read-outs, sentence; no
  neighbours, as review runs it);
* review: `review_folder` + `write_review_reports` into a fresh folder (hashing every file, describing,
  thumbnails, SQLite commits per batch, review.json, cells.csv and the self-contained report.html);
* resume: the same review again (every file already in the store: only hashing and the reports);
* the command as a user runs it: `hemaclip review FOLDER --out DIR` in a subprocess, model loading and
  Python start-up included (wall clock).

The load average of the machine is recorded beside the times (the project machines are shared), and so is the
CPU time each phase used (all threads of the process), which does not grow when other jobs share the cores: on
a quiet 2-core machine a phase takes at least half its CPU time and at most all of it.
Writes bench/results/review_speed.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.machine import machine_info

from hemaclip.data.datasets import load_dataset
from hemaclip.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "review_speed.json")
    parser.add_argument("--no-cli", action="store_true", help="skip the subprocess run of the command")
    args = parser.parse_args()

    from hemaclip.cache import file_sha1
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.tasks.describe import Describer
    from hemaclip.tasks.review import review_folder, write_review_reports

    records = sorted(load_dataset("pbc").split("test"), key=lambda r: str(r.path))
    pick = np.random.default_rng(0).choice(len(records), size=args.n, replace=False)
    paths = [records[i].path for i in sorted(pick)]
    work = Path(tempfile.mkdtemp(prefix="review-speed-"))
    folder = work / "cells"
    folder.mkdir()
    for p in paths:  # one flat folder, as a lab's export; links keep the files' bytes and hashes
        os.symlink(Path(p).resolve(), folder / Path(p).name)
        Path(p).read_bytes()  # warm the OS file cache
    result: dict = {"what": f"hemaclip review of {args.n} PBC test images (seeded sample of describe_speed) beside describe",
                    "date": date.today().isoformat(), "n_images": args.n, "load_average_at_start": os.getloadavg()}
    checkpoint = resolve_checkpoint(None)
    describer = Describer.from_checkpoint(checkpoint, index=None)
    sha1 = file_sha1(checkpoint)
    list(describer.describe_paths(paths[:64], progress=False))  # warm-up

    start, cpu = time.perf_counter(), time.process_time()
    described = list(describer.describe_paths(sorted(folder.iterdir()), progress=False))
    describe_s, describe_cpu = time.perf_counter() - start, time.process_time() - cpu

    start, cpu = time.perf_counter(), time.process_time()
    store = review_folder(describer, sha1, [folder], work / "review", progress=False)
    summary = write_review_reports(store, work / "review")
    review_s, review_cpu = time.perf_counter() - start, time.process_time() - cpu
    store.close()

    start = time.perf_counter()
    store = review_folder(describer, sha1, [folder], work / "review", progress=False)
    write_review_reports(store, work / "review")
    resume_s = time.perf_counter() - start
    described_again = store.meta()["described_now"]
    store.close()

    result.update({
        "cells": summary["cells"], "describe_errors": sum(d.error is not None for d in described),
        "baseline": "Describer.describe_paths over the same files (no neighbours), in the same process",
        "describe_seconds": round(describe_s, 2),
        "review_seconds": round(review_s, 2),
        "review_vs_describe_time_ratio": round(review_s / describe_s, 3),
        "describe_cpu_seconds": round(describe_cpu, 2), "review_cpu_seconds": round(review_cpu, 2),
        "review_vs_describe_cpu_ratio": round(review_cpu / describe_cpu, 3),
        "review_cells_per_second": round(summary["cells"] / review_s, 1),
        "resume_seconds": round(resume_s, 2), "resume_described_again": described_again,
        "report_html_mib": round((work / "review" / "report.html").stat().st_size / 2**20, 2),
        "store_mib": round((work / "review" / "review.sqlite").stat().st_size / 2**20, 2),
    })
    if not args.no_cli:
        cli = Path(sys.executable).with_name("hemaclip")
        command = [str(cli)] if cli.is_file() else [sys.executable, "-m", "hemaclip.cli"]
        import resource

        start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([*command, "review", str(folder), "--out", str(work / "cli")], capture_output=True, text=True)
        result["command_seconds"] = round(time.perf_counter() - start, 2)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        result["command_cpu_seconds"] = round(after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime, 2)
        result["command_exit_status"] = done.returncode
        result["command"] = "hemaclip review FOLDER --out DIR (fresh folder; Python start-up and model loading included)"
    result["target_seconds"] = 60
    result["meets_target"] = bool(result.get("command_seconds", review_s) < 60)
    result["load_average_at_end"] = os.getloadavg()
    result["machine"] = machine_info()
    write_json(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
