"""Before/after measurements of the hot-path speed-ups hemaclip relies on, each pair in the same process.

Every row times the same work twice, once the plain way ("before") and once the way hemaclip does it
("after"), so the ratio carries meaning on any machine:

- image loading: decoding JPEGs with PIL on every pass vs the decoded-image cache (memory-mapped uint8);
- image loading with a DataLoader: 0 vs 2 worker processes for the decoding path (no cache);
- channels-last memory format for the image tower (inference and a training step);
- torch.compile of the image tower for inference (compile time reported separately);
- text prompts: embedding the zero-shot prompt sets with the text tower on every call vs the per-tower
  feature cache (memory and disk).

Writes bench/results/speedups.json (or --out).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from bench.machine import machine_info

from hemaclip.data.attributes import ATTRIBUTES
from hemaclip.data.datasets import load_dataset
from hemaclip.data.image_cache import decoded_images
from hemaclip.data.preprocess import decode_image
from hemaclip.io import write_json
from hemaclip.models.checkpoint import load_checkpoint
from hemaclip.models.default import resolve_checkpoint
from hemaclip.models.inference import image_outputs
from hemaclip.models.text_cache import PooledTextCache
from hemaclip.models.zero_shot import build_zero_shot_classifier
from hemaclip.text.prompts import load_prompts


def _best_of(fn: Callable[[], object], repeats: int) -> float:
    """Smallest wall time of `repeats` calls after one untimed warm-up: the least noisy estimate on a shared machine."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _row(what: str, unit_count: int, unit: str, before: float, after: float, note: str = "") -> dict:
    return {
        "what": what,
        f"{unit}_per_s_before": round(unit_count / before, 1),
        f"{unit}_per_s_after": round(unit_count / after, 1),
        "seconds_before": round(before, 3),
        "seconds_after": round(after, 3),
        "speedup": round(before / after, 2),
        "note": note,
    }


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = decode_image(self.paths[i]).resize((self.size, self.size))
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


