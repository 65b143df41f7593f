"""Image features computed once and kept on disk, so probes and retrieval are cheap (DinoBloom style).

A :class:`FeatureSet` is a table of L2-normalised image features with, per row, the image path,
label, split and (where known) the 11 WBCAtt attributes, plus the model's auxiliary head logits.
It is saved as one ``.npz`` (arrays) and a ``.json`` sidecar (everything else), both written
atomically.

:func:`extract_features` embeds records with a hemaclip model and caches the arrays under
``cache_dir()/features/<key>.npz``. The key is a SHA-1 of the checkpoint identity (use
:func:`hemaclip.cache.file_sha1` of the checkpoint file), the image size and every image's resolved path, byte
size and mtime; labels, splits and attributes are *not* part of the cache and always come from the
records passed in (the same images may carry different labels in different datasets, e.g. pbc and
pbc11). :func:`load_external_features` reads another encoder's features (DinoBloom, UNI, ...) from
a ``.npy``/``.h5`` plus an index CSV, so they can be probed in the same table.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from hemaclip.data.attributes import ATTRIBUTE_NAMES, validate_attributes
from hemaclip.data.datasets import CellRecord, clean_csv_row
from hemaclip.cache import cache_dir
from hemaclip.data.image_cache import decoded_images
from hemaclip.data.preprocess import preprocess_for
from hemaclip.data.splits import SPLIT_NAMES
from hemaclip.data.stain import Normalizer, normalize_batch, normalizer_id
from hemaclip.errors import DataError
from hemaclip.io import atomic_write
from hemaclip.models.inference import image_outputs

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

__all__ = [
    "FEATURE_CACHE_VERSION",
    "FeatureSet",
    "extract_features",
    "feature_cache_key",
    "l2_normalize",
    "load_external_features",
]

FEATURE_CACHE_VERSION = 1
_ATTR_PREFIX = "attribute_logits__"
INDEX_COLUMNS = ("path", "label", "split")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


@dataclass
class FeatureSet:
    """L2-normalised features [N, D] float32 and, per row, path, label, split and attributes.

    `class_logits` [N, C] and `attribute_logits` {name: [N, V]} are the model's auxiliary heads (None
    for models without heads and for external features); their column order is
    `meta["class_names"]` / `meta["attributes"][name]`. `source` names the encoder (e.g.
    "checkpoint:<sha1>" or an external file stem); `meta` holds other plain-JSON facts
    (checkpoint id, image size, vocabularies).
    """

    features: np.ndarray
    labels: list[str]
    paths: list[str]
    splits: list[str]
    attributes: list[dict[str, str] | None]
    class_logits: np.ndarray | None = None
    attribute_logits: dict[str, np.ndarray] | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.features)
        lengths = {
            "labels": len(self.labels),
            "paths": len(self.paths),
            "splits": len(self.splits),
            "attributes": len(self.attributes),
        }
        if self.class_logits is not None:
            lengths["class_logits"] = len(self.class_logits)
        for name, logits in (self.attribute_logits or {}).items():
            lengths[f"attribute_logits[{name}]"] = len(logits)
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad or np.ndim(self.features) != 2:
            raise ValueError(f"FeatureSet: features have shape {np.shape(self.features)} but {bad} rows")

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    # ---- selection ----------------------------------------------------

    def _indices(self, mask_or_indices: ArrayLike) -> np.ndarray:
        sel = np.asarray(mask_or_indices)
        if sel.dtype == bool:
            if sel.shape != (len(self),):
                raise ValueError(f"boolean mask must have shape ({len(self)},), got {sel.shape}")
            return np.flatnonzero(sel)
        if sel.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(sel.dtype, np.integer):
            raise ValueError(f"subset takes a boolean mask or integer indices, got dtype {sel.dtype}")
        return sel.astype(np.int64).ravel()

    def subset(self, mask_or_indices: ArrayLike) -> FeatureSet:
        """Rows selected by a boolean mask [N] or integer indices (in the given order)."""
        idx = self._indices(mask_or_indices)
        return FeatureSet(
            features=np.ascontiguousarray(self.features[idx]),
            labels=[self.labels[i] for i in idx],
            paths=[self.paths[i] for i in idx],
            splits=[self.splits[i] for i in idx],
            attributes=[self.attributes[i] for i in idx],
            class_logits=None if self.class_logits is None else np.ascontiguousarray(self.class_logits[idx]),
            attribute_logits=None
            if self.attribute_logits is None
            else {k: np.ascontiguousarray(v[idx]) for k, v in self.attribute_logits.items()},
            source=self.source,
            meta=dict(self.meta),
        )

    def by_split(self, name: str) -> FeatureSet:
        """Rows of split `name` ('train', 'val', 'test'; 'all' returns every row)."""
        if name == "all":
            return self.subset(np.arange(len(self)))
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split '{name}'; choose from {', '.join(SPLIT_NAMES)} or all")
        return self.subset(np.array([s == name for s in self.splits], dtype=bool))

    # ---- persistence --------------------------------------------------

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_suffix(".json")

    def save(self, path: str | Path) -> Path:
        """Write `<path>.npz` (arrays) and `<path>.json` (rows, source, meta), each atomically."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays: dict[str, np.ndarray] = {"features": np.asarray(self.features, dtype=np.float32)}
        if self.class_logits is not None:
            arrays["class_logits"] = np.asarray(self.class_logits, dtype=np.float32)
        for name, logits in (self.attribute_logits or {}).items():
            arrays[_ATTR_PREFIX + name] = np.asarray(logits, dtype=np.float32)
        with atomic_write(path, "wb") as handle:
            np.savez(handle, **arrays)
        sidecar = {
            "version": FEATURE_CACHE_VERSION,
            "rows": len(self),
            "source": self.source,
            "meta": self.meta,
            "labels": list(self.labels),
            "paths": [str(p) for p in self.paths],
            "splits": list(self.splits),
            "attributes": list(self.attributes),
            "attribute_logit_names": list(self.attribute_logits or {}),
        }
        with atomic_write(self._sidecar(path)) as handle:
            json.dump(sidecar, handle)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureSet:
        """Read a FeatureSet written by :meth:`save` (one-line DataError if missing or inconsistent)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        sidecar_path = cls._sidecar(path)
        for p in (path, sidecar_path):
            if not p.is_file():
                raise DataError(f"{p}: feature file does not exist")
        try:
            side = json.loads(sidecar_path.read_text(encoding="utf-8"))
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{path}: feature file cannot be read ({err})") from err
        if side.get("version") != FEATURE_CACHE_VERSION or "features" not in arrays:
            raise DataError(f"{path}: not a hemaclip feature file of version {FEATURE_CACHE_VERSION}")
        names = side.get("attribute_logit_names") or []
        try:
            return cls(
                features=arrays["features"].astype(np.float32, copy=False),
                labels=list(side["labels"]),
                paths=list(side["paths"]),
                splits=list(side["splits"]),
                attributes=list(side["attributes"]),
                class_logits=arrays.get("class_logits"),
                attribute_logits={n: arrays[_ATTR_PREFIX + n] for n in names} if names else None,
                source=str(side.get("source", "")),
                meta=dict(side.get("meta") or {}),
            )
        except (KeyError, ValueError) as err:
            raise DataError(f"{path}: feature file and its .json sidecar do not match ({err})") from err


# --------------------------------------------------------------------------------------------------
# Extraction with a hemaclip model
# --------------------------------------------------------------------------------------------------


def feature_cache_key(checkpoint_id: str, paths: Sequence[str | Path], image_size: int) -> str:
    """SHA-1 of the checkpoint identity, image size and each image's resolved path, size and mtime."""
    digest = hashlib.sha1(f"features-v{FEATURE_CACHE_VERSION}|{checkpoint_id}|{int(image_size)}\n".encode())
    for p in paths:
        p = Path(p)
        stat = p.stat()
        digest.update(f"{p.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _from_records(
    records: Sequence[CellRecord],
    features: np.ndarray,
    class_logits: np.ndarray | None,
    attribute_logits: dict[str, np.ndarray] | None,
    source: str,
    meta: dict[str, Any],
) -> FeatureSet:
    return FeatureSet(
        features=features,
        labels=[r.label for r in records],
        paths=[str(r.path) for r in records],
        splits=[r.split for r in records],
        attributes=[dict(r.attributes) if r.attributes is not None else None for r in records],
        class_logits=class_logits,
        attribute_logits=attribute_logits,
        source=source,
        meta=meta,
    )


