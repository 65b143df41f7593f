"""Size and contents of the wheel `pip install .` would install, built from the working tree.

The working tree's files that git knows or would add (tracked plus untracked-but-not-ignored, as a clone
would hold them, so reports/, bench/ and tests/ are there to be left out) are copied into a temporary
folder and built there with `pip wheel --no-deps --no-build-isolation` (setuptools from this environment;
no network, and nothing written into the shared tree). Records the wheel's size, its largest files, any
entry under a folder a wheel must not carry (FORBIDDEN), and any image file (the package carries no data: cells
are read from the data folder, never shipped).

Writes bench/results/wheel_size.json (or --out); --wheel-dir keeps the wheel for a later install.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import date
from pathlib import Path

from hemaclip.io import write_json

REPO = Path(__file__).resolve().parents[1]
# Top-level folders of the repository that must never be installed with the package.
FORBIDDEN = ("reports/", "bench/", "tests/", "scripts/", "docs/", "runs/", "demo-output/")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
PAGE_ASSETS = "hemaclip/serve/static/"  # the web page's own files (icons), not data
LARGEST = 8


def copy_tree(repo: Path, dest: Path) -> int:
    """Copy the files a clone of `repo` plus its untracked, not-ignored files would hold; count them."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.decode().split("\0")
    copied = 0
    for name in filter(None, listed):
        source = repo / name
        if not source.is_file():  # deleted in the working tree but still in the index
            continue
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest / name)
        copied += 1
    return copied


def build_wheel(repo: Path, wheel_dir: Path) -> Path:
    """Build the wheel of `repo`'s working tree into `wheel_dir`; its path."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hemaclip-wheel-src-") as tmp:
        source = Path(tmp) / "hemaclip"
        copy_tree(repo, source)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                        "--wheel-dir", str(wheel_dir), str(source)], check=True)
    wheels = sorted(wheel_dir.glob("hemaclip-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise SystemExit(f"pip wheel wrote no hemaclip wheel into {wheel_dir}")
    return wheels[-1]


def wheel_contents(wheel: Path) -> dict:
    """What the wheel holds: entries, sizes, anything under FORBIDDEN, and image files outside the page's assets."""
    with zipfile.ZipFile(wheel) as archive:
        infos = archive.infolist()
    names = [i.filename for i in infos]
    largest = sorted(infos, key=lambda i: i.file_size, reverse=True)[:LARGEST]
    return {
        "files": len(infos),
        "unpacked_bytes": sum(i.file_size for i in infos),
        "top_level": sorted({n.split("/", 1)[0] for n in names}),
        "largest_files": [{"name": i.filename, "bytes": i.file_size, "compressed_bytes": i.compress_size} for i in largest],
        "image_files": [n for n in names if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(PAGE_ASSETS)],
        "forbidden_entries": [n for n in names if n.startswith(FORBIDDEN) or any(f"/{f}" in n for f in ("tests/", "reports/", "bench/"))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "wheel_size.json")
    parser.add_argument("--wheel-dir", type=Path, default=None, help="keep the wheel here (default: a temporary folder)")
    args = parser.parse_args()
    from bench.machine import machine_info  # imports torch: only when run, not when a test imports the builder

    with tempfile.TemporaryDirectory(prefix="hemaclip-wheel-") as tmp:
        started = time.perf_counter()
        wheel = build_wheel(REPO, args.wheel_dir or Path(tmp))
        seconds = time.perf_counter() - started
        result = {
            "date": date.today().isoformat(),
            "machine": machine_info(),
            "wheel": wheel.name,
            "wheel_bytes": wheel.stat().st_size,
            "wheel_mib": round(wheel.stat().st_size / 2**20, 2),
            "build_seconds": round(seconds, 1),
            **wheel_contents(wheel),
        }
    write_json(args.out, result)
    print(f"{result['wheel']}: {result['wheel_mib']} MiB ({result['files']} files; image files: {len(result['image_files'])}); "
          f"forbidden entries: {len(result['forbidden_entries'])}; built in {result['build_seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
