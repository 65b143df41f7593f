"""Fuzz hemaclip's input handling with many more cases than the test suite runs, and count outcomes.

  python -m bench.fuzz_inputs                 # -> bench/results/fuzz_inputs.json
  python -m bench.fuzz_inputs --scale 0.1     # a quick pass

Each case is a file handed to `decode_image` (random bytes behind real magic numbers, truncated and
bit-flipped real cell images, odd modes, EXIF orientations, decompression-bomb headers) or an
attributes CSV handed to the `folder` dataset loader (random combinations of mutations). Outcome:
`ok` (decoded to RGB / loaded), `clear_error` (a one-line DataError naming the file), `unclear_error`
(a DataError that is multi-line or does not name the file) or `crash` (any other exception).
A healthy result has zero `unclear_error` and zero `crash`.
"""

from __future__ import annotations

import argparse
import io
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

from bench.machine import machine_info

from hemaclip.data.attributes import ATTRIBUTE_NAMES, ATTRIBUTES
from hemaclip.data.datasets import load_dataset
from hemaclip.data.preprocess import decode_image
from hemaclip.data.paths import resolve_data_root
from hemaclip.errors import DataError
from hemaclip.io import write_json

MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF\x00\x00\x00\x00WEBP"]
JPEG_MAGIC = b"\xff\xd8"
MODES = ["L", "LA", "RGBA", "P", "1", "I;16", "I", "F", "CMYK", "YCbCr", "RGB"]
CASES = {"random_bytes": 600, "truncated": 300, "bit_flips": 400, "odd_modes": 200, "exif": 16, "bomb_headers": 12, "csv": 200}


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.examples: dict[str, list[str]] = defaultdict(list)

    def run(self, family: str, path: Path, fn) -> None:
        try:
            fn()
        except DataError as exc:
            message = str(exc)
            clear = "\n" not in message and (str(path) in message or path.name in message)
            self.counts[family]["clear_error" if clear else "unclear_error"] += 1
            if not clear and len(self.examples[family]) < 5:
                self.examples[family].append(f"unclear: {message[:300]}")
            return
        except Exception as exc:  # noqa: BLE001 - counting crashes is the point
            self.counts[family]["crash"] += 1
            if len(self.examples[family]) < 5:
                self.examples[family].append(f"crash: {type(exc).__name__}: {exc} | {traceback.format_exc(limit=2)[-300:]}")
            return
        self.counts[family]["ok"] += 1


def _decode(path: Path) -> None:
    image = decode_image(path)
    assert image.mode == "RGB", image.mode


def _real_images(n: int) -> list[bytes]:
    root = resolve_data_root(None) / "PBC_dataset_normal_DIB"
    paths = sorted(root.glob("*/*.jpg"))[:: max(1, 17000 // max(n, 1))][:n]
    out = []
    for p in paths:
        data = p.read_bytes()
        out.append(data)
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _suffix(data: bytes) -> str:
    return "jpg" if data[:2] == JPEG_MAGIC else "png"


def _bomb(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF)
    return bytes(data)


def image_cases(tally: Tally, work: Path, rng: np.random.Generator, scale: float) -> None:
    n = {k: max(1, int(v * scale)) for k, v in CASES.items()}
    for i in range(n["random_bytes"]):
        path = work / f"random_{i}.img"
        path.write_bytes(MAGIC[i % len(MAGIC)] + rng.integers(0, 256, int(rng.integers(0, 4000)), dtype=np.uint8).tobytes())
        tally.run("random_bytes", path, lambda: _decode(path))
    real = _real_images(10)
    for i in range(n["truncated"]):
        data = real[i % len(real)]
        path = work / f"truncated_{i}.{_suffix(data)}"
        path.write_bytes(data[: int(len(data) * rng.uniform(0.0, 0.999))])
        tally.run("truncated", path, lambda: _decode(path))
    for i in range(n["bit_flips"]):
        data = bytearray(real[i % len(real)])
        for _ in range(int(rng.integers(1, 20))):
            pos = int(rng.integers(0, len(data)))
            data[pos] ^= 1 << int(rng.integers(0, 8))
        path = work / f"flipped_{i}.{_suffix(bytes(data))}"
        path.write_bytes(bytes(data))
        tally.run("bit_flips", path, lambda: _decode(path))
    for i in range(n["odd_modes"]):
        mode = MODES[i % len(MODES)]
        w, h = (int(v) for v in rng.integers(1, 300, 2))
        if mode == "I;16":
            image = Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16))
        elif mode == "F":
            image = Image.fromarray(rng.normal(size=(h, w)).astype(np.float32))
        else:
            image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
        suffix = ".tif" if mode in ("I", "F", "CMYK", "YCbCr") else ".png"
        path = work / f"mode_{i}{suffix}"
        image.save(path)
        tally.run("odd_modes", path, lambda: _decode(path))
    for i in range(n["exif"]):
        image = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
        exif = Image.Exif()
        exif[0x0112] = int(i % 10)  # 0 and 9 are invalid orientations
        path = work / f"exif_{i}.jpg"
        image.save(path, format="JPEG", exif=exif.tobytes())
        tally.run("exif", path, lambda: _decode(path))
    for i in range(n["bomb_headers"]):
        side = int(rng.integers(8_000, 200_000))
        path = work / f"bomb_{i}.png"
        path.write_bytes(_bomb(side, side))
        tally.run("bomb_headers", path, lambda: _decode(path))
    empty = work / "empty.jpg"
    empty.write_bytes(b"")
    tally.run("empty", empty, lambda: _decode(empty))


