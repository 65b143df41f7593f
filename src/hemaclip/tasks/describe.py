"""Describe cells in checkable words: class with a calibrated probability, 11 attributes, a sentence, neighbours.

Why it is built this way:

* **Calibrated probabilities.** A raw softmax is over-confident; the class and every attribute read-out
  get a temperature fitted on validation images (`hemaclip calibrate`), stored beside the checkpoint
  in ``<checkpoint>.calibration.json`` (the shipped model has one). A checkpoint without it is
  described as *uncalibrated* (T = 1) instead of pretending.
* **Only confident statements.** The sentence states an attribute only when its calibrated probability
  exceeds a threshold; the rest is left unsaid, never filled in from what the class usually looks like.
  The sentence uses the words of the training captions (:mod:`hemaclip.text.captions`), and what it
  states is read back with :func:`hemaclip.text.captions.parse_caption`, so ``stated`` flags are the
  parser's reading of the actual sentence, not a promise.
* **Streaming.** :meth:`Describer.describe_paths` decodes one batch at a time (a background thread
  decodes the next batch while the model runs), so a folder of any size runs in constant memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from hemaclip.data.attributes import ATTRIBUTE_NAMES, ATTRIBUTES
from hemaclip.data.preprocess import CellView, decode_image, is_image_file, preprocess_for, skipped_files_message
from hemaclip.errors import CheckpointError, DataError, HemaclipError
from hemaclip.log import get_logger
from hemaclip.tasks.familiarity import DEFAULT_METHOD
from hemaclip.text.sentences import attribute_sentence, select_statements

__all__ = [
    "CALIBRATION_FORMAT",
    "Calibration",
    "CellDescription",
    "DescribeSettings",
    "Describer",
    "Readout",
    "calibration_path",
    "fit_calibration",
    "fit_familiarity_for",
    "UNFAMILIAR_WARNING",
    "iter_image_paths",
    "load_calibration",
]

CALIBRATION_FORMAT = 1
CALIBRATION_SUFFIX = ".calibration.json"
UNFAMILIAR_WARNING = (
    "Unfamiliar image: it lies outside what the model was trained on (another lab, stain or camera, or a cell "
    "type it does not know), so this reading may be wrong; check it by eye."
)

logger = get_logger(__name__)


@dataclass(frozen=True)
class DescribeSettings:
    """Defaults of `hemaclip describe`; chosen on the WBCAtt val split (see docs/research-log.md), never on test."""

    # An attribute is stated when its calibrated probability exceeds this.
    attribute_threshold: float = 0.7
    # The class is reported but flagged `abstain` when its calibrated probability is below this.
    abstain_below: float = 0.5
    neighbours: int = 5
    batch_size: int = 64
    # The 11 WBCAtt attributes describe white blood cells; for these predicted classes none is stated.
    classes_without_attributes: tuple[str, ...] = ("platelet", "erythroblast")
    # Prompt-set dataset whose class prompts are used when a checkpoint has no class head.
    zero_shot_dataset: str = "pbc"
    # An unfamiliar cell (see hemaclip.tasks.familiarity) gets a plain warning instead of a confident
    # sentence; an attribute is still stated only above this stricter calibrated probability.
    unfamiliar_attribute_threshold: float = 0.9
    # Test-time adaptation (--adapt bn|entropy) uses at most this many cells of a folder (a seeded sample beyond).
    adapt_max_images: int = 4096


DEFAULTS = DescribeSettings()


# ------------------------------------------------------------------------------------------------ #
# the sentence a cell gets
# ------------------------------------------------------------------------------------------------ #


def cell_sentence(
    label: str, values: Mapping[str, str], probabilities: Mapping[str, float], unfamiliar: bool | None,
    attribute_threshold: float, settings: DescribeSettings = DEFAULTS,
) -> tuple[str, dict[str, str]]:
    """The sentence a cell gets and the attribute values it states (one place for the rule): none for a class the
    attributes do not describe; for an unfamiliar cell the plain warning plus only what clears the stricter
    threshold; otherwise the attributes above `attribute_threshold`."""
    if label in settings.classes_without_attributes:
        sentence = f"No attribute is stated: the WBCAtt attributes describe white blood cells, not a {label}."
        return (f"{UNFAMILIAR_WARNING} {sentence}" if unfamiliar else sentence), {}
    if unfamiliar:
        strict = settings.unfamiliar_attribute_threshold
        said, stated = attribute_sentence(select_statements(values, probabilities, strict))
        return UNFAMILIAR_WARNING + ("" if not stated else f" Still clear at p > {strict:g}: {said}"), stated
    return attribute_sentence(select_statements(values, probabilities, attribute_threshold))


# ------------------------------------------------------------------------------------------------ #
# calibration
# ------------------------------------------------------------------------------------------------ #


@dataclass
class Calibration:
    """Temperatures of the class read-out and of each attribute read-out, fitted on validation images."""

    checkpoint_sha1: str
    class_source: str  # "head" or "zero-shot"
    class_names: list[str]
    class_temperature: float
    attribute_source: str  # "heads" or "zero-shot"
    attribute_temperatures: dict[str, float]
    fitted_on: dict[str, Any] = field(default_factory=dict)
    format: int = CALIBRATION_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> Calibration:
        try:
            if int(data.get("format", -1)) != CALIBRATION_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {CALIBRATION_FORMAT}")
            return cls(
                checkpoint_sha1=str(data["checkpoint_sha1"]),
                class_source=str(data["class_source"]),
                class_names=[str(c) for c in data["class_names"]],
                class_temperature=float(data["class_temperature"]),
                attribute_source=str(data["attribute_source"]),
                attribute_temperatures={str(k): float(v) for k, v in data["attribute_temperatures"].items()},
                fitted_on=dict(data.get("fitted_on", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{source}: not a valid calibration file ({err})") from err


def calibration_path(checkpoint: str | Path) -> Path:
    """Where the calibration of `checkpoint` lives: ``<name>.calibration.json`` beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + CALIBRATION_SUFFIX)


