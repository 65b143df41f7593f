"""The training sentences of a run, each with the statement it makes about a cell.

A sentence states a class ("a neutrophil ..."), some attribute values ("a cell whose nucleus is
bilobed"), or all 11 values (a full caption). Knowing the statement lets the loss treat every image
the sentence is true of as a positive, instead of pretending that only its own pair is (the
false-negative problem of plain InfoNCE when many cells share one description).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hemaclip.data.attributes import ATTRIBUTES
from hemaclip.data.datasets import CellRecord
from hemaclip.data.torch_data import MISSING_LABEL, attribute_targets
from hemaclip.text.captions import caption_variants
from hemaclip.text.prompts import PromptSet, naming_pattern

TEXT_KINDS = ("caption", "attribute", "klass")


@dataclass
class TextBank:
    """Unique sentences with their statements; per-record candidate sentences for each kind."""

    texts: list[str] = field(default_factory=list)
    text_class: list[int] = field(default_factory=list)  # class index stated, -1 if none
    text_attributes: list[list[int]] = field(default_factory=list)  # value index per attribute, -1 if unstated
    candidates: list[dict[str, list[int]]] = field(default_factory=list)  # per record: kind -> text ids
    blocked: re.Pattern[str] | None = None  # sentences it finds are never added (names of held-out classes)
    _index: dict[str, int] = field(default_factory=dict)

    def add(self, text: str, klass: int = MISSING_LABEL, attributes: dict[str, str] | None = None) -> int | None:
        """Add a sentence (once) and return its id; None (not added) when the blocked pattern finds it."""
        if self.blocked is not None and self.blocked.search(text):
            return None
        if text in self._index:
            return self._index[text]
        self._index[text] = len(self.texts)
        self.texts.append(text)
        self.text_class.append(klass)
        stated = attributes or {}
        self.text_attributes.append([values.index(stated[name]) if name in stated else MISSING_LABEL for name, values in ATTRIBUTES.items()])
        return self._index[text]

    def statement_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(self.text_class, dtype=torch.long), torch.tensor(self.text_attributes, dtype=torch.long)


def build_text_bank(
    records: Sequence[CellRecord],
    classes: Sequence[str],
    prompts: PromptSet,
    dataset: str,
    captions_per_image: int,
    seed: int,
    holdout: Sequence[str] = (),
) -> TextBank:
    """Collect every sentence a record may be paired with during training.

    Only the training part of the prompt file is read (its held-out wording never is). Classes in `holdout`
    stay unseen: no sentence that names one of them (its name or a training synonym, see
    :meth:`PromptSet.class_names`) enters the bank, whichever class or attribute it was written for.
    """
    pattern = naming_pattern(prompts.class_names(holdout))
    bank = TextBank(blocked=pattern)
    class_ids: dict[str, list[int]] = {}
    sentences = prompts.class_sentences(dataset)
    templates = prompts.class_prompts(dataset, wording="train")
    for index, name in enumerate(classes):
        texts = [*sentences.get(name, []), *templates.get(name, [])]
        class_ids[name] = kept(bank.add(text, klass=index) for text in texts)
    attribute_ids: dict[tuple[str, str], list[int]] = {}
    # Attribute statements only where some image is annotated (none for e.g. the ALL set): class sentences alone.
    annotated = any(record.attributes for record in records)
    for name, by_value in (prompts.attribute_prompts(wording="train") if annotated else {}).items():
        for value, texts in by_value.items():
            attribute_ids[(name, value)] = kept(bank.add(text, attributes={name: value}) for text in texts)
    for record in records:
        candidates: dict[str, list[int]] = {"klass": class_ids.get(record.label, [])}
        if record.attributes:
            candidates["caption"] = kept(
                bank.add(text, attributes=record.attributes) for text in caption_variants(record.attributes, n=captions_per_image, seed=seed)
            )
            candidates["attribute"] = [i for item in record.attributes.items() for i in attribute_ids[item]]
        bank.candidates.append(candidates)
    return bank


def kept(ids: Iterable[int | None]) -> list[int]:
    """The ids of sentences that entered the bank (blocked ones come back as None)."""
    return [i for i in ids if i is not None]


def draw_texts(bank: TextBank, record_ids: np.ndarray, mix: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """Pick one sentence id per record: a kind by `mix` among those the record has, then a sentence."""
    chosen = np.empty(len(record_ids), dtype=np.int64)
    for position, record_id in enumerate(record_ids):
        candidates = bank.candidates[record_id]
        kinds = [k for k in TEXT_KINDS if candidates.get(k)]
        weights = np.array([mix[k] for k in kinds], dtype=np.float64)
        weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(kinds), 1 / len(kinds))
        kind = kinds[rng.choice(len(kinds), p=weights)]
        chosen[position] = candidates[kind][rng.integers(len(candidates[kind]))]
    return chosen


def record_targets(records: Sequence[CellRecord], classes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Class index [N] and attribute value indices [N, 11] of records (-1 where unknown)."""
    index = {name: i for i, name in enumerate(classes)}
    labels = torch.tensor([index.get(r.label, MISSING_LABEL) for r in records], dtype=torch.long)
    attributes = torch.stack([attribute_targets(r) for r in records]) if records else torch.empty(0, len(ATTRIBUTES), dtype=torch.long)
    return labels, attributes


def statement_masks(
    image_class: torch.Tensor, image_attributes: torch.Tensor, text_class: torch.Tensor, text_attributes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, known) masks [images, texts]: is each sentence true of each image, and is that known?

    A statement about an attribute the image has no annotation for is unknown (left out of the loss),
    not false.
    """
    class_stated = text_class[None, :] >= 0
    class_known = image_class[:, None] >= 0
    class_ok = ~class_stated | (image_class[:, None] == text_class[None, :])
    attr_stated = text_attributes[None, :, :] >= 0
    attr_known = image_attributes[:, None, :] >= 0
    attr_ok = ~attr_stated | (image_attributes[:, None, :] == text_attributes[None, :, :])
    known = (~class_stated | class_known) & (~attr_stated | attr_known).all(dim=-1)
    positive = known & class_ok & attr_ok.all(dim=-1)
    return positive, known
