"""What the lab-onboarding benches share: the shipped model as they load it, and how a development pool is scored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MIN_SCORED = 3  # a class counts in a development pool's macro F1 with at least this many scored source cells


@dataclass
class ShippedModel:
    """The default checkpoint: its file, SHA-1, describer, raw model (for fine-tuning) and class names."""

    path: Path
    sha1: str
    describer: Any
    raw: Any
    classes: list[str]


def shipped_model() -> ShippedModel:
    from hemaclip.cache import file_sha1
    from hemaclip.models.checkpoint import load_checkpoint
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.tasks.describe import Describer

    path = resolve_checkpoint(None)
    describer = Describer.from_checkpoint(path, index=None)
    raw, _meta = load_checkpoint(path)
    return ShippedModel(path, file_sha1(path), describer, raw, [str(c) for c in describer.readout.class_names])


def model_read(model: Any, arrays: np.ndarray) -> dict[str, np.ndarray]:
    """Embedding and class-head softmax of uint8 cell arrays, as the benches read a base or fine-tuned model."""
    from scipy.special import softmax

    from hemaclip.models.inference import image_outputs

    out = image_outputs(model, arrays)
    return {"features": out["features"].numpy(), "probabilities": softmax(out["class_logits"].numpy(), axis=1)}


def one_per_group(indices: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """The first crop of each source cell among `indices` (scores count source cells, not crops)."""
    seen: set[str] = set()
    keep = []
    for i in indices:
        if groups[i] not in seen:
            seen.add(groups[i])
            keep.append(i)
    return np.array(keep, dtype=int)


def pool_score(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Macro F1 over the classes with >= MIN_SCORED scored cells (on those cells), and accuracy over all."""
    from hemaclip.metrics.classification import macro_f1

    truth, pred = np.asarray(truth), np.asarray(pred)
    present = [c for c in sorted(set(truth.tolist())) if (truth == c).sum() >= MIN_SCORED]
    keep = np.isin(truth, present)
    return {"macro_f1": float(macro_f1(list(truth[keep]), list(pred[keep]), present)), "accuracy": float(np.mean(pred == truth))}
