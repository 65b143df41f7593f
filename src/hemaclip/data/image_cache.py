"""Decode a set of images once into a uint8 array on disk, then memory-map it on every later run.

On 2 CPU cores JPEG decoding and resizing costs a noticeable share of each training step; a
decoded cache (about 110 KB per image at 192 px) removes it. Images go through the model's
:class:`hemaclip.data.preprocess.Preprocess` (its `to_array` at the requested size). The file name is a
hash of the image paths, their sizes/mtimes, the resolution and any non-default preprocessing, so a
changed file set or preprocessing builds a new cache.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hemaclip.cache import cache_dir
from hemaclip.data.preprocess import Preprocess, decode_image


def _cache_key(paths: Sequence[Path], size: int, preprocess_id: str = "") -> str:
    digest = hashlib.sha1((f"v1|{size}|{preprocess_id}" if preprocess_id else f"v1|{size}").encode())
    for path in paths:
        stat = path.stat()
        # surrogateescape: file names that are not valid UTF-8 still hash (to their original bytes).
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:20]


def decoded_images(
    paths: Sequence[Path], size: int, directory: Path | None = None, progress: bool = True, preprocess: Preprocess | None = None
) -> np.ndarray:
    """Return an array [N, size, size, 3] uint8 of the images, building the on-disk cache if needed.

    `preprocess` is the model's (:func:`hemaclip.data.preprocess.preprocess_for`); None = the default
    path (the whole image, bicubic) for images without a model, e.g. a GAN's.
    """
    preprocess = preprocess or Preprocess(image_size=size)
    directory = directory or cache_dir() / "decoded"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"images-{size}px-{_cache_key(paths, size, preprocess.cache_id)}.npy"
    if target.exists():
        return np.load(target, mmap_mode="r")
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    try:
        show = progress and sys.stderr.isatty()
        for index, path in enumerate(tqdm(paths, desc=f"decoding images at {size}px", unit="img", disable=not show)):
            array[index] = preprocess.to_array(decode_image(path), size)
        array.flush()
        del array
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return np.load(target, mmap_mode="r")

