"""The Python face of hemaclip: ``model = hemaclip.load()``, then describe, classify, zero-shot, embed, search.

Why a separate module: a user should not have to find :class:`hemaclip.tasks.describe.Describer` to read one
cell. Everything here is a thin layer over the code the commands run (one path: ``Describer.describe_arrays``
for every image reading, :func:`hemaclip.models.inference.embed_texts` for texts, :class:`CellIndex` for
search), so ``model.describe(paths)`` gives the same numbers as ``hemaclip describe --json --index none``.
Results are typed, frozen dataclasses.

Example::

    import hemaclip
    model = hemaclip.load()                       # the shipped model
    for d in model.describe(["cell.jpg"]):
        print(d.label, d.probability, d.sentence)
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
from PIL import Image

from hemaclip.errors import CheckpointError, HemaclipError
from hemaclip.log import get_logger
from hemaclip.tasks.describe import DEFAULTS, CellDescription, Describer

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

__all__ = [
    "AttributeReading",
    "Description",
    "ImageInput",
    "Model",
    "Neighbour",
    "Probabilities",
    "SearchHit",
    "load",
]

# What the methods accept as one picture: a file path (a folder is walked recursively), a PIL image, or a
# uint8 array (H x W x 3 RGB, H x W grey, or H x W x 4 RGBA).
ImageInput = Union[str, "os.PathLike[str]", Image.Image, np.ndarray]
# Shapes of arrays accepted as pictures: grey, RGB, RGBA.
ARRAY_CHANNELS = (1, 3, 4)
logger = get_logger(__name__)


# ------------------------------------------------------------------------------------------------ #
# typed results
# ------------------------------------------------------------------------------------------------ #


@dataclass(frozen=True)
class AttributeReading:
    """One WBCAtt attribute of a cell: its most probable value, that value's calibrated probability, and
    whether the sentence states it (only confident values are said)."""

    value: str
    probability: float
    stated: bool


@dataclass(frozen=True)
class Neighbour:
    """A reference cell close to the described one (only with ``load(reference_index=...)``)."""

    path: str
    label: str | None
    score: float


@dataclass(frozen=True)
class Description:
    """What hemaclip says about one cell, field for field the record of ``hemaclip describe --json``.

    Example::

        d = model.describe(["cell.jpg"])[0]
        d.label, d.probability, d.runner_up, d.abstain      # ('neutrophil', 0.98, 'ig', False)
        d.attributes["nucleus_shape"].value                  # 'segmented-multilobed'
        d.unfamiliar                                         # True: outside what the model knows; check by eye
    """

    source: str
    label: str
    probability: float
    runner_up: str | None
    runner_up_probability: float | None
    abstain: bool
    attributes: dict[str, AttributeReading]
    sentence: str
    neighbours: tuple[Neighbour, ...]
    calibrated: bool
    box: tuple[int, int, int, int]
    cell: int
    cell_found: bool
    unfamiliar: bool | None
    unfamiliarity: float | None
    unfamiliar_in_shifted_folder: bool | None
    sentence_in_shifted_folder: str | None

    @classmethod
    def from_cell(cls, d: CellDescription) -> Description:
        """The typed record of a :class:`CellDescription` (the describer's own result)."""
        if d.error is not None or d.label is None or d.probability is None:
            raise HemaclipError(d.error or f"{d.source}: no reading")
        return cls(
            source=d.source, label=d.label, probability=d.probability, runner_up=d.runner_up,
            runner_up_probability=d.runner_up_probability, abstain=d.abstain,
            attributes={n: AttributeReading(str(a["value"]), float(a["probability"]), bool(a["stated"])) for n, a in d.attributes.items()},
            sentence=d.sentence,
            neighbours=tuple(Neighbour(str(h["path"]), h.get("label"), float(h["score"])) for h in d.neighbours),
            calibrated=d.calibrated, box=tuple(int(v) for v in d.box or (0, 0, 0, 0)), cell=d.cell, cell_found=d.cell_found,
            unfamiliar=d.unfamiliar, unfamiliarity=d.unfamiliarity,
            unfamiliar_in_shifted_folder=d.unfamiliar_in_shifted_folder, sentence_in_shifted_folder=d.sentence_in_shifted_folder,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``hemaclip describe --json`` prints for this cell (same keys, same values)."""
        return {
            "source": self.source, "label": self.label, "probability": self.probability, "runner_up": self.runner_up,
            "runner_up_probability": self.runner_up_probability, "abstain": self.abstain,
            "attributes": {n: {"value": a.value, "probability": a.probability, "stated": a.stated} for n, a in self.attributes.items()},
            "sentence": self.sentence,
            "neighbours": [{"path": h.path, "label": h.label, "score": h.score} for h in self.neighbours],
            "calibrated": self.calibrated, "box": list(self.box), "cell": self.cell, "cell_found": self.cell_found,
            "unfamiliar": self.unfamiliar, "unfamiliarity": self.unfamiliarity,
            "unfamiliar_in_shifted_folder": self.unfamiliar_in_shifted_folder,
            "sentence_in_shifted_folder": self.sentence_in_shifted_folder,
        }


@dataclass(frozen=True)
class Probabilities:
    """Probabilities of one cell over named choices (classes, or zero-shot prompts), in the model's order.

    Example::

        p = model.classify(["cell.jpg"])[0]
        p.label, p.probabilities["neutrophil"]
    """

    source: str
    cell: int
    probabilities: dict[str, float]
    calibrated: bool

    @property
    def label(self) -> str:
        """The most probable choice (the first one on a tie, as `describe` picks)."""
        return max(self.probabilities, key=self.probabilities.__getitem__)


@dataclass(frozen=True)
class SearchHit:
    """One row of an index found by a search (``hemaclip search --json`` hit)."""

    row: int
    path: str
    label: str | None
    split: str | None
    fine_label: str | None
    attributes: dict[str, str]
    score: float


# ------------------------------------------------------------------------------------------------ #
# pictures in
# ------------------------------------------------------------------------------------------------ #


def _picture_from_array(array: np.ndarray, source: str) -> np.ndarray:
    """A uint8 H x W x 3 RGB array of a user's array (grey and RGBA read as their files would be)."""
    from hemaclip.data.preprocess import as_rgb

    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in ARRAY_CHANNELS)
    if array.dtype != np.uint8 or not shape_ok:
        raise HemaclipError(
            f"{source}: expected a uint8 array of shape HxWx3 (RGB), HxW (grey) or HxWx4 (RGBA), got {array.dtype} {array.shape}; "
            "scale floats to 0-255 and cast with .astype('uint8')"
        )
    if array.ndim == 3 and array.shape[2] == 3:
        return array
    return np.asarray(as_rgb(Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)))


