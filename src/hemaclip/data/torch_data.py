"""Training targets of `CellRecord`s as tensors: attribute value indices, -1 where not annotated."""

from __future__ import annotations

import torch

from hemaclip.data.attributes import ATTRIBUTES
from hemaclip.data.datasets import CellRecord

MISSING_LABEL = -1  # target value for an unknown class or attribute (ignored by the losses)


def attribute_targets(record: CellRecord) -> torch.Tensor:
    """Index of each of the 11 attribute values in `ATTRIBUTES` order, -1 where not annotated."""
    if record.attributes is None:
        return torch.full((len(ATTRIBUTES),), MISSING_LABEL, dtype=torch.long)
    return torch.tensor([values.index(record.attributes[name]) for name, values in ATTRIBUTES.items()], dtype=torch.long)