def extract_features(
    model: DualEncoder,
    records: Sequence[CellRecord],
    checkpoint_id: str,
    batch_size: int = 128,
    device: str = "cpu",
    cache: bool = True,
    progress: bool = False,
    source: str | None = None,
    stain_normalizer: Normalizer | None = None,
) -> FeatureSet:
    """Embed `records` with `model` through its preprocessing (decoded-image cache at its input size).

    With `cache=True` the arrays are read from / written to ``cache_dir()/features/<key>.npz``
    (see :func:`feature_cache_key`); a hit does no image decoding or model inference. Labels,
    splits and attributes always come from `records`. `checkpoint_id` must identify the weights
    (e.g. ``file_sha1(checkpoint_path)``); reusing an id for different weights returns stale features.
    The model must already be on `device`; it is put in eval mode for the pass and restored after.
    `stain_normalizer` (see :func:`hemaclip.data.stain.get_normalizer`) is applied to each decoded
    image before the model sees it; it is part of the cache key.
    """
    records = list(records)
    if stain_normalizer is not None:
        checkpoint_id = f"{checkpoint_id}|stain={normalizer_id(stain_normalizer)}"
    size = int(model.config.image_size)
    paths = [Path(r.path) for r in records]
    meta = {
        "checkpoint_id": checkpoint_id,
        "image_size": size,
        "class_names": list(getattr(model, "class_names", ()) or ()),
        "attributes": {k: list(v) for k, v in (getattr(model, "attributes", None) or {}).items()},
    }
    source = source or f"checkpoint:{checkpoint_id}"
    target = None
    if cache and records:
        target = cache_dir() / "features" / f"{feature_cache_key(checkpoint_id, paths, size)}.npz"
        if target.is_file():
            try:
                cached = FeatureSet.load(target)
            except DataError:
                cached = None  # a damaged cache entry is recomputed and overwritten
            if cached is not None and cached.paths == [str(p.resolve()) for p in paths]:
                return _from_records(
                    records, cached.features, cached.class_logits, cached.attribute_logits, source, meta
                )
    if records:
        images = normalize_batch(decoded_images(paths, size, progress=progress, preprocess=preprocess_for(model)), stain_normalizer)
        out = image_outputs(model, images, batch_size=batch_size, device=device, progress=progress)
        features = out["features"].numpy().astype(np.float32, copy=False)
        class_logits = out["class_logits"].numpy() if out["class_logits"] is not None else None
        attr = out["attribute_logits"]
        attribute_logits = {k: v.numpy() for k, v in attr.items()} if attr is not None else None
    else:
        features = np.zeros((0, int(model.config.embed_dim)), dtype=np.float32)
        class_logits, attribute_logits = None, None
    if target is not None:
        stored = FeatureSet(
            features=features,
            labels=[""] * len(records),
            paths=[str(p.resolve()) for p in paths],
            splits=[""] * len(records),
            attributes=[None] * len(records),
            class_logits=class_logits,
            attribute_logits=attribute_logits,
            source=source,
            meta=meta,
        )
        try:
            stored.save(target)
        except OSError:
            pass  # the cache is an optimisation only
    return _from_records(records, features, class_logits, attribute_logits, source, meta)


