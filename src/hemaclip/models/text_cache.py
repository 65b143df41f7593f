"""Frozen text-tower features, computed once per sentence and kept on disk.

With a frozen MiniLM (the default), a sentence's pooled feature never changes, so training and
zero-shot evaluation embed each distinct sentence once per machine instead of once per step.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hemaclip.cache import cache_dir
from hemaclip.models.modes import eval_mode


class PooledTextCache:
    """Maps sentences to pooled text-tower features [N, width], memoised in memory and on disk."""

    def __init__(self, text_tower: torch.nn.Module, directory: Path | None = None, batch_size: int = 128) -> None:
        self.tower = text_tower
        self.batch_size = batch_size
        self.memory: dict[str, torch.Tensor] = {}
        # Only a fully frozen tower gives features that never change; a trainable one is never cached.
        self.enabled = not any(p.requires_grad for p in text_tower.parameters())
        identity = f"{getattr(text_tower, 'source', type(text_tower).__name__)}|{getattr(text_tower, 'max_length', '')}"
        self.directory = (directory or cache_dir() / "text-features") / hashlib.sha1(str(identity).encode()).hexdigest()[:16]

    def _shard(self, texts: Sequence[str]) -> Path:
        digest = hashlib.sha1("\n".join(texts).encode()).hexdigest()
        return self.directory / f"set-{digest[:24]}.npy"

    @torch.no_grad()
    def get(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        """Features of `texts` in order; the whole set is also cached as one file for fast reloads."""
        texts = list(texts)
        if not self.enabled:
            return self.tower.embed_sentences(texts, batch_size=self.batch_size).float().cpu()
        shard = self._shard(texts)
        if shard.exists():
            features = torch.from_numpy(np.load(shard))
            self.memory.update(zip(texts, features))
            return features
        missing = [t for t in dict.fromkeys(texts) if t not in self.memory]
        show = progress and sys.stderr.isatty()
        with eval_mode(self.tower):
            for start in tqdm(range(0, len(missing), self.batch_size), desc="embedding sentences", unit="batch", disable=not show):
                chunk = missing[start : start + self.batch_size]
                features = self.tower.embed_sentences(chunk, batch_size=self.batch_size).float().cpu()
                self.memory.update(zip(chunk, features))
        features = torch.stack([self.memory[t] for t in texts]) if texts else torch.empty(0)
        try:
            shard.parent.mkdir(parents=True, exist_ok=True)
            tmp = shard.with_suffix(f".{os.getpid()}.tmp.npy")
            np.save(tmp, features.numpy())
            os.replace(tmp, shard)
        except OSError:
            pass  # the disk cache is an optimisation only
        return features
