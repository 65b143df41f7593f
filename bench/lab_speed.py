"""How long onboarding a lab takes on this machine: `lab fit` on 100 labelled source cells, and `describe --lab`
beside plain `describe` on the same files (the ratio is the lab read-out's cost).

* fit: :func:`hemaclip.tasks.lab.fit_lab` on LISC (a `lab add --labels-from-folders --budget 100` profile built from
  its val+test crops), each recipe (towers ``model`` and ``model,dinov2`` with `--no-fine-tune`, and ``model`` with
  `lab fit`'s default fine-tune, :func:`hemaclip.tasks.lab.fine_tune_lab`: PBC reference cells read, 150 steps, every
  cell of the profile read again), the cross-validated choice of penalty, prior weight and temperature included;
* read: `Describer.describe_paths` over 300 LISC crops without a lab, with a ``model`` lab and with a
  ``model,dinov2`` lab (DINOv2 decodes each file again at 224 px), in one process, no reference index.

Writes bench/results/lab_speed.json.   python -m bench.lab_speed
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date
from pathlib import Path

from bench.machine import machine_info

from hemaclip.io import write_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-read", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lab_speed.json")
    args = parser.parse_args()

    from hemaclip.cache import file_sha1
    from hemaclip.data.datasets import load_dataset
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.tasks.describe import Describer
    from hemaclip.tasks.lab import add_lab, fine_tune_lab, fit_lab, lab_reader

    path = resolve_checkpoint(None)
    describer = Describer.from_checkpoint(path, index=None)
    records = [r for r in load_dataset("lisc").records if r.split in ("val", "test")]
    result: dict = {"what": __doc__.splitlines()[0], "date": date.today().isoformat(), "machine": machine_info(),
                    "command": "python -m bench.lab_speed", "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "lisc"
        for r in records:  # ROOT/<class>/<image>, as a lab's labelled archive
            target = folder / r.label / Path(r.path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(Path(r.path).resolve())
        files = sorted(folder.rglob("*.jpg"))[: args.n_read]
        start = time.perf_counter()
        plain = sum(1 for d in describer.describe_paths(files) if d.error is None)
        plain_s = time.perf_counter() - start
        result["describe_plain"] = {"cells": plain, "seconds": round(plain_s, 2), "cells_per_s": round(plain / plain_s, 1)}
        for towers, fine_tune in ((("model",), False), (("model", "dinov2"), False), (("model",), True)):
            name = "+".join(towers) + (", fine-tuned" if fine_tune else "")
            start = time.perf_counter()
            profile = add_lab(describer, file_sha1(path), f"lab{len(result['recipes'])}", folder, labs=Path(tmp) / "labs",
                              budget=100, towers=towers, labels_from_folders=True)
            add_s = time.perf_counter() - start
            start = time.perf_counter()
            if fine_tune:
                fine_tune_lab(profile, path)
            _head, summary = fit_lab(profile)
            fit_s = time.perf_counter() - start
            reader = Describer.from_checkpoint(profile.model_file, index=None) if fine_tune else describer
            reader.use_lab(lab_reader(profile, reader), profile.name)
            start = time.perf_counter()
            read = sum(1 for d in reader.describe_paths(files) if d.error is None)
            read_s = time.perf_counter() - start
            reader.use_lab(None)
            result["recipes"][name] = {
                "lab_add": {"cells": profile.meta["cells"], "seconds": round(add_s, 1)},
                "lab_fit": {"labelled_cells": summary["labelled_cells"], "source_cells": summary["source_cells"],
                            "seconds": round(fit_s, 2), "read_out_seconds": summary["fit_seconds"]},
                "describe_lab": {"cells": read, "seconds": round(read_s, 2), "cells_per_s": round(read / read_s, 1),
                                 "ratio_to_plain": round((read / read_s) / (plain / plain_s), 3)}}
            print(name, result["recipes"][name], flush=True)
    write_json(args.out, result)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