def _pictures(images: ImageInput | Sequence[ImageInput]) -> Iterator[tuple[str, Any]]:
    """(source, lazy loader) per picture: paths are decoded only when their batch runs."""
    from hemaclip.data.preprocess import as_rgb, decode_image
    from hemaclip.tasks.describe import iter_image_paths

    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        images = [images]
    if not isinstance(images, Sequence):
        raise HemaclipError(f"expected a list of images (paths, PIL images or arrays), got {type(images).__name__}")
    for i, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            path = Path(item)
            if not path.exists():
                raise HemaclipError(f"{path}: image file not found")
            found = list(iter_image_paths([path]))
            if not found:
                raise HemaclipError(f"{path}: no image files in this folder")
            for file in found:
                yield str(file), (lambda p=file: decode_image(p))
        elif isinstance(item, Image.Image):
            source = str(getattr(item, "filename", "") or f"<image {i}>")
            yield source, (lambda im=item: as_rgb(im))
        elif isinstance(item, np.ndarray):
            source = f"<array {i}>"
            yield source, (lambda a=item, s=source: _picture_from_array(a, s))
        else:
            raise HemaclipError(f"image {i}: expected a file path, a PIL image or a numpy array, got {type(item).__name__}")


def _batches(images: ImageInput | Sequence[ImageInput], size: int) -> Iterator[tuple[list[str], list[Any]]]:
    """Pictures decoded `size` at a time (a folder of any size runs in bounded memory)."""
    sources: list[str] = []
    loaders: list[Any] = []
    for source, loader in _pictures(images):
        sources.append(source)
        loaders.append(loader)
        if len(sources) == size:
            yield sources, [load() for load in loaders]
            sources, loaders = [], []
    if sources:
        yield sources, [load() for load in loaders]


