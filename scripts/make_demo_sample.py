"""Choose the cells `hemaclip demo` ships for machines without data, and write them into the package.

Seeded: PER_CLASS cells of each of the 8 PBC classes, drawn from the `pbc` test split (never used for
training or any choice of the shipped model), re-encoded as JPEG no larger than MAX_SIDE px, written to
src/hemaclip/assets/demo_cells/<class>/<file>.jpg with manifest.csv (file, true class, source file,
WBCAtt attributes where annotated) and ATTRIBUTION.md (CC BY 4.0 asks for it). The folder is rebuilt
whole (written beside, then swapped in), and the script stops if the sample would exceed MAX_TOTAL_BYTES.

Usage: python scripts/make_demo_sample.py [--data DIR] [--seed 0] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from hemaclip.data.datasets import load_dataset
from hemaclip.data.embedded import ATTRIBUTION, ATTRIBUTION_NAME, MANIFEST_COLUMNS, MANIFEST_NAME, SAMPLE_FOLDER, SAMPLE_SPLIT
from hemaclip.data.paths import resolve_data_root
from hemaclip.errors import HemaclipError
from hemaclip.io import atomic_write

OUT = Path(__file__).resolve().parents[1] / "src" / "hemaclip" / "assets" / SAMPLE_FOLDER
PER_CLASS = 3
SEED = 0
MAX_SIDE = 192  # the bundled PBC copy is 192 px (originals 360 px); the shipped model reads 128 px
JPEG_QUALITY = 85
MAX_TOTAL_BYTES = 2**20  # the budget for the whole sample


def reencode(path: Path) -> bytes:
    """The image as RGB JPEG, its longer side at most MAX_SIDE (bicubic), without metadata."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if max(image.size) > MAX_SIDE:
            image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buffer.getvalue()


def choose(data: Path | None, seed: int, per_class: int) -> tuple[Path, list]:
    """`per_class` test records of each class, drawn by a seeded generator from the path-sorted split."""
    root = resolve_data_root(data)
    dataset = load_dataset("pbc", data_root=root)
    test = dataset.split(SAMPLE_SPLIT)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in dataset.classes:
        pool = sorted((r for r in test if r.label == label), key=lambda r: str(r.path))
        if len(pool) < per_class:
            raise HemaclipError(f"pbc {SAMPLE_SPLIT} split has {len(pool)} {label} cells, fewer than {per_class}")
        chosen.extend(pool[i] for i in sorted(rng.choice(len(pool), size=per_class, replace=False)))
    return root, chosen


def write_sample(root: Path, records: list, out: Path, seed: int) -> int:
    """Write images, manifest and attribution into a fresh folder beside `out`, then swap it in; total bytes."""
    staging = out.with_name(f".{out.name}.new")
    shutil.rmtree(staging, ignore_errors=True)
    rows, total = [], 0
    for record in records:
        data = reencode(record.path)
        relative = Path(record.label) / f"{record.path.stem}.jpg"
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(staging / relative, "wb") as handle:
            handle.write(data)
        total += len(data)
        attributes = record.attributes or {}
        rows.append({"file": relative.as_posix(), "label": record.label, "fine_label": record.fine_label or "",
                     "source": record.path.relative_to(root).as_posix(), **{a: attributes.get(a, "") for a in MANIFEST_COLUMNS[4:]}})
    if total > MAX_TOTAL_BYTES:
        shutil.rmtree(staging)
        raise HemaclipError(f"the sample would take {total} bytes, over the {MAX_TOTAL_BYTES} budget; lower MAX_SIDE or JPEG_QUALITY")
    with atomic_write(staging / MANIFEST_NAME, "w", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(staging / ATTRIBUTION_NAME, "w", encoding="utf-8") as handle:
        handle.write(
            f"# Embedded demo cells\n\n{ATTRIBUTION}\n\n"
            f"{len(rows)} cells ({PER_CLASS} per class) drawn with seed {seed} from hemaclip's `pbc` {SAMPLE_SPLIT} split by "
            f"`scripts/make_demo_sample.py`; re-encoded as JPEG (quality {JPEG_QUALITY}, at most {MAX_SIDE} px). "
            f"`{MANIFEST_NAME}` names each cell's true class and source file in the PBC dataset.\n"
        )
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="data root (default: as hemaclip resolves it)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    root, records = choose(args.data, args.seed, PER_CLASS)
    total = write_sample(root, records, args.out, args.seed)
    print(f"{args.out}: {len(records)} cells, {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