# --------------------------------------------------------------------------------------------------
# Features of other encoders
# --------------------------------------------------------------------------------------------------


def _read_feature_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: feature file does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix in (".h5", ".hdf5"):
            try:
                import h5py  # noqa: PLC0415 (optional dependency)
            except ImportError as err:
                raise DataError(f"{path}: reading .h5 features needs h5py (pip install h5py), or save them as .npy") from err
            with h5py.File(path, "r") as handle:
                keys = [k for k in handle.keys() if isinstance(handle[k], h5py.Dataset)]
                key = "features" if "features" in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise DataError(f"{path}: expected a dataset named 'features' (or exactly one dataset), found {keys}")
                array = np.asarray(handle[key])
        else:
            raise DataError(f"{path}: unsupported feature file type '{suffix}' (use .npy or .h5)")
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: feature file cannot be read ({err})") from err
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise DataError(f"{path}: features must be a numeric [N, D] array, got shape {array.shape} dtype {array.dtype}")
    return array


def load_external_features(
    features_path: str | Path, index_csv: str | Path, source: str | None = None
) -> FeatureSet:
    """Another encoder's features [N, D] (``.npy``, or ``.h5`` with h5py) plus an index CSV, as a FeatureSet.

    The CSV has one row per feature row, in the same order, with columns ``path,label,split``
    (split one of train/val/test) and optionally all 11 WBCAtt attribute columns (a row with all
    of them empty has no attributes). Relative paths are resolved against the CSV's folder.
    Features are L2-normalised here. Raises a one-line DataError naming the file for a row-count
    mismatch, missing columns, unknown split/attribute values, or non-finite / all-zero features.
    """
    features_path, index_csv = Path(features_path), Path(index_csv)
    array = _read_feature_array(features_path)
    if not np.all(np.isfinite(array)):
        bad = int(np.sum(~np.all(np.isfinite(array), axis=1)))
        raise DataError(f"{features_path}: {bad} feature row(s) contain NaN or infinite values")
    if not index_csv.is_file():
        raise DataError(f"{index_csv}: index CSV does not exist")
    try:
        with index_csv.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [clean_csv_row(row, index_csv, reader.line_num) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{index_csv}: index CSV cannot be read ({err})") from err
    missing = [c for c in INDEX_COLUMNS if c not in columns]
    if missing:
        raise DataError(f"{index_csv}: missing column(s) {', '.join(missing)} (need {', '.join(INDEX_COLUMNS)})")
    attr_cols = [c for c in ATTRIBUTE_NAMES if c in columns]
    if attr_cols and len(attr_cols) != len(ATTRIBUTE_NAMES):
        absent = [c for c in ATTRIBUTE_NAMES if c not in columns]
        raise DataError(f"{index_csv}: has some attribute columns but is missing {', '.join(absent)}")
    if len(rows) != len(array):
        raise DataError(
            f"{index_csv}: {len(rows)} rows but {features_path} has {len(array)} feature rows (they must match, in order)"
        )
    norms = np.linalg.norm(array.astype(np.float64), axis=1)
    if np.any(norms == 0):
        raise DataError(f"{features_path}: {int(np.sum(norms == 0))} feature row(s) are all zero")
    labels, paths, splits, attributes = [], [], [], []
    for line, row in enumerate(rows, start=2):
        where = f"{index_csv}:{line}"
        if not row["path"] or not row["label"]:
            raise DataError(f"{where}: empty path or label")
        if row["split"] not in SPLIT_NAMES:
            raise DataError(f"{where}: unknown split '{row['split']}' (expected {', '.join(SPLIT_NAMES)})")
        p = Path(row["path"]).expanduser()
        paths.append(str(p if p.is_absolute() else index_csv.parent / p))
        labels.append(row["label"])
        splits.append(row["split"])
        if attr_cols and any(row[c] for c in attr_cols):
            attributes.append(validate_attributes(row, where))
        else:
            attributes.append(None)
    return FeatureSet(
        features=l2_normalize(array),
        labels=labels,
        paths=paths,
        splits=splits,
        attributes=attributes,
        source=source or features_path.stem,
        meta={"features_file": str(features_path), "index_csv": str(index_csv), "raw_dim": int(array.shape[1])},
    )
