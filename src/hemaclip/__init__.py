"""hemaclip: morphology-aware image-text learning for blood-cell images (research software).

Python use: ``model = hemaclip.load()`` then ``model.describe(["cell.jpg"])`` (see :mod:`hemaclip.api`).
The API is imported on first use, so ``import hemaclip`` (and the CLI's start) stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Checkpoint format version: bump when saved weights or config layout change incompatibly.
CHECKPOINT_FORMAT = 1

# Names re-exported from hemaclip.api on first access (PEP 562 module __getattr__).
_API_NAMES = ("AttributeReading", "Description", "Model", "Neighbour", "Probabilities", "SearchHit", "load")
__all__ = ["CHECKPOINT_FORMAT", "__version__", *_API_NAMES]

if TYPE_CHECKING:
    from hemaclip.api import AttributeReading, Description, Model, Neighbour, Probabilities, SearchHit, load


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from hemaclip import api

        return getattr(api, name)
    raise AttributeError(f"module 'hemaclip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API_NAMES))