def load_calibration(checkpoint: str | Path, checkpoint_sha1: str) -> tuple[Calibration | None, str]:
    """(calibration, "") if a sidecar exists and was fitted for these exact weights, else (None, reason)."""
    path = calibration_path(checkpoint)
    if not path.is_file():
        return None, f"no calibration file {path.name} beside the checkpoint (run `hemaclip calibrate`)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: calibration file cannot be read ({err})") from err
    calibration = Calibration.from_dict(data, str(path))
    if calibration.checkpoint_sha1 != checkpoint_sha1:
        return None, f"{path.name} was fitted for other weights (SHA-1 {calibration.checkpoint_sha1[:10]})"
    return calibration, ""


def fit_calibration(
    model: Any,
    checkpoint: str | Path,
    data_root: str | Path | None = None,
    *,
    zero_shot_dataset: str = DEFAULTS.zero_shot_dataset,
    batch_size: int = 128,
    progress: bool = False,
    write: bool = True,
) -> Calibration:
    """Fit the class temperature on the PBC val split (it contains WBCAtt val and also has the three
    classes WBCAtt lacks) and one temperature per attribute on the WBCAtt val split; never on test.

    Writes ``<checkpoint>.calibration.json`` atomically when `write`.
    """
    from hemaclip.cache import file_sha1
    from hemaclip.data.datasets import load_dataset
    from hemaclip.io import write_json
    from hemaclip.metrics.calibration import fit_temperature
    from hemaclip.tasks.features import extract_features

    checkpoint = Path(checkpoint)
    sha1 = file_sha1(checkpoint)
    readout = Readout(model, zero_shot_dataset)
    pbc_val = load_dataset("pbc", data_root=data_root).split("val")
    index = {c: i for i, c in enumerate(readout.class_names)}
    pbc_val = [r for r in pbc_val if r.label in index]
    if not pbc_val:
        raise DataError("no PBC val image has a class the model knows; cannot fit the class temperature")
    fs = extract_features(model, pbc_val, checkpoint_id=sha1, batch_size=batch_size, progress=progress)
    logits = readout.class_logits(fs.features, fs.class_logits)
    y = np.array([index[r.label] for r in pbc_val])
    class_t = float(fit_temperature(logits, y))

    wbc_val = [r for r in load_dataset("wbcatt", data_root=data_root).split("val") if r.attributes]
    fa = extract_features(model, wbc_val, checkpoint_id=sha1, batch_size=batch_size, progress=progress)
    attr_logits = readout.attribute_logits(fa.features, fa.attribute_logits)
    temps = {}
    for name, values in readout.attribute_values.items():
        yv = np.array([values.index(r.attributes[name]) for r in wbc_val])
        temps[name] = float(fit_temperature(attr_logits[name], yv))
    calibration = Calibration(
        checkpoint_sha1=sha1,
        class_source="head" if readout.has_class_head else "zero-shot",
        class_names=list(readout.class_names),
        class_temperature=class_t,
        attribute_source="heads" if readout.has_attribute_heads else "zero-shot",
        attribute_temperatures=temps,
        fitted_on={"class": f"pbc val ({len(pbc_val)} images)", "attributes": f"wbcatt val ({len(wbc_val)} images)",
                   "method": "temperature scaling, minimum validation NLL"},
    )
    if write:
        write_json(calibration_path(checkpoint), calibration.to_dict())
    return calibration


