"""Describe cells in checkable words: class with a calibrated probability, 11 attributes, a sentence, neighbours.

Why it is built this way:

* **Calibrated probabilities.** A raw softmax is over-confident; the class and every attribute read-out
  (:mod:`hemaclip.tasks.readout`) get a temperature fitted on validation images (:mod:`hemaclip.tasks.calibration`,
  `hemaclip calibrate`). A checkpoint without one is described as *uncalibrated* (T = 1) instead of pretending.
* **Only confident statements.** The sentence states an attribute only when its calibrated probability
  exceeds a threshold; the rest is left unsaid, never filled in from what the class usually looks like.
  The sentence is written and read back in the training captions' words (:mod:`hemaclip.text.sentences`), so
  ``stated`` flags are the parser's reading of the actual sentence, not a promise.
* **Unfamiliar cells** (:mod:`hemaclip.tasks.familiarity`) get a plain warning instead of a confident sentence.
* **Neighbours only when asked.** A describer has no reference index until the caller gives it one
  (:meth:`Describer.use_index`) or builds the default one (:meth:`Describer.build_reference_index`, minutes the
  first time), so loading a model never embeds a data set as a side effect.
* **Streaming.** :meth:`Describer.describe_paths` decodes one batch at a time (a background thread
  decodes the next batch while the model runs), so a folder of any size runs in constant memory.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from hemaclip.data.preprocess import CellView, decode_image, is_image_file, preprocess_for, skipped_files_message
from hemaclip.errors import CheckpointError, DataError, HemaclipError
from hemaclip.log import get_logger
from hemaclip.metrics.calibration import softmax
from hemaclip.tasks.calibration import Calibration, load_calibration
from hemaclip.tasks.readout import ZERO_SHOT_DATASET, Readout, class_mask, restrict_probabilities
from hemaclip.text.sentences import attribute_sentence, select_statements

if TYPE_CHECKING:
    from hemaclip.data.stain import Normalizer
    from hemaclip.models.model import DualEncoder
    from hemaclip.tasks.familiarity import Familiarity
    from hemaclip.tasks.index import CellIndex

__all__ = [
    "CellDescription",
    "DEFAULTS",
    "DescribeSettings",
    "Describer",
    "UNFAMILIAR_WARNING",
    "cell_sentence",
    "iter_image_paths",
]

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
    zero_shot_dataset: str = ZERO_SHOT_DATASET
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
    """Loads a model with its calibration and familiarity once; describes arrays or files.

    With cell finding in the model's preprocessing, a picture holding several white cells gives one
    description per cell, each with its box; with `adapt="bn"` (or "entropy"), `describe_paths` first re-estimates
    the model's BatchNorm statistics on the folder's own cells (or minimises the entropy of its class read-out on
    them; :mod:`hemaclip.models.adapt`). Neighbours come from a reference index given with `index` or
    :meth:`use_index`, or built with :meth:`build_reference_index`; without one, descriptions list none.
    """

    def __init__(
        self,
        model: DualEncoder,
        *,
        calibration: Calibration | None = None,
        uncalibrated_reason: str = "",
        familiarity: Familiarity | None = None,
        index: CellIndex | None = None,
        attribute_threshold: float = DEFAULTS.attribute_threshold,
        abstain_below: float = DEFAULTS.abstain_below,
        stain_normalizer: Normalizer | None = None,
        settings: DescribeSettings = DEFAULTS,
        device: str = "cpu",
        training_model: DualEncoder | None = None,
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
        self.index: CellIndex | None = None
        self.use_index(index)
        # Set by from_checkpoint: the checkpoint file (it names the default reference index), and the data folder
        # and progress bar build_reference_index uses.
        self.checkpoint: Path | None = None
        self.data_root: str | Path | None = None
        self.progress = False
        self.attribute_threshold = float(attribute_threshold)
        self.abstain_below = float(abstain_below)
        self.restrict_to(classes)
        self.stain_normalizer = stain_normalizer
        self.device = device
        self.preprocess = preprocess_for(model)
        # The model before BatchNorm folding, kept only when test-time adaptation was asked for.
        self.training_model = training_model
        self.adapt_method = adapt_method  # a key of hemaclip.models.adapt.ADAPTERS
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
        return self.lab_reader(descriptions) if self.lab_reader is not None else descriptions

    def use_index(self, index: CellIndex | str | Path | None) -> CellIndex | None:
        """Take neighbours from `index` (a loaded :class:`CellIndex`, or the folder of a saved one; None: no
        neighbours). An index of another embedding width than the model's is one clear error."""
        if isinstance(index, (str, Path)):
            from hemaclip.tasks.index import CellIndex

            index = CellIndex.load(Path(index))
        width = self.model.config.embed_dim
        if index is not None and getattr(index, "dim", width) != width:
            raise CheckpointError(f"reference index has dimension {index.dim}, the model embeds to {width}")
        self.index = index
        return index

    def build_reference_index(self) -> CellIndex:
        """Use the default reference index: the WBCAtt train split (under :attr:`data_root`) embedded by this
        checkpoint (:func:`hemaclip.tasks.index.default_reference_index`; built once into the cache, minutes the
        first time)."""
        from hemaclip.tasks.index import default_reference_index

        if self.checkpoint is None:
            raise HemaclipError("the default reference index belongs to a checkpoint file; load one with Describer.from_checkpoint")
        index = default_reference_index(self.model, self.checkpoint, data_root=self.data_root, progress=self.progress)
        self.use_index(index)
        return index

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
        index: CellIndex | str | Path | None = None,
        data_root: str | Path | None = None,
        attribute_threshold: float = DEFAULTS.attribute_threshold,
        abstain_below: float = DEFAULTS.abstain_below,
        stain_normalizer: Normalizer | None = None,
        progress: bool = False,
        device: str = "cpu",
        adapt: str | None = None,
        classes: str | Sequence[str] | None = None,
    ) -> Describer:
        """Load `checkpoint` (None = the shipped model) with its calibration and familiarity sidecars.

        `index`: a loaded reference index or the folder of a saved one (:meth:`use_index`); None (the default):
        no neighbours, until :meth:`use_index` or :meth:`build_reference_index`, which builds from `data_root`
        (None: the default data folder) and shows a progress bar when `progress`. `adapt`: None, "bn" to
        re-estimate BatchNorm statistics on each folder described, or "entropy" to minimise the entropy of the
        class read-out on it (see :meth:`describe_paths`). `classes`: the classes the pictures can show (None: all
        of the model's); the class read-out is renormalised over them (:func:`restrict_probabilities`).
        """
        import copy

        from hemaclip.cache import file_sha1
        from hemaclip.models.adapt import ADAPTERS
        from hemaclip.models.checkpoint import load_checkpoint
        from hemaclip.models.default import resolve_checkpoint
        from hemaclip.models.inference import prepare_for_inference
        from hemaclip.tasks.familiarity import load_familiarity

        if adapt not in (None, "none", *ADAPTERS):
            raise HemaclipError(f"unknown adaptation '{adapt}' (choose none, {', '.join(ADAPTERS)})")
        if isinstance(index, str) and index == "default":
            raise HemaclipError("index='default' is built by an explicit step: call describer.build_reference_index()")
        path = resolve_checkpoint(checkpoint)
        raw, _meta = load_checkpoint(path, map_location=device)
        training_model = copy.deepcopy(raw) if adapt in ADAPTERS else None
        model = prepare_for_inference(raw)
        sha1 = file_sha1(path)
        calibration, reason = load_calibration(path, sha1)
        familiarity, _why = load_familiarity(path, sha1)
        describer = cls(model, calibration=calibration, uncalibrated_reason=reason, familiarity=familiarity, index=index,
                        attribute_threshold=attribute_threshold, abstain_below=abstain_below,
                        stain_normalizer=stain_normalizer, device=device, training_model=training_model,
                        adapt_method=adapt if adapt in ADAPTERS else "bn", classes=classes)
        describer.checkpoint, describer.data_root, describer.progress = Path(path), data_root, progress
        return describer

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
        class_probs = restrict_probabilities(softmax(self.readout.class_logits(features, head_class), cal.class_temperature if cal else 1.0),
                                             self.class_mask)
        attr_logits = self.readout.attribute_logits(features, head_attr)
        attr_probs = {n: softmax(l, cal.attribute_temperatures.get(n, 1.0) if cal else 1.0) for n, l in attr_logits.items()}
        scores = self.familiarity.score(features) if self.familiarity is not None else None
        flags = self.familiarity.cell_flags(scores) if scores is not None else None
        names = self.readout.class_names
        hits: list[list[dict[str, Any]]] = [[] for _ in views]
        if self.index is not None and self.settings.neighbours > 0:
            hits = self.index.search(features, k=self.settings.neighbours)
        results = []
        for i, (view, source) in enumerate(zip(views, sources)):
            order = np.argsort(-class_probs[i], kind="stable")
            label = names[order[0]]
            second = names[order[1]] if len(order) > 1 else None
            unfamiliar, strict = (bool(flags[0][i]), bool(flags[1][i])) if flags is not None else (None, None)
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
