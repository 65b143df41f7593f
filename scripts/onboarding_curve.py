"""Make the committed onboarding learning curve `reports/other-labs/onboarding/` (issue 26's headline report).

    OMP_NUM_THREADS=2 python scripts/onboarding_curve.py [--checkpoint PATH] [--out DIR] [--datasets lisc zheng1 zheng2]

Features of every val/test cell (model embedding and frozen DINOv2 ViT-S/14) are computed once with the code
`hemaclip lab add` uses and cached under the hemaclip cache; the protocol is in hemaclip_research.onboarding.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

from hemaclip.cache import cache_dir, file_sha1
from hemaclip.log import setup_console
from hemaclip.models.default import resolve_checkpoint
from hemaclip_research.onboarding import onboarding_curve, write_onboarding
from hemaclip.tasks.describe import Describer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("reports/other-labs/onboarding"))
    parser.add_argument("--datasets", nargs="+", default=["lisc", "zheng1", "zheng2"])
    parser.add_argument("--from-json", action="store_true", help="Re-write the report from OUT/onboarding.json (no recomputation).")
    args = parser.parse_args()
    setup_console()
    if args.from_json:
        import json

        payload = json.loads((args.out / "onboarding.json").read_text())
        write_onboarding(list(payload["labs"].values()), args.out, payload["meta"])
        return
    start = time.perf_counter()
    path = resolve_checkpoint(args.checkpoint)
    sha1 = file_sha1(path)
    describer = Describer.from_checkpoint(path, index=None, data_root=args.data)
    results = []
    for name in args.datasets:
        cache = cache_dir() / "onboarding" / f"{name}-{sha1[:12]}-model-dinov2.npz"
        cache.parent.mkdir(parents=True, exist_ok=True)
        results.append(onboarding_curve(describer, name, data_root=args.data, cache=cache))
        print(f"{name} done after {time.perf_counter() - start:.0f} s", flush=True)
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    meta = {"checkpoint": path.name, "checkpoint_sha1": sha1, "git_sha": git, "seconds": round(time.perf_counter() - start, 1),
            "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "command": "python scripts/onboarding_curve.py",
            "date": time.strftime("%Y-%m-%d")}
    write_onboarding(results, args.out, meta)
    print((args.out / "onboarding.md").read_text())


if __name__ == "__main__":
    main()