def fit_familiarity_for(
    model: Any, checkpoint: str | Path, data_root: str | Path | None = None, *, batch_size: int = 128, progress: bool = False, write: bool = True,
    method: str = DEFAULT_METHOD,
) -> Any:
    """Fit the unfamiliarity score of a checkpoint (:mod:`hemaclip.tasks.familiarity`): class means and
    covariance on the embeddings of the PBC train split (the images the shipped recipe trains on), the
    flag threshold and the reference scores on the PBC val split; never test. Writes
    ``<checkpoint>.familiarity.npz`` when `write`."""
    from hemaclip.cache import file_sha1
    from hemaclip.data.datasets import load_dataset
    from hemaclip.tasks.familiarity import familiarity_path, fit_familiarity
    from hemaclip.tasks.features import extract_features

    checkpoint = Path(checkpoint)
    sha1 = file_sha1(checkpoint)
    pbc = load_dataset("pbc", data_root=data_root)
    known = set(model.class_names)
    train = [r for r in pbc.split("train") if r.label in known]
    val = [r for r in pbc.split("val") if r.label in known]
    if not train:
        raise DataError("no PBC train image has a class the model knows; cannot fit the unfamiliarity score")
    ft = extract_features(model, train, checkpoint_id=sha1, batch_size=batch_size, progress=progress)
    fv = extract_features(model, val, checkpoint_id=sha1, batch_size=batch_size, progress=progress)
    familiarity = fit_familiarity(
        ft.features, [r.label for r in train], fv.features, sha1,
        fitted_on=f"reference embeddings, means and covariance: pbc train ({len(train)} images); threshold: pbc val ({len(val)} images)",
        method=method,
    )
    if write:
        familiarity.save(familiarity_path(checkpoint))
    return familiarity


# ------------------------------------------------------------------------------------------------ #
# read-outs: logits of the class and the attributes from image outputs
# ------------------------------------------------------------------------------------------------ #


