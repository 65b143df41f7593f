"""Byte-identical duplicate detection, so no image can sit on both sides of a split.

Hashes are cached per (path, size, mtime) under the user cache folder, so a second run over
20,000 files costs a stat per file instead of a read.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hemaclip.cache import cache_dir, file_sha1
from hemaclip.io import atomic_write


def _hash_cache_file() -> Path:
    return cache_dir() / "sha1-cache.json"


def file_hashes(paths: Sequence[Path]) -> dict[Path, str]:
    """SHA-1 of each file's bytes, reusing cached values whose size and mtime still match."""
    cache_path = _hash_cache_file()
    try:
        cache: dict[str, list] = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    result: dict[Path, str] = {}
    changed = False
    for path in paths:
        stat = path.stat()
        key = str(path.resolve())
        entry = cache.get(key)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            result[path] = entry[2]
            continue
        digest = file_sha1(path)
        cache[key] = [stat.st_size, stat.st_mtime_ns, digest]
        result[path] = digest
        changed = True
    if changed:
        try:
            with atomic_write(cache_path) as handle:
                json.dump(cache, handle)
        except OSError:
            pass  # the cache is an optimisation; a read-only home must not break data loading
    return result


@dataclass(frozen=True)
class DuplicateReport:
    """What deduplication found: groups of identical files and which were dropped, and why."""

    groups: list[list[Path]]
    dropped: list[Path]
    cross_label_groups: list[list[Path]]
    dropped_by_split: dict[str, int] = field(default_factory=dict)  # where the dropped copies sat (datasets with splits)

    def to_dict(self, root: Path | None = None) -> dict:
        def name(path: Path) -> str:
            return str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)

        out = {
            "duplicate_groups": len(self.groups),
            "files_dropped": len(self.dropped),
            "cross_label_groups": [[name(p) for p in group] for group in self.cross_label_groups],
        }
        if self.dropped_by_split:
            out["dropped_by_split"] = dict(self.dropped_by_split)
            out["dropped"] = [name(p) for p in self.dropped]
        return out


def deduplicate(
    paths: Iterable[Path], labels: dict[Path, str], rank: Callable[[Path], Any] | None = None
) -> tuple[list[Path], DuplicateReport]:
    """Keep one file per identical-bytes group; drop every copy of a group filed under two labels.

    A group whose copies disagree on the label cannot be trusted for either class, so all of it goes.
    The copy kept is the one with the smallest `rank` (default: the first path), e.g. the copy in the
    earliest split, so that an evaluation image never duplicates a training one.
    """
    paths = sorted(paths)
    hashes = file_hashes(paths)
    by_hash: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        by_hash[hashes[path]].append(path)
    kept: list[Path] = []
    dropped: list[Path] = []
    groups: list[list[Path]] = []
    cross: list[list[Path]] = []
    for group in by_hash.values():
        if len(group) == 1:
            kept.append(group[0])
            continue
        groups.append(group)
        if len({labels[p] for p in group}) > 1:
            cross.append(group)
            dropped.extend(group)
        else:
            keep = min(group, key=rank) if rank is not None else group[0]
            kept.append(keep)
            dropped.extend(p for p in group if p != keep)
    return sorted(kept), DuplicateReport(groups=groups, dropped=sorted(dropped), cross_label_groups=cross)
