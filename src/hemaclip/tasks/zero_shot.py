"""Zero-shot classification of cached image features with text prompts (classes and WBCAtt attributes).

A class (or attribute value) is the normalised mean embedding of all its prompts (prompt ensemble,
see :func:`hemaclip.models.zero_shot.build_zero_shot_classifier`); logits are
``logit_scale * cosine``. The features must come from the same model's image tower
(:func:`hemaclip.tasks.features.extract_features`); external encoders have no text tower.
Prompts per class can be built from string or callable templates with
:func:`hemaclip.text.prompts.build_prompts`. Nothing is silently dropped: records whose label is
not among the prompt classes, or that have no attributes, are excluded and counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.errors import DataError
from hemaclip.models.text_cache import PooledTextCache
from hemaclip.models.zero_shot import check_same_width, class_embeddings, scores_against, zero_shot_scores
from hemaclip.tasks.features import FeatureSet
from hemaclip.text.prompts import PromptSet

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

__all__ = [
    "ZeroShotSetting",
    "annotated_attributes",
    "generalised_zero_shot",
    "check_same_width",
    "class_embeddings",
    "scores_against",
    "zero_shot_attributes",
    "zero_shot_classes",
    "zero_shot_scores",
]


def _text_cache(model: DualEncoder, text_cache: PooledTextCache | None) -> PooledTextCache:
    return text_cache if text_cache is not None else PooledTextCache(model.text)


@dataclass(frozen=True)
class ZeroShotSetting:
    """How cells are read through class prompts, apart from which cells: the model (its text tower), the prompt
    file, which of its datasets, which classes (None = all, in the file's order) and the pooled-text cache.

    Built once per evaluation and handed to every class-prompt reading (the scored split, the val split for the
    temperature, both class retrievals), so they all read the same classes the same way.
    """

    model: DualEncoder
    prompt_set: PromptSet
    dataset: str
    classes: tuple[str, ...] | None = None
    text_cache: PooledTextCache | None = None

    def __post_init__(self) -> None:
        if self.classes is not None:  # a list given stays the caller's; the setting keeps its own copy
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))

    def class_prompts(self, wording: str = "train") -> dict[str, list[str]]:
        """{class: prompts} of the chosen classes in their order (`wording`: the file's "train" or "heldout"
        wording); a class without prompts for the dataset is a one-line DataError."""
        all_prompts = self.prompt_set.class_prompts(self.dataset, wording)
        names = list(all_prompts) if self.classes is None else [str(c) for c in self.classes]
        unknown = [c for c in names if c not in all_prompts]
        if unknown:
            raise DataError(f"{self.prompt_set.source}: no '{self.dataset}' prompts for class(es) {', '.join(unknown)}")
        return {c: all_prompts[c] for c in names}


def annotated_attributes(
    prompt_set: PromptSet, feature_set: FeatureSet, attributes: Sequence[str] | None, wording: str = "train"
) -> tuple[dict[str, dict[str, list[str]]], list[str], np.ndarray]:
    """(attribute prompt table, attribute names asked for, rows of `feature_set` that carry attribute labels)."""
    table = prompt_set.attribute_prompts(wording)
    names = list(table) if attributes is None else [str(a) for a in attributes]
    unknown = [a for a in names if a not in table]
    if unknown:
        raise DataError(f"unknown attribute(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    keep = np.array([i for i, a in enumerate(feature_set.attributes) if a is not None], dtype=np.int64)
    return table, names, keep


def zero_shot_classes(setting: ZeroShotSetting, feature_set: FeatureSet, wording: str = "train") -> dict[str, Any]:
    """Zero-shot class logits for the rows of `feature_set` whose label is one of the setting's classes.

    `wording` chooses the prompt file's training ("train") or held-out ("heldout") wording. Returns
    ``y_true`` (labels of the kept rows), ``logits`` [M, C], ``class_names``, ``indices`` (kept rows
    of `feature_set`), ``missing_labels`` (how many rows were excluded because their label has no prompt)
    and ``missing_label_counts`` ({label: count}).
    """
    prompts = setting.class_prompts(wording)
    if not prompts:
        raise DataError("zero-shot needs at least one class")
    names = list(prompts)
    wanted = set(names)
    keep = np.array([i for i, label in enumerate(feature_set.labels) if label in wanted], dtype=np.int64)
    missing = Counter(label for label in feature_set.labels if label not in wanted)
    logits = zero_shot_scores(setting.model, feature_set.features[keep], prompts, setting.text_cache)
    return {
        "y_true": [feature_set.labels[i] for i in keep],
        "logits": logits,
        "class_names": names,
        "indices": keep,
        "missing_labels": int(sum(missing.values())),
        "missing_label_counts": dict(sorted(missing.items())),
    }


def generalised_zero_shot(
    model: DualEncoder,
    feature_set: FeatureSet,
    prompt_set: PromptSet,
    dataset: str,
    holdout: Sequence[str],
    text_cache: PooledTextCache | None = None,
) -> dict[str, Any]:
    """Seen and held-out classes read together (generalised zero-shot): each seen class of `dataset` through its
    class prompts, each class in `holdout` through its attribute-vocabulary description from the prompt file
    (never its name). Returns what :func:`zero_shot_classes` returns, plus ``holdout``."""
    class_prompts = prompt_set.class_prompts(dataset)
    unknown = [c for c in holdout if c not in class_prompts]
    if unknown:
        raise DataError(f"--holdout {', '.join(unknown)}: not a class of '{dataset}' ({', '.join(class_prompts)})")
    prompts = {c: list(prompt_set.description(c).sentences) if c in holdout else texts for c, texts in class_prompts.items()}
    names = list(prompts)
    keep = np.array([i for i, label in enumerate(feature_set.labels) if label in prompts], dtype=np.int64)
    missing = Counter(label for label in feature_set.labels if label not in prompts)
    if len(keep) == 0:
        raise DataError(f"no image has a class of '{dataset}'")
    return {
        "y_true": [feature_set.labels[i] for i in keep],
        "logits": zero_shot_scores(model, feature_set.features[keep], prompts, _text_cache(model, text_cache)),
        "class_names": names,
        "indices": keep,
        "missing_labels": int(sum(missing.values())),
        "missing_label_counts": dict(sorted(missing.items())),
        "holdout": [c for c in names if c in holdout],
    }


def zero_shot_attributes(
    model: DualEncoder,
    feature_set: FeatureSet,
    prompt_set: PromptSet,
    attributes: Sequence[str] | None = None,
    text_cache: PooledTextCache | None = None,
    wording: str = "train",
) -> dict[str, dict[str, Any]]:
    """Per WBCAtt attribute: zero-shot logits over its values for the rows of `feature_set` that have attributes
    (`wording`: the prompt file's "train" or "heldout" wording).

    Returns {attribute: {"y_true", "logits" [M, V], "values", "indices", "missing_attributes"}};
    ``missing_attributes`` counts rows without attribute annotations (excluded). An attribute with
    no annotated rows still appears, with empty arrays.
    """
    table, names, keep = annotated_attributes(prompt_set, feature_set, attributes, wording)
    cache = _text_cache(model, text_cache)
    feats = feature_set.features[keep]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        prompts = table[name]
        out[name] = {
            "y_true": [feature_set.attributes[i][name] for i in keep],
            "logits": zero_shot_scores(model, feats, prompts, cache),
            "values": list(prompts),
            "indices": keep,
            "missing_attributes": int(len(feature_set) - len(keep)),
        }
    return out