def image_loading(paths: list[Path], size: int, repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        decoded_images(paths, size, directory=cache, progress=False)  # build once (counted separately below)
        start = time.perf_counter()
        decoded_images(paths, size, directory=Path(tmp) / "fresh", progress=False)
        build_seconds = time.perf_counter() - start

        def decode_every_pass() -> None:
            for p in paths:
                np.asarray(decode_image(p).resize((size, size)), dtype=np.uint8)

        def cached_pass() -> None:
            images = decoded_images(paths, size, directory=cache, progress=False)
            np.asarray(images).sum()  # touch every byte, as an epoch would

        before = _best_of(decode_every_pass, repeats)
        after = _best_of(cached_pass, repeats)
    rows = [_row("one pass over the images: PIL decode every pass -> decoded-image cache", len(paths), "images", before, after,
                 f"one-time cache build {build_seconds:.2f} s for {len(paths)} images")]

    def loader_pass(workers: int) -> Callable[[], None]:
        def run() -> None:
            loader = torch.utils.data.DataLoader(_DecodeDataset(paths, size), batch_size=64, num_workers=workers)
            for _ in loader:
                pass
        return run

    rows.append(_row("decode through a DataLoader: 0 -> 2 worker processes", len(paths), "images",
                     _best_of(loader_pass(0), repeats), _best_of(loader_pass(2), repeats)))
    return rows


def memory_format(model: torch.nn.Module, size: int, batch: int, repeats: int) -> list[dict]:
    images = torch.randn(batch, 3, size, size)
    rows = []
    model.eval()
    with torch.no_grad():
        contiguous = _best_of(lambda: model.encode_image(images.contiguous()), repeats)
        model.to(memory_format=torch.channels_last)
        channels_last = _best_of(lambda: model.encode_image(images.contiguous(memory_format=torch.channels_last)), repeats)
        model.to(memory_format=torch.contiguous_format)
    rows.append(_row(f"image-tower inference, batch {batch}: contiguous -> channels-last", batch * 1, "images", contiguous, channels_last))

    head = torch.nn.Linear(model.visual.num_features, 8)
    params = [p for p in model.visual.trunk.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-4)
    labels = torch.randint(0, 8, (batch,))
    model.train()

    def step(fmt: torch.memory_format) -> Callable[[], None]:
        x = images.contiguous(memory_format=fmt)

        def run() -> None:
            loss = F.cross_entropy(head(model.visual.trunk(x)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return run

    contiguous = _best_of(step(torch.contiguous_format), repeats)
    model.to(memory_format=torch.channels_last)
    channels_last = _best_of(step(torch.channels_last), repeats)
    model.to(memory_format=torch.contiguous_format)
    model.eval()
    rows.append(_row(f"image-tower training step, batch {batch}: contiguous -> channels-last", batch, "images", contiguous, channels_last))
    return rows


def compiled_inference(model: torch.nn.Module, size: int, batch: int, repeats: int) -> dict:
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    model.eval().to(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = _best_of(lambda: model.encode_image(images), repeats)
        try:
            compiled = torch.compile(model.visual)
            start = time.perf_counter()
            compiled(images)
            compile_seconds = time.perf_counter() - start
            after = _best_of(lambda: compiled(images), repeats)
        except Exception as exc:  # compile needs a working C++ toolchain; record why it did not run
            return {"what": "torch.compile of the image tower (inference)", "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    row = _row(f"image-tower inference, batch {batch}: eager -> torch.compile", batch, "images", eager, after,
               f"first call (compilation) {compile_seconds:.1f} s")
    row["compile_seconds"] = round(compile_seconds, 1)
    return row


def prompt_embedding(model: torch.nn.Module, repeats: int) -> dict:
    prompts = load_prompts()
    attribute_prompts = prompts.attribute_prompts()
    prompt_sets = [prompts.class_prompts("wbcatt")] + [
        {value: attribute_prompts[name][value] for value in values} for name, values in ATTRIBUTES.items()
    ]
    n_sentences = sum(len(v) if isinstance(v, list) else 1 for s in prompt_sets for v in s.values())

    def uncached() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            cache = PooledTextCache(model.text, directory=Path(tmp))
            cache.enabled = False
            for prompt_set in prompt_sets:
                build_zero_shot_classifier(model, prompt_set, cache)

    with tempfile.TemporaryDirectory() as tmp:
        warm = PooledTextCache(model.text, directory=Path(tmp))
        for prompt_set in prompt_sets:
            build_zero_shot_classifier(model, prompt_set, warm)

        def cached() -> None:
            cache = PooledTextCache(model.text, directory=Path(tmp))  # a new process's view: disk only
            for prompt_set in prompt_sets:
                build_zero_shot_classifier(model, prompt_set, cache)

        before = _best_of(uncached, repeats)
        after = _best_of(cached, repeats)
    return _row("zero-shot classifiers for the class and 11 attributes: text tower every call -> cached prompt features",
                n_sentences, "sentences", before, after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="model (default: the shipped one)")
    parser.add_argument("--images", type=int, default=512, help="PBC test images for the loading rows")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="only cpu is measured here (the rows are CPU hot paths)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speedups.json")
    args = parser.parse_args()

    model, _ = load_checkpoint(resolve_checkpoint(args.checkpoint))
    model.float()
    size = model.config.image_size
    records = [r for r in load_dataset("pbc").split("test")][: args.images]
    rows = image_loading([r.path for r in records], size, args.repeats)
    rows += memory_format(model, size, args.batch, args.repeats)
    rows.append(compiled_inference(model, size, args.batch, args.repeats))
    rows.append(prompt_embedding(model, args.repeats))
    end_to_end = image_outputs(model, decoded_images([r.path for r in records], size, progress=False), batch_size=args.batch)
    result = {
        "what": "before/after of hemaclip's hot-path speed-ups, same process, best of N",
        "date": date.today().isoformat(),
        "device": "cpu",
        "image_size": size,
        "rows": rows,
        "check_embedded_images": int(end_to_end["features"].shape[0]),
        "machine": machine_info(),
    }
    write_json(args.out, result)
    for row in rows:
        print(f"{row.get('speedup', 'n/a'):>6}x  {row['what']}" + (f"  [{row['error']}]" if "error" in row else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