class Readout:
    """Class and attribute logits of a model: its supervised heads if it has them, else zero-shot prompts."""

    def __init__(self, model: Any, zero_shot_dataset: str) -> None:
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
            dataset = zero_shot_dataset
            if dataset not in prompts.datasets:
                raise HemaclipError(f"no prompts for dataset '{dataset}' in {prompts.source}")
            self._class_prompts = prompts.class_prompts(dataset)
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
        from hemaclip.tasks.zero_shot import class_embeddings, scores_against

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
        if self.has_class_head and head_logits is not None:
            return np.asarray(head_logits, dtype=np.float64)
        return self._zero_shot(features, self._class_prompts, None).astype(np.float64)

    def attribute_logits(self, features: np.ndarray, head_logits: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
        if self.has_attribute_heads and head_logits:
            return {n: np.asarray(head_logits[n], dtype=np.float64) for n in self.attribute_values}
        return {n: self._zero_shot(features, self._attribute_prompts[n], n).astype(np.float64) for n in self.attribute_values}


# ------------------------------------------------------------------------------------------------ #
# descriptions
# ------------------------------------------------------------------------------------------------ #


@dataclass
class CellDescription:
    """What hemaclip says about one image (or, with `error` set, why it could not read it)."""

    source: str
    label: str | None = None
    probability: float | None = None
    runner_up: str | None = None
    runner_up_probability: float | None = None
    abstain: bool = False
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    sentence: str = ""
    neighbours: list[dict[str, Any]] = field(default_factory=list)
    calibrated: bool = True
    # Where the cell is in the picture (x0, y0, x1, y1 pixels) and its number there (a field may hold several);
    # cell_found False: no white cell was found, the whole picture was read.
    box: list[int] | None = None
    cell: int = 0
    cell_found: bool = True
    # How far the cell lies from the training data (None: the checkpoint has no familiarity file).
    unfamiliar: bool | None = None
    unfamiliarity: float | None = None
    # The flag under the stricter bar that applies inside a folder the shift warning fires on
    # (hemaclip.tasks.familiarity.SHIFTED_FOLDER_QUANTILE); the warning says when to read this one.
    unfamiliar_in_shifted_folder: bool | None = None
    # The sentence under that stricter flag (the plain warning where only the stricter bar flags the cell).
    sentence_in_shifted_folder: str | None = None
    error: str | None = None
    # The model's unit image embedding (for review corrections that teach an adapter); not in to_dict.
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)
    # Calibrated probabilities over Readout.class_names (what an adapter corrects); not in to_dict.
    class_probabilities: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; an error record is just {"source", "error"}."""
        if self.error is not None:
            return {"source": self.source, "error": self.error}
        data = asdict(dataclasses.replace(self, embedding=None, class_probabilities=None))
        for key in ("error", "embedding", "class_probabilities"):
            data.pop(key)
        return data


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    from scipy.special import softmax

    return softmax(np.asarray(logits, dtype=np.float64) / float(temperature), axis=-1)


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


def iter_image_paths(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Each input file as given, and image files under each directory (recursively, sorted).

    Symlinked folders are followed (a lab's export is often a tree of links), each real folder once, so a
    link loop ends. Files without an image suffix (GIFs, names without one, notes) are skipped, and once
    the walk is complete one warning says how many and names a few: nothing is left out without a word."""
    skipped: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            seen: set[str] = set()
            for root, dirs, files in os.walk(path, followlinks=True):
                real = os.path.realpath(root)
                if real in seen:  # a link back to a folder already walked
                    dirs.clear()
                    continue
                seen.add(real)
                dirs.sort()
                for name in sorted(files):
                    candidate = Path(root) / name
                    if is_image_file(candidate):
                        yield candidate
                    else:
                        skipped.append(candidate)
        else:
            yield path  # missing or unreadable files become error records
    if skipped:
        logger.warning("%s", skipped_files_message(skipped))


