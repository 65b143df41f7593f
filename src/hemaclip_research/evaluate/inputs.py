"""What the parts of an evaluation read and what each gives back.

:class:`EvalInputs` holds everything a part may read (features of the evaluated, val and train splits,
the model and its prompts, the settings); it is built once by :func:`hemaclip_research.evaluate.run_evaluation`
and no part writes to it. Each part returns a :class:`Part`: its metrics (merged into ``metrics.json``
under their keys), its report sections and any notes for the overview. Figures are registered in order
through :class:`Figures`, so ``metrics["figures"]`` lists them as they were drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip.data.splits import SPLIT_NAMES
from hemaclip.errors import HemaclipError
from hemaclip_research.report import Section

if TYPE_CHECKING:
    from hemaclip.data.datasets import CellDataset, CellRecord
    from hemaclip.data.stain import Normalizer
    from hemaclip.models.model import DualEncoder
    from hemaclip.models.text_cache import PooledTextCache
    from hemaclip.tasks.features import FeatureSet
    from hemaclip.tasks.zero_shot import ZeroShotSetting
    from hemaclip.text.prompts import PromptSet

__all__ = [
    "DEFAULT_MAP_ATTRIBUTE",
    "EVAL_SPLITS",
    "NSHOT_SEEDS",
    "NSHOT_SHOTS",
    "MIN_IMAGES_PER_CLASS",
    "EvalInputs",
    "Figures",
    "Part",
    "argmax_labels",
    "cap_feature_set",
    "cap_per_class",
    "check_classes",
    "check_split",
    "load_model_features",
    "prompt_vocabularies",
    "relabel",
    "split_records",
]

# Below this many evaluated images in a class, its numbers are reported with a warning: its recall moves
# in steps of 0.1 or more, and the stratified bootstrap (resampling within each class) can only show the
# spread of those few images, so its intervals look tighter than what is known.
MIN_IMAGES_PER_CLASS = 10
NSHOT_SHOTS: tuple[int, ...] = (1, 5, 10, 25, 50, 100, 200)
NSHOT_SEEDS: tuple[int, ...] = (0, 1, 2)
DEFAULT_MAP_ATTRIBUTE = "nucleus_shape"
EVAL_SPLITS: tuple[str, ...] = (*SPLIT_NAMES, "all")


@dataclass(frozen=True)
class EvalInputs:
    """Everything the parts of one evaluation read; built once, never written by a part.

    `eval_features` carries the labels as the data has them (folder class names for an out-of-distribution
    folder), `eval_zero_shot_features` the same rows with labels mapped onto prompt classes (the same object outside
    OOD). `model`, `text_cache` and `prompt_set` are None for another encoder's features.
    """

    out: Path
    dataset: str
    split: str
    n_boot: int
    seed: int
    eval_features: FeatureSet
    eval_zero_shot_features: FeatureSet
    train_features: FeatureSet | None = None
    val_zero_shot_features: FeatureSet | None = None
    train_missing: str = ""
    model: DualEncoder | None = None
    text_cache: PooledTextCache | None = None
    prompt_set: PromptSet | None = None
    prompt_dataset: str = ""
    prompt_classes: tuple[str, ...] = ()
    data_root: Path | None = None
    nshot_shots: tuple[int, ...] = NSHOT_SHOTS
    nshot_seeds: tuple[int, ...] = NSHOT_SEEDS
    embed_method: str = "auto"
    map_attribute: str | None = DEFAULT_MAP_ATTRIBUTE

    @property
    def external(self) -> bool:
        """Another encoder's features: no text tower, so no text-based part applies."""
        return self.model is None

    @property
    def zero_shot_setting(self) -> ZeroShotSetting:
        """How the class prompts read this evaluation's images (model, prompts, prompt dataset and classes, text cache):
        one setting for every class-prompt reading, so they cannot drift apart."""
        from hemaclip.tasks.zero_shot import ZeroShotSetting

        if self.model is None or self.prompt_set is None:
            raise HemaclipError("another encoder's features have no text tower: no class-prompt reading applies")
        return ZeroShotSetting(self.model, self.prompt_set, self.prompt_dataset, self.prompt_classes, self.text_cache)


@dataclass
class Part:
    """What one part adds: metrics (top-level keys of metrics.json), report sections, overview notes."""

    metrics: dict[str, Any] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Figures:
    """The report folder's figures, named in the order they are drawn."""

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self.names: list[str] = []

    def path(self, name: str) -> Path:
        self.names.append(name)
        return self.out / name


# --------------------------------------------------------------------------------------------- #
# data and features
# --------------------------------------------------------------------------------------------- #


def check_split(split: str) -> None:
    if split not in EVAL_SPLITS:
        raise HemaclipError(f"unknown split '{split}'; choose from {', '.join(EVAL_SPLITS)}")


