"""Where derived, re-computable data lives (hashes, decoded images, features, indexes) and file identity.

`cache_dir()` is ``$HEMACLIP_CACHE``, else ``$XDG_CACHE_HOME/hemaclip``, else ``~/.cache/hemaclip``.
`file_sha1()` identifies a file by its bytes (checkpoints, feature files, images).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hemaclip.errors import DataError

__all__ = ["cache_dir", "file_sha1"]


def cache_dir() -> Path:
    """Per-user cache folder for derived, re-computable data (hashes, decoded images, features)."""
    base = os.environ.get("HEMACLIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hemaclip"
    )
    return Path(base)


def file_sha1(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """SHA-1 hex digest of a file's bytes (use it as `checkpoint_id` for a checkpoint file)."""
    path = Path(path)
    digest = hashlib.sha1()
    try:
        with path.open("rb") as handle:
            while block := handle.read(chunk_size):
                digest.update(block)
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror or err})") from err
    return digest.hexdigest()
