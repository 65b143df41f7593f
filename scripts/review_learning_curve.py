"""Make the committed learning curve `reports/review/learning-curve/`: other-lab macro F1 after 0/20/50/100
reviewed cells (LISC and Zheng datasets 1 and 2; reviewed cells from each lab's val part, scored on its test part).

    OMP_NUM_THREADS=2 python scripts/review_learning_curve.py [--checkpoint PATH] [--out DIR]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from hemaclip.cache import file_sha1
from hemaclip.log import setup_console
from hemaclip.models.default import resolve_checkpoint
from hemaclip_research.review_learning import learning_curve, write_learning_curve
from hemaclip.tasks.describe import Describer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("reports/review/learning-curve"))
    parser.add_argument("--datasets", nargs="+", default=["lisc", "zheng1", "zheng2"])
    args = parser.parse_args()
    setup_console()
    start = time.perf_counter()
    path = resolve_checkpoint(args.checkpoint)
    describer = Describer.from_checkpoint(path, index=None, data_root=args.data)
    results = [learning_curve(describer, name, data_root=args.data) for name in args.datasets]
    meta = {"checkpoint": path.name, "checkpoint_sha1": file_sha1(path), "calibrated": describer.calibrated,
            "seconds": round(time.perf_counter() - start, 1), "machine": platform.machine(), "command": "python scripts/review_learning_curve.py"}
    write_learning_curve(results, args.out, meta)
    print((args.out / "learning_curve.md").read_text())


if __name__ == "__main__":
    main()
