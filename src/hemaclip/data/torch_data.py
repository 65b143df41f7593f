"""A torch `Dataset` over `CellRecord`s, returning image tensors with class and attribute targets."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from hemaclip.data.attributes import ATTRIBUTES
from hemaclip.data.datasets import CellRecord
from hemaclip.data.images import load_image

MISSING_LABEL = -1  # target value for an unknown class or attribute (ignored by the losses)


def attribute_targets(record: CellRecord) -> torch.Tensor:
    """Index of each of the 11 attribute values in `ATTRIBUTES` order, -1 where not annotated."""
    if record.attributes is None:
        return torch.full((len(ATTRIBUTES),), MISSING_LABEL, dtype=torch.long)
    return torch.tensor([values.index(record.attributes[name]) for name, values in ATTRIBUTES.items()], dtype=torch.long)


class CellImageDataset(Dataset):
    """Images with targets: `{"image", "index", "label", "attributes"}`; class ids follow `classes`."""

    def __init__(self, records: Sequence[CellRecord], classes: Sequence[str], transform: Callable) -> None:
        self.records = list(records)
        self.classes = tuple(classes)
        self.class_index = {name: i for i, name in enumerate(self.classes)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        record = self.records[index]
        image = self.transform(load_image(record.path))
        return {
            "image": image,
            "index": torch.tensor(index),
            "label": torch.tensor(self.class_index.get(record.label, MISSING_LABEL)),
            "attributes": attribute_targets(record),
        }