def check_classes(labels: Sequence[str], what: str, candidates: Sequence[str] | None = None) -> list[str]:
    """Refuse an evaluation whose class metrics would be trivial; warn where they rest on few images.

    `labels` are the evaluated images' classes, `what` names them in messages ("split 'test' of folder X"),
    `candidates` the classes zero-shot chooses among (a folder's mapped classes). With one class, or
    one candidate, every zero-shot answer is that class: accuracy and F1 come out 1.0 with interval
    [1.0, 1.0] and ECE 0, which are not results, so this is a one-line DataError instead. Returns one
    warning naming every class with fewer than :data:`MIN_IMAGES_PER_CLASS` images (empty if none).
    """
    from collections import Counter

    from hemaclip.errors import DataError

    counts = Counter(labels)
    if len(counts) < 2:
        found = ", ".join(f"{c} ({n})" for c, n in sorted(counts.items())) or "none"
        raise DataError(f"{what} has images of {len(counts)} class ({found}); evaluate needs at least 2: with one, every "
                        "prediction is that class, so accuracy, F1 and calibration would be trivially perfect, not results")
    if candidates is not None and len(candidates) < 2:
        raise DataError(f"{what}: only {len(candidates)} class ({', '.join(candidates) or 'none'}) is mapped onto a prompt class; "
                        "evaluate needs at least 2, else every zero-shot answer is that class (map two or more)")
    small = {c: n for c, n in sorted(counts.items()) if n < MIN_IMAGES_PER_CLASS}
    if not small:
        return []
    listed = ", ".join(f"{c} ({n})" for c, n in small.items())
    return [f"Warning: {what} has fewer than {MIN_IMAGES_PER_CLASS} images in class(es) {listed}: their per-class numbers "
            "move in large steps and the bootstrap intervals, resampling those few images, understate the uncertainty."]


def cap_per_class(records: list[CellRecord], max_per_class: int | None, seed: int) -> list[CellRecord]:
    """At most `max_per_class` records per label (seeded, after sorting by path); None keeps all."""
    if max_per_class is None:
        return records
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[Any]] = {}
    for r in sorted(records, key=lambda r: str(r.path)):
        by_label.setdefault(r.label, []).append(r)
    keep: set[int] = set()
    for label in sorted(by_label):
        group = by_label[label]
        for i in rng.permutation(len(group))[: int(max_per_class)]:
            keep.add(id(group[i]))
    return [r for r in records if id(r) in keep]


def split_records(ds: CellDataset, split: str, max_per_class: int | None, seed: int) -> list[CellRecord]:
    return cap_per_class(ds.split(split), max_per_class, seed)


def cap_feature_set(feature_set: FeatureSet, max_per_class: int | None, seed: int) -> FeatureSet:
    """:func:`cap_per_class` for the rows of a feature set."""
    if max_per_class is None:
        return feature_set
    order = np.argsort(np.asarray(feature_set.paths, dtype=object), kind="stable")
    rng = np.random.default_rng(seed)
    labels = np.asarray(feature_set.labels, dtype=object)[order]
    keep = []
    for label in sorted(set(labels.tolist())):
        rows = order[labels == label]
        keep.append(rows[rng.permutation(len(rows))[: int(max_per_class)]])
    return feature_set.subset(np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64))


def relabel(feature_set: FeatureSet | None, mapping: Mapping[str, str] | None) -> FeatureSet | None:
    """The feature set with folder labels mapped onto prompt classes (unmapped ones marked)."""
    if feature_set is None or mapping is None:
        return feature_set
    return replace(feature_set, labels=[mapping.get(label, f"<unmapped:{label}>") for label in feature_set.labels])


def prompt_vocabularies(prompt_set: PromptSet) -> dict[str, list[str]]:
    return {d: list(prompt_set.classes(d)) for d in prompt_set.datasets}


def argmax_labels(logits: np.ndarray, names: Sequence[str]) -> list[str]:
    if len(logits) == 0:
        return []
    return [names[i] for i in np.argmax(np.asarray(logits), axis=1)]


def load_model_features(
    checkpoint: str | Path | None,
    record_splits: Mapping[str, Sequence[CellRecord]],
    batch_size: int = 128,
    device: str = "cpu",
    progress: bool = False,
    stain_normalizer: Normalizer | None = None,
) -> tuple[DualEncoder, Path, str, dict[str, FeatureSet]]:
    """Load a checkpoint (None = the shipped default) and extract features for each named record list.

    Returns (model, checkpoint path, checkpoint sha1, {name: FeatureSet}). Features are cached on
    disk per record list (see :func:`hemaclip.tasks.features.extract_features`). `stain_normalizer`
    (from :func:`hemaclip.data.stain.get_normalizer`) is applied to every image of every list.
    """
    from hemaclip.cache import file_sha1
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.models.default import resolve_checkpoint
    from hemaclip.tasks.features import extract_features

    path = resolve_checkpoint(checkpoint)
    model, _meta = load_for_inference(path, map_location=device)
    sha1 = file_sha1(path)
    sets = {
        name: extract_features(model, list(records), checkpoint_id=sha1, batch_size=batch_size, device=device,
                               progress=progress, stain_normalizer=stain_normalizer)
        for name, records in record_splits.items()
    }
    return model, path, sha1, sets