def csv_cases(tally: Tally, work: Path, rng: np.random.Generator, scale: float) -> None:
    root = work / "folder"
    for k, cls in enumerate(("lymphocyte", "neutrophil")):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / cls / f"{cls}_{i}.png")
    names = sorted(p.name for p in root.rglob("*.png"))
    for case in range(max(1, int(CASES["csv"] * scale))):
        header = ["img_name", *ATTRIBUTE_NAMES]
        rows = [[n, *[ATTRIBUTES[a][(i + j) % len(ATTRIBUTES[a])] for j, a in enumerate(ATTRIBUTE_NAMES)]] for i, n in enumerate(names)]
        for _ in range(int(rng.integers(0, 4))):
            kind = rng.choice(["extra_col", "drop_col", "bad_value", "nan", "empty", "extra_field", "short_row", "dup_header",
                               "quote", "unknown_image", "shuffle_cols"])
            r = int(rng.integers(0, len(rows)))
            if kind == "extra_col":
                header.append(f"x{case}")
                rows = [row + ["1"] for row in rows]
            elif kind == "drop_col" and len(header) > 2:
                c = int(rng.integers(0, len(header)))
                header.pop(c)
                rows = [row[:c] + row[c + 1 :] for row in rows]
            elif kind in ("bad_value", "nan", "empty") and len(rows[r]) > 1:
                rows[r][int(rng.integers(1, len(rows[r])))] = {"bad_value": "zzz", "nan": "NaN", "empty": ""}[kind]
            elif kind == "extra_field":
                rows[r].append("surprise")
            elif kind == "short_row":
                rows[r] = rows[r][: int(rng.integers(0, len(rows[r])))]
            elif kind == "dup_header":
                header.append(header[1])
                rows = [row + [row[1] if len(row) > 1 else ""] for row in rows]
            elif kind == "quote":
                rows[r][0] = '"' + rows[r][0]
            elif kind == "unknown_image":
                rows[r][0] = "absent.png"
            elif kind == "shuffle_cols":
                order = rng.permutation(len(header))
                header = [header[i] for i in order]
                rows = [[row[i] if i < len(row) else "" for i in order] for row in rows]
        text = "\n".join(",".join(row) for row in [header, *rows]) + "\n"
        data = text.encode("utf-8")
        if rng.random() < 0.2:
            data = b"\xef\xbb\xbf" + data
        if rng.random() < 0.05:
            data += b"\xff\xfe"
        path = root / "attributes.csv"
        path.write_bytes(data)
        tally.run("attribute_csv", path, lambda: load_dataset("folder", folder=root))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the number of cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fuzz_inputs.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    tally = Tally()
    with tempfile.TemporaryDirectory(prefix="hemaclip-fuzz-") as tmp:
        image_cases(tally, Path(tmp), rng, args.scale)
        csv_cases(tally, Path(tmp), rng, args.scale)
    totals = Counter()
    for counts in tally.counts.values():
        totals.update(counts)
    payload = {
        "what": "bad-input fuzzing of image decoding and attribute-CSV parsing (outcome counts)",
        "date": str(date.today()),
        "command": f"python -m bench.fuzz_inputs --scale {args.scale} --seed {args.seed}",
        "outcomes": {k: dict(v) for k, v in sorted(tally.counts.items())},
        "totals": dict(totals),
        "problem_examples": dict(tally.examples),
        "machine": machine_info(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(args.out, payload)
    print({k: dict(v) for k, v in sorted(tally.counts.items())})
    print(f"totals {dict(totals)}; wrote {args.out}")
    if totals.get("crash") or totals.get("unclear_error"):
        sys.exit(1)


if __name__ == "__main__":
    main()