# ------------------------------------------------------------------------------------------------ #
# the model
# ------------------------------------------------------------------------------------------------ #


class Model:
    """A loaded hemaclip model with its calibration and unfamiliarity score (see :func:`load`).

    Every method takes one picture or a list of them: file paths (folders are walked), PIL images, or
    uint8 arrays. Results come one per cell the model reads (one per picture for the shipped model, which
    reads whole pictures; a model that finds cells gives one per white cell found, each with its `cell`
    number and `box`).
    """

    def __init__(self, describer: Describer, *, name: str, checkpoint_sha1: str | None, batch_size: int = DEFAULTS.batch_size) -> None:
        if int(batch_size) < 1:
            raise HemaclipError(f"batch size must be >= 1, got {batch_size}")
        self.describer = describer
        self.name = name
        self.checkpoint_sha1 = checkpoint_sha1
        self.batch_size = int(batch_size)

    def __repr__(self) -> str:
        state = "calibrated" if self.calibrated else "uncalibrated"
        return f"hemaclip.Model({self.name!r}, {len(self.class_names)} classes, {state})"

    @property
    def network(self) -> DualEncoder:
        """The underlying dual encoder (a torch module, prepared for inference)."""
        return self.describer.model

    @property
    def class_names(self) -> list[str]:
        """The classes the model reads, in the order of its probabilities."""
        return list(self.describer.readout.class_names)

    @property
    def attribute_values(self) -> dict[str, list[str]]:
        """Each WBCAtt attribute the model reads and its possible values."""
        return {n: list(v) for n, v in self.describer.readout.attribute_values.items()}

    @property
    def calibrated(self) -> bool:
        """Whether probabilities are temperature-calibrated (a sidecar fitted for these weights exists)."""
        return self.describer.calibrated

    def _describer_for(self, classes: str | Sequence[str] | None) -> Describer:
        """The describer, or a shallow copy restricted to `classes` (the loaded one is never changed, so one
        model can serve several callers)."""
        if classes is None:
            return self.describer
        restricted = copy.copy(self.describer)
        restricted.restrict_to(classes)
        return restricted

    def _read(self, images: ImageInput | Sequence[ImageInput], classes: str | Sequence[str] | None = None) -> list[CellDescription]:
        describer = self._describer_for(classes)
        out: list[CellDescription] = []
        for sources, pictures in _batches(images, self.batch_size):
            out.extend(describer.describe_arrays(pictures, sources))
        return out

    def describe(self, images: ImageInput | Sequence[ImageInput], classes: str | Sequence[str] | None = None) -> list[Description]:
        """Class with its calibrated probability and runner-up, the 11 attributes, a sentence stating only
        confident ones, and the unfamiliarity flag: what ``hemaclip describe --json`` prints, as records.

        `classes`: the classes the pictures can show (like ``--classes``); the read-out is renormalised over them.

        Example::

            for d in model.describe(["a.jpg", "folder/"]):
                print(d.source, d.label, f"{d.probability:.2f}", d.sentence)
        """
        return [Description.from_cell(d) for d in self._read(images, classes)]

    def classify(self, images: ImageInput | Sequence[ImageInput], classes: str | Sequence[str] | None = None) -> list[Probabilities]:
        """Calibrated class probabilities of each cell (the numbers behind `describe`'s label), optionally
        restricted to `classes` (then P(class | one of `classes`), the others absent).

        Example::

            p = model.classify(["cell.jpg"], classes=["lymphocyte", "monocyte"])[0]
            p.label, p.probabilities                          # ('lymphocyte', {'lymphocyte': 0.9, 'monocyte': 0.1})
        """
        describer = self._describer_for(classes)
        names = self.class_names
        kept = set(describer.allowed_classes or names)
        return [
            Probabilities(d.source, d.cell, {n: float(p) for n, p in zip(names, d.class_probabilities) if n in kept}, self.calibrated)
            for d in self._read(images, classes)
        ]

    def zero_shot(self, images: ImageInput | Sequence[ImageInput], prompts: Sequence[str] | Mapping[str, Sequence[str]]) -> list[Probabilities]:
        """Probabilities over your own prompts: softmax of logit_scale x cosine between each cell's embedding
        and each prompt's (uncalibrated: T = 1). A mapping {name: [prompts]} averages each name's prompts
        (a prompt ensemble, as hemaclip's own zero-shot read-out does).

        Example::

            p = model.zero_shot(["cell.jpg"], ["a cell with a bilobed nucleus", "a cell with a round nucleus"])[0]
            p.label
        """
        from hemaclip.metrics.calibration import softmax
        from hemaclip.models.zero_shot import class_embeddings, scores_against

        if isinstance(prompts, str) or not isinstance(prompts, (Sequence, Mapping)):
            raise HemaclipError(f"prompts must be a list of texts or a mapping name -> texts, got {type(prompts).__name__}")
        table = {str(k): [str(t) for t in v] for k, v in prompts.items()} if isinstance(prompts, Mapping) else {str(p): [str(p)] for p in prompts}
        if len(table) < 2:
            raise HemaclipError(f"give at least two different prompts to choose between, got {len(table)}")
        if any(not t.strip() for texts in table.values() for t in texts) or any(not texts for texts in table.values()):
            raise HemaclipError("empty prompt: every choice needs at least one non-blank text")
        cells = self._read(images)
        if not cells:
            return []
        weights = class_embeddings(self.network, table)
        probs = softmax(scores_against(self.network, np.stack([d.embedding for d in cells]), weights))
        return [Probabilities(d.source, d.cell, {n: float(p) for n, p in zip(table, row)}, False) for d, row in zip(cells, probs)]

    def embed_images(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """Unit image embeddings [cells, D] float32, in the order `describe` returns the cells.

        Example::

            vectors = model.embed_images(["a.jpg", "b.jpg"])
            similarity = float(vectors[0] @ vectors[1])
        """
        cells = self._read(images)
        width = int(self.network.config.embed_dim)
        return np.stack([d.embedding for d in cells]).astype(np.float32) if cells else np.zeros((0, width), np.float32)

    def embed_texts(self, texts: str | Sequence[str]) -> np.ndarray:
        """Unit text embeddings [T, D] float32 in the image embeddings' space (what `search` queries with).

        Example::

            q = model.embed_texts(["large cell with coarse red granules"])
            scores = model.embed_images(["cell.jpg"]) @ q.T
        """
        from hemaclip.models.inference import embed_texts

        return embed_texts(self.network, [texts] if isinstance(texts, str) else list(texts))

    def search(self, index: str | os.PathLike[str], query: str, k: int = 5, where: Mapping[str, str] | None = None) -> list[SearchHit]:
        """The `k` cells of an index folder (``hemaclip index build``) closest to a description in words,
        optionally only rows whose metadata match `where` ({"label": "eosinophil"}); what ``hemaclip search``
        finds.

        Example::

            for hit in model.search("wbc-test.index", "large cell with coarse red granules", k=3):
                print(f"{hit.score:.3f}", hit.label, hit.path)
        """
        from hemaclip.models.inference import embed_texts
        from hemaclip.tasks.index import CellIndex

        if not isinstance(query, str):
            raise HemaclipError(f"query must be a text, got {type(query).__name__}")
        cell_index = CellIndex.load(Path(index))
        try:
            cell_index.check_model(self.network, f"model {self.name}")
            if self.checkpoint_sha1 != cell_index.checkpoint_id:
                logger.warning("note: %s did not build %s; scores compare two different models' embeddings", self.name, index)
            hits = cell_index.search(embed_texts(self.network, [query]), k=int(k), where=dict(where) if where else None)[0]
        finally:
            cell_index.close()
        return [SearchHit(row=int(h["row"]), path=str(h["path"]), label=h.get("label"), split=h.get("split"),
                          fine_label=h.get("fine_label"), attributes=dict(h.get("attributes", {})), score=float(h["score"]))
                for h in hits]


def load(
    model: str | os.PathLike[str] | None = None,
    *,
    reference_index: str | os.PathLike[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    attribute_threshold: float = DEFAULTS.attribute_threshold,
    abstain_below: float = DEFAULTS.abstain_below,
    stain_norm: str = "none",
    device: str = "cpu",
    batch_size: int = DEFAULTS.batch_size,
    lab: str | None = None,
    labs: str | os.PathLike[str] | None = None,
) -> Model:
    """Load a model to read cells with: None (the shipped, calibrated model), a checkpoint file, or the name of a
    bundled model config (untrained weights, uncalibrated; see ``hemaclip models``).

    `reference_index`: neighbours for `describe` ("default" embeds the WBCAtt train split once into the
    cache, minutes the first time; or an index folder); None (default) lists none. The other options are
    those of ``hemaclip describe`` (thresholds, ``--stain-norm``). `lab`: read classes through that lab's fitted
    read-out (``hemaclip lab add`` / ``lab fit``; profiles in `labs`, else $HEMACLIP_LABS), as ``describe --lab``.

    Example::

        import hemaclip
        model = hemaclip.load()                      # or hemaclip.load("runs/mine/best.pt")
        print(model.describe(["cell.jpg"])[0].sentence)
    """
    from hemaclip.cache import file_sha1
    from hemaclip.data.stain import get_normalizer
    from hemaclip.models.config import list_models
    from hemaclip.models.default import resolve_checkpoint

    normalizer = get_normalizer(stain_norm)
    options = {"attribute_threshold": attribute_threshold, "abstain_below": abstain_below, "stain_normalizer": normalizer, "device": device}
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise HemaclipError(f"load() takes a checkpoint path or a model config name, got {type(model).__name__}")
    if model is None or Path(model).is_file():
        path = resolve_checkpoint(model)
        index = Path(reference_index) if reference_index not in (None, "default") else None
        profile = None
        if lab is not None:
            from hemaclip.tasks.lab import LabProfile

            profile = LabProfile.open(lab, labs, model_sha1=file_sha1(path))
        describer = Describer.from_checkpoint(profile.model_file if profile and profile.model_file else path, index=index,
                                              data_root=data_root, **options)
        if reference_index == "default":
            describer.build_reference_index()
        if profile is not None:
            from hemaclip.tasks.lab import lab_reader

            describer.use_lab(lab_reader(profile, describer), lab)
        return Model(describer, name=str(model or path.name), checkpoint_sha1=file_sha1(path), batch_size=batch_size)
    name = str(model)
    if name not in list_models():
        raise CheckpointError(f"{name}: no such checkpoint file, and not a bundled model config ({', '.join(list_models())})")
    if reference_index is not None:
        raise HemaclipError("an untrained model from a config has no reference index; load a checkpoint for neighbours")
    if lab is not None:
        raise HemaclipError("a lab profile belongs to a trained checkpoint; load that checkpoint with lab=")
    from hemaclip.models.factory import create_model
    from hemaclip.models.inference import prepare_for_inference

    network = prepare_for_inference(create_model(name).to(device))
    describer = Describer(network, uncalibrated_reason=f"built from the config '{name}' (untrained weights)", **options)
    return Model(describer, name=name, checkpoint_sha1=None, batch_size=batch_size)