class Describer:
    """Loads a model, its calibration, familiarity and a reference index once; describes arrays or files.

    With cell finding in the model's preprocessing, a picture holding several white cells gives one
    description per cell, each with its box; with `adapt="bn"` (or "entropy"), `describe_paths` first re-estimates
    the model's BatchNorm statistics on the folder's own cells (or minimises the entropy of its class read-out on
    them; :mod:`hemaclip.models.adapt`).
    """

    def __init__(
        self,
        model: Any,
        *,
        calibration: Calibration | None = None,
        uncalibrated_reason: str = "",
        familiarity: Any = None,
        index: Any = None,
        attribute_threshold: float = DEFAULTS.attribute_threshold,
        abstain_below: float = DEFAULTS.abstain_below,
        stain_normalizer: Any = None,
        settings: DescribeSettings = DEFAULTS,
        device: str = "cpu",
        training_model: Any = None,
        adapt_method: str = "bn",
        classes: str | Sequence[str] | None = None,
    ) -> None:
        if not 0.0 <= float(attribute_threshold) <= 1.0:
            raise HemaclipError(f"attribute threshold must be within [0, 1], got {attribute_threshold}")
        if not 0.0 <= float(abstain_below) <= 1.0:
            raise HemaclipError(f"abstain-below must be within [0, 1], got {abstain_below}")
        self.model = model.eval()
        self.settings = settings
        self.readout = Readout(model, settings.zero_shot_dataset)
        if calibration is not None and list(calibration.class_names) != list(self.readout.class_names):
            calibration, uncalibrated_reason = None, "calibration classes differ from the model's"
        self.calibration = calibration
        self.uncalibrated_reason = uncalibrated_reason
        self.familiarity = familiarity
        self.index = index
        self.attribute_threshold = float(attribute_threshold)
        self.abstain_below = float(abstain_below)
        self.restrict_to(classes)
        self.stain_normalizer = stain_normalizer
        self.device = device
        self.preprocess = preprocess_for(model)
        self.image_size = self.preprocess.image_size
        # The model before BatchNorm folding, kept only when test-time adaptation was asked for.
        self.training_model = training_model
        self.adapt_method = adapt_method  # a key of hemaclip.models.adapt.ADAPTERS
        self.adapted_on: int | None = None
        self.lab_reader: Callable[[list[CellDescription]], list[CellDescription]] | None = None  # use_lab
        self.lab_name: str | None = None

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def restrict_to(self, classes: str | Sequence[str] | None) -> None:
        """Read only `classes` (the classes the pictures can show, e.g. a white-cell-only export; None: all of the
        model's): the class read-out is renormalised over them (:func:`restrict_probabilities`)."""
        self.class_mask = class_mask(self.readout.class_names, classes)

    def use_lab(self, reader: Callable[[list[CellDescription]], list[CellDescription]] | None, name: str | None = None) -> None:
        """Read every class through a lab's read-out (:func:`hemaclip.tasks.lab.lab_reader`; None: the model's own)."""
        self.lab_reader = reader
        self.lab_name = name if reader is not None else None

    def read_with_lab(self, descriptions: list[CellDescription]) -> list[CellDescription]:
        reader = getattr(self, "lab_reader", None)
        return reader(descriptions) if reader is not None else descriptions

    @property
    def allowed_classes(self) -> list[str] | None:
        """The classes the read-out is restricted to, None when it reads all of them."""
        if self.class_mask is None:
            return None
        return [name for name, kept in zip(self.readout.class_names, self.class_mask) if kept]

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | None = None,
        *,
        index: Any = "default",
        data_root: str | Path | None = None,
        attribute_threshold: float = DEFAULTS.attribute_threshold,
        abstain_below: float = DEFAULTS.abstain_below,
        stain_normalizer: Any = None,
        progress: bool = False,
        device: str = "cpu",
        adapt: str | None = None,
        classes: str | Sequence[str] | None = None,
    ) -> Describer:
        """Load `checkpoint` (None = the shipped model), its calibration and familiarity sidecars and the
        reference index.

        `index`: "default" (the WBCAtt train split embedded by this checkpoint, built once into the cache),
        a path of a saved index, a loaded index, or None for no neighbours. `adapt`: None, "bn" to
        re-estimate BatchNorm statistics on each folder described, or "entropy" to minimise the entropy of the
        class read-out on it (see :meth:`describe_paths`). `classes`: the classes the pictures can show (None: all
        of the model's); the class read-out is renormalised over them (:func:`restrict_probabilities`).
        """
        import copy

        from hemaclip.cache import file_sha1
        from hemaclip.models.checkpoint import load_checkpoint
        from hemaclip.models.default import resolve_checkpoint
        from hemaclip.models.adapt import ADAPTERS
        from hemaclip.models.inference import prepare_for_inference
        from hemaclip.tasks.familiarity import load_familiarity

        if adapt not in (None, "none", *ADAPTERS):
            raise HemaclipError(f"unknown adaptation '{adapt}' (choose none, {', '.join(ADAPTERS)})")
        path = resolve_checkpoint(checkpoint)
        raw, _meta = load_checkpoint(path, map_location=device)
        training_model = copy.deepcopy(raw) if adapt in ADAPTERS else None
        model = prepare_for_inference(raw)
        sha1 = file_sha1(path)
        calibration, reason = load_calibration(path, sha1)
        familiarity, _why = load_familiarity(path, sha1)
        loaded = None
        if isinstance(index, str) and index == "default":
            from hemaclip.tasks.index import default_reference_index

            loaded = default_reference_index(model, path, data_root=data_root, progress=progress)
        elif isinstance(index, (str, Path)):
            from hemaclip.tasks.index import CellIndex

            loaded = CellIndex.load(Path(index))
        else:
            loaded = index
        if loaded is not None and getattr(loaded, "dim", model.config.embed_dim) != model.config.embed_dim:
            raise CheckpointError(f"reference index has dimension {loaded.dim}, the model embeds to {model.config.embed_dim}")
        return cls(model, calibration=calibration, uncalibrated_reason=reason, familiarity=familiarity, index=loaded,
                   attribute_threshold=attribute_threshold, abstain_below=abstain_below,
                   stain_normalizer=stain_normalizer, device=device, training_model=training_model,
                   adapt_method=adapt if adapt in ADAPTERS else "bn", classes=classes)

    # -- core ------------------------------------------------------------------------------------

    def sentence_for(self, label: str, values: Mapping[str, str], probabilities: Mapping[str, float],
                     unfamiliar: bool | None) -> tuple[str, dict[str, str]]:
        """:func:`cell_sentence` with this describer's thresholds (also how a review re-words a re-flagged cell)."""
        return cell_sentence(label, values, probabilities, unfamiliar, self.attribute_threshold, self.settings)

    def views(self, image: Image.Image | np.ndarray) -> list[CellView]:
        """What the model sees of a picture: one view per white cell found (one of the whole picture when
        the model reads whole images or no cell is found), stain-normalised if asked."""
        views = self.preprocess.views(image)
        if self.stain_normalizer is None:
            return views
        return [dataclasses.replace(v, array=self.stain_normalizer(v.array)) for v in views]

    def prepare(self, image: Image.Image | np.ndarray) -> np.ndarray:
        """The uint8 array the model sees of the cell a picture is about (its preprocessing, then stain
        normalisation if asked)."""
        array = self.preprocess.to_array(image)
        if self.stain_normalizer is not None:
            array = self.stain_normalizer(array)
        return array

    def describe_views(self, views: Sequence[CellView], sources: Sequence[str], cells: Sequence[int]) -> list[CellDescription]:
        """Describe prepared cell views (`cells`: each view's number within its picture). Each description keeps
        its calibrated class probabilities over the read-out's classes (`class_probabilities`, for scoring)."""
        from hemaclip.models.inference import image_outputs

        if not views:
            return []
        out = image_outputs(self.model, np.stack([v.array for v in views]), batch_size=max(1, len(views)), device=self.device)
        features = out["features"].numpy().astype(np.float32, copy=False)
        head_class = out["class_logits"].numpy() if out["class_logits"] is not None else None
        head_attr = {k: v.numpy() for k, v in out["attribute_logits"].items()} if out["attribute_logits"] else None
        cal = self.calibration
        class_probs = restrict_probabilities(_softmax(self.readout.class_logits(features, head_class), cal.class_temperature if cal else 1.0),
                                             self.class_mask)
        attr_logits = self.readout.attribute_logits(features, head_attr)
        attr_probs = {n: _softmax(l, cal.attribute_temperatures.get(n, 1.0) if cal else 1.0) for n, l in attr_logits.items()}
        scores = self.familiarity.score(features) if self.familiarity is not None else None
        names = self.readout.class_names
        hits: list[list[dict[str, Any]]] = [[] for _ in views]
        if self.index is not None and self.settings.neighbours > 0:
            hits = self.index.search(features, k=self.settings.neighbours)
        results = []
        for i, (view, source) in enumerate(zip(views, sources)):
            order = np.argsort(-class_probs[i], kind="stable")
            label = names[order[0]]
            second = names[order[1]] if len(order) > 1 else None
            unfamiliar = bool(scores[i] > self.familiarity.threshold) if scores is not None else None
            strict = bool(scores[i] > self.familiarity.shifted_threshold) if scores is not None else None
            attributes, values, probs = {}, {}, {}
            for name, p in attr_probs.items():
                j = int(np.argmax(p[i]))
                values[name] = self.readout.attribute_values[name][j]
                probs[name] = float(p[i, j])
            sentence, stated = self.sentence_for(label, values, probs, unfamiliar)
            shifted_sentence = None if strict is None else sentence if strict == unfamiliar else self.sentence_for(label, values, probs, strict)[0]
            for name in values:
                attributes[name] = {"value": values[name], "probability": round(probs[name], 4),
                                    "stated": stated.get(name) == values[name]}
            neighbours = [{"path": str(h.get("path")), "label": h.get("label"), "score": round(float(h.get("score", 0.0)), 4)}
                          for h in hits[i]]
            prob = float(class_probs[i, order[0]])
            results.append(CellDescription(
                source=str(source), label=label, probability=round(prob, 4), runner_up=second,
                runner_up_probability=round(float(class_probs[i, order[1]]), 4) if second else None,
                abstain=prob < self.abstain_below, attributes=attributes, sentence=sentence,
                neighbours=neighbours, calibrated=self.calibrated, box=list(view.box), cell=int(cells[i]),
                cell_found=view.found, unfamiliar=unfamiliar, unfamiliar_in_shifted_folder=strict,
                sentence_in_shifted_folder=shifted_sentence,
                unfamiliarity=float(f"{scores[i]:.4g}") if scores is not None else None, embedding=features[i],
                class_probabilities=class_probs[i].astype(np.float32)))
        return results

    def describe_arrays(self, images: Sequence[np.ndarray], sources: Sequence[str]) -> list[CellDescription]:
        """Describe uint8 HxWx3 RGB pictures (any size): one description per white cell found in each (a
        picture without one is read whole, `cell_found` False), in input order."""
        if len(images) != len(sources):
            raise HemaclipError(f"{len(images)} images but {len(sources)} sources")
        views, names, cells = [], [], []
        for image, source in zip(images, sources):
            for k, view in enumerate(self.views(image)):
                views.append(view)
                names.append(str(source))
                cells.append(k)
        return self.read_with_lab(self.describe_views(views, names, cells))

    def describe_pictures(self, pictures: Sequence[Sequence[CellView]], sources: Sequence[str]) -> list[list[CellDescription]]:
        """Pictures already cut into views (:meth:`views`) described in one model call, one list per
        picture: the server cuts each upload in the thread that decoded it and batches the model call
        across concurrent requests."""
        if len(pictures) != len(sources):
            raise HemaclipError(f"{len(pictures)} pictures but {len(sources)} sources")
        flat = [(view, str(source), k) for views, source in zip(pictures, sources) for k, view in enumerate(views)]
        described = iter(self.read_with_lab(self.describe_views([f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat])))
        return [[next(described) for _ in views] for views in pictures]

    def _load(self, path: Path) -> list[CellView] | str:
        try:
            return self.views(decode_image(path))
        except DataError as err:
            return str(err)
        except (OSError, ValueError) as err:  # a normaliser or resize failing on an odd file
            return f"{path}: {type(err).__name__}: {err}"

    def _load_batch(self, paths: Sequence[Path]) -> list[list[CellView] | str]:
        return [self._load(p) for p in paths]

    def adapt_to(self, arrays: Sequence[np.ndarray]) -> None:
        """Adapt the model to `arrays` (the cells of the folder being described) by this describer's method:
        AdaBN statistics ("bn") or entropy-minimised BatchNorm scales and shifts ("entropy")."""
        from hemaclip.models.adapt import adapt_model
        from hemaclip.models.inference import prepare_for_inference

        if self.training_model is None:
            raise HemaclipError("this describer was not loaded for adaptation (from_checkpoint(..., adapt='bn'))")
        if len(arrays) > self.settings.adapt_max_images:
            chosen = np.random.default_rng(0).choice(len(arrays), self.settings.adapt_max_images, replace=False)
            arrays = [arrays[i] for i in sorted(chosen)]
        self.model = prepare_for_inference(adapt_model(self.training_model, arrays, self.adapt_method))
        self.adapted_on = len(arrays)

    def describe_paths(
        self, paths: Iterable[str | Path], batch_size: int = DEFAULTS.batch_size, progress: bool = True
    ) -> Iterator[CellDescription]:
        """Describe image files (directories are walked recursively), yielding results in input order (one
        per white cell found in each file).

        Memory stays constant: one batch at a time. Where a CPU core is left over beside torch's threads,
        the next batch is decoded while this one runs through the model; where none is (2 cores, 2 torch
        threads), decoding in parallel only slows the model's threads down, so batches run in turn
        (bench/results/describe_speed.json). An unreadable file yields a description with `error` set
        instead of stopping the run. With adaptation, a first pass finds the folder's cells and adapts
        the model to them (at most `adapt_max_images` cells are kept for it).
        """
        if int(batch_size) < 1:
            raise HemaclipError(f"batch size must be >= 1, got {batch_size}")
        files = list(iter_image_paths(paths))  # names only; images are decoded batch by batch
        batches = [files[i : i + int(batch_size)] for i in range(0, len(files), int(batch_size))]
        show = progress and sys.stderr.isatty()
        if self.training_model is not None and files:
            sample = files
            if len(files) > self.settings.adapt_max_images:
                picked = np.random.default_rng(0).choice(len(files), self.settings.adapt_max_images, replace=False)
                sample = [files[i] for i in sorted(picked)]
            arrays = []
            for loaded in tqdm(map(self._load, sample), total=len(sample), desc="adapting to the folder", unit="img", disable=not show):
                if not isinstance(loaded, str):
                    arrays.extend(v.array for v in loaded)
            self.adapt_to(arrays)
        bar = tqdm(total=len(files), desc="describing", unit="img", disable=not show)
        import torch

        overlap = (os.cpu_count() or 1) > torch.get_num_threads()
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(self._load_batch, batches[0]) if batches and overlap else None
                for b, batch in enumerate(batches):
                    loaded = pending.result() if overlap else self._load_batch(batch)
                    if overlap and b + 1 < len(batches):
                        pending = pool.submit(self._load_batch, batches[b + 1])
                    views, names, cells = [], [], []
                    for p, item in zip(batch, loaded):
                        if not isinstance(item, str):
                            for k, view in enumerate(item):
                                views.append(view)
                                names.append(str(p))
                                cells.append(k)
                    described = iter(self.read_with_lab(self.describe_views(views, names, cells)))
                    for p, item in zip(batch, loaded):
                        if isinstance(item, str):
                            yield CellDescription(source=str(p), error=item)
                        else:
                            for _ in item:
                                yield next(described)
                    bar.update(len(batch))
        finally:
            bar.close()
