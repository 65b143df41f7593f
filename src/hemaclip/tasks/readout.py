"""The read-out: class and attribute logits of a model's image outputs, and the class probabilities a folder allows.

Why one place: `hemaclip describe` and `hemaclip calibrate` must read the same logits (a temperature fitted
on one read-out and applied to another would be meaningless), and a model without supervised heads is read
through zero-shot prompts instead, which only this class needs to know about.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from hemaclip.data.attributes import ATTRIBUTE_NAMES, ATTRIBUTES
from hemaclip.errors import HemaclipError

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

__all__ = ["ZERO_SHOT_DATASET", "Readout", "class_mask", "restrict_probabilities"]

# Prompt-set dataset whose class prompts are used when a checkpoint has no class head.
ZERO_SHOT_DATASET = "pbc"


class Readout:
    """Class and attribute logits of a model: its supervised heads if it has them, else zero-shot prompts."""

    def __init__(self, model: DualEncoder, zero_shot_dataset: str = ZERO_SHOT_DATASET) -> None:
        self.model = model
        self.has_class_head = getattr(model, "class_head", None) is not None
        self.has_attribute_heads = getattr(model, "attribute_heads", None) is not None
        self._class_weights: np.ndarray | None = None
        self._attr_weights: dict[str, np.ndarray] = {}
        if self.has_class_head:
            self.class_names = list(model.class_names)
        else:
            from hemaclip.text.prompts import load_prompts

            prompts = load_prompts()
            if zero_shot_dataset not in prompts.datasets:
                raise HemaclipError(f"no prompts for dataset '{zero_shot_dataset}' in {prompts.source}")
            self._class_prompts = prompts.class_prompts(zero_shot_dataset)
            self.class_names = list(self._class_prompts)
        if self.has_attribute_heads:
            self.attribute_values = {n: list(v) for n, v in model.attributes.items() if n in ATTRIBUTES}
        else:
            from hemaclip.text.prompts import load_prompts

            table = load_prompts().attribute_prompts()
            self._attribute_prompts = table
            self.attribute_values = {n: list(table[n]) for n in ATTRIBUTE_NAMES if n in table}

    def _zero_shot(self, features: np.ndarray, prompts: Mapping[str, Sequence[str]], key: str | None) -> np.ndarray:
        from hemaclip.models.text_cache import PooledTextCache
        from hemaclip.models.zero_shot import class_embeddings, scores_against

        if key is None:
            if self._class_weights is None:
                self._class_weights = class_embeddings(self.model, prompts, PooledTextCache(self.model.text))
            weights = self._class_weights
        else:
            if key not in self._attr_weights:
                self._attr_weights[key] = class_embeddings(self.model, prompts, PooledTextCache(self.model.text))
            weights = self._attr_weights[key]
        return scores_against(self.model, features, weights)

    def class_logits(self, features: np.ndarray, head_logits: np.ndarray | None) -> np.ndarray:
        """[N, C] logits over :attr:`class_names`: the class head's where given, else zero-shot scores."""
        if self.has_class_head and head_logits is not None:
            return np.asarray(head_logits, dtype=np.float64)
        return self._zero_shot(features, self._class_prompts, None).astype(np.float64)

    def attribute_logits(self, features: np.ndarray, head_logits: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
        """{attribute: [N, V]} logits over :attr:`attribute_values`: the heads' where given, else zero-shot scores."""
        if self.has_attribute_heads and head_logits:
            return {n: np.asarray(head_logits[n], dtype=np.float64) for n in self.attribute_values}
        return {n: self._zero_shot(features, self._attribute_prompts[n], n).astype(np.float64) for n in self.attribute_values}


def class_mask(class_names: Sequence[str], classes: str | Sequence[str] | None) -> np.ndarray | None:
    """Bool mask over the read-out's classes of those a folder can show (None: every class; a string is read as a
    comma-separated list, as the commands take it). Unknown names are one clear error naming the model's classes."""
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = classes.split(",")
    wanted = list(dict.fromkeys(str(c).strip() for c in classes if str(c).strip()))
    unknown = [c for c in wanted if c not in class_names]
    if unknown or not wanted:
        raise HemaclipError(f"unknown class(es) {', '.join(unknown) or '(none given)'}: the model reads {', '.join(class_names)}")
    return np.array([c in wanted for c in class_names])


def restrict_probabilities(probs: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The class probabilities given that the cell is one of the `mask` classes: P(c | c in S), the others 0.
    A temperature-calibrated reading stays a conditional probability, and the order among the kept classes
    is unchanged."""
    if mask is None:
        return probs
    kept = np.where(mask[None, :], np.asarray(probs, dtype=np.float64), 0.0)
    return kept / np.clip(kept.sum(axis=1, keepdims=True), 1e-300, None)
