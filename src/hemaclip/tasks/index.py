"""A searchable index of cell images: FAISS vectors plus a SQLite table of what each row is.

Why an index rather than a feature file: retrieval by description ("large cell with coarse red
granules") or by example image has to answer in milliseconds on collections far larger than a test
split, and it has to say *which* cell each hit is (path, class, 11 attributes) and let a user restrict
hits by those columns. So an index folder holds

* ``shards/shard-NNNNN.npz``: the L2-normalised embeddings, computed ``shard_size`` images at a time.
  Each shard is written atomically and carries a key (checkpoint, stain normaliser, its images'
  paths/sizes/mtimes); a killed build restarts from the finished shards and never recomputes them.
* ``embeddings.npy``: all embeddings [N, D] float32 (memory-mapped on load; used for exact filtered search).
* ``vectors.faiss``: the FAISS index, inner product on unit vectors (= cosine). ``flat`` (exact) below
  :data:`AUTO_FLAT_BELOW` vectors, else IVF (``ivf``) or HNSW (``hnsw``).
* ``meta.sqlite``: table ``cells`` (row, path, label, split, fine_label, one column per attribute) and
  table ``meta`` (format, hemaclip version, checkpoint id, embedding width, kind, search settings...).
  It is written last, so its presence marks a complete index.

Final files are written to a temporary name and renamed, so a reader never sees half an index file.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hemaclip import __version__
from hemaclip.data.attributes import ATTRIBUTE_NAMES
from hemaclip.data.datasets import CellRecord, load_dataset
from hemaclip.cache import cache_dir
from hemaclip.data.preprocess import preprocess_for
from hemaclip.data.stain import Normalizer, normalize_batch, normalizer_id
from hemaclip.errors import CheckpointError, DataError, HemaclipError
from hemaclip.io import atomic_write, path_to_text, text_to_path
from hemaclip.log import get_logger

if TYPE_CHECKING:
    from hemaclip.models.model import DualEncoder

__all__ = [
    "AUTO_FLAT_BELOW",
    "INDEX_FORMAT",
    "INDEX_KINDS",
    "CellIndex",
    "IndexSettings",
    "default_reference_index",
    "embed_images",
    "index_model",
]

INDEX_FORMAT = 1
INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
AUTO_FLAT_BELOW = 50_000
FILTER_COLUMNS = ("label", "split", "fine_label", *ATTRIBUTE_NAMES)
_META_FILE = "meta.sqlite"
_VECTORS_FILE = "vectors.faiss"
_EMBEDDINGS_FILE = "embeddings.npy"
_SHARD_DIR = "shards"
logger = get_logger(__name__)


@dataclass(frozen=True)
class IndexSettings:
    """How the approximate kinds are built and searched (defaults checked with bench/search_speed.py).

    IVF: ``nlist`` = ``ivf_lists_per_sqrt_n`` x sqrt(N) coarse clusters, ``nprobe`` of them searched.
    HNSW: ``hnsw_m`` links per node, ``ef_construction`` at build, ``ef_search`` at query time.
    On 1M clustered synthetic vectors nprobe 2 and efSearch 64 already reach recall@10 >= 0.95; real
    embeddings are less tightly clustered, so the defaults keep a margin (nprobe 16: recall 1.0 there).
    """

    ivf_lists_per_sqrt_n: float = 4.0
    nprobe: int = 16
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    train_sample: int = 100_000
    seed: int = 0


# ------------------------------------------------------------------------------------------------
# Embedding images (text queries: hemaclip.models.inference.embed_texts)
# ------------------------------------------------------------------------------------------------


def embed_images(
    model: DualEncoder, images: np.ndarray, *, batch_size: int = 64, stain_normalizer: Normalizer | None = None
) -> np.ndarray:
    """L2-normalised image embeddings [N, D] float32 of uint8 images [N, S, S, 3] at the model's size."""
    from hemaclip.models.inference import image_outputs

    images = normalize_batch(np.asarray(images), stain_normalizer)
    out = image_outputs(model, images, batch_size=batch_size)
    return np.ascontiguousarray(out["features"].numpy(), dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------------


def _shard_key(checkpoint_id: str, stain: str, image_size: int, paths: Sequence[Path]) -> str:
    """What a shard's embeddings depend on: weights, stain normaliser, input size and the exact files."""
    digest = hashlib.sha1(f"index-shard-v{INDEX_FORMAT}|{checkpoint_id}|{stain}|{image_size}\n".encode())
    for path in paths:
        stat = path.stat()
        # surrogateescape: a file name that is not valid UTF-8 hashes to its own bytes (no crash).
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _read_shard(path: Path, key: str, rows: int, dim: int) -> np.ndarray | None:
    """The embeddings of a finished shard, or None if absent, made from other inputs or damaged (a
    truncated or overwritten file, a failed CRC, a wrong shape, non-finite values); a damaged shard is
    reported and the caller embeds its images again."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            features = np.asarray(data["features"], dtype=np.float32)
        if features.shape != (rows, dim) or not np.isfinite(features).all():
            raise ValueError(f"features of shape {features.shape}, expected ({rows}, {dim}) finite values")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        logger.warning("%s: damaged shard (%s); embedding its %d images again", path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, rows)
        return None
    return features


def _first_non_finite_row(embeddings: np.ndarray, rows_per_block: int = 65_536) -> int | None:
    """The first row holding NaN or infinity, read a block at a time (the file is memory-mapped), or None."""
    for start in range(0, len(embeddings), rows_per_block):
        finite = np.isfinite(np.asarray(embeddings[start : start + rows_per_block])).all(axis=1)
        if not finite.all():
            return start + int(np.argmin(finite))
    return None


def _choose_kind(kind: str, n: int) -> str:
    if kind not in INDEX_KINDS:
        raise HemaclipError(f"unknown index kind '{kind}'; choose from {', '.join(INDEX_KINDS)}")
    if kind == "auto":
        return "flat" if n < AUTO_FLAT_BELOW else "ivf"
    return kind


def build_faiss(vectors: np.ndarray, kind: str, settings: IndexSettings = IndexSettings()) -> tuple[Any, dict[str, Any]]:
    """A FAISS inner-product index over unit vectors [N, D] and the search settings to store with it."""
    import faiss

    n, dim = vectors.shape
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if kind == "flat" or n == 0:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, {"kind": "flat"}
    if kind == "ivf":
        nlist = max(1, min(n // 39, int(round(settings.ivf_lists_per_sqrt_n * np.sqrt(n)))))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(settings.seed)
        sample = vectors if n <= settings.train_sample else vectors[np.sort(rng.choice(n, settings.train_sample, replace=False))]
        index.cp.seed = settings.seed
        index.train(sample)
        index.add(vectors)
        nprobe = min(nlist, settings.nprobe)
        index.nprobe = nprobe
        return index, {"kind": "ivf", "nlist": nlist, "nprobe": nprobe}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        index.add(vectors)
        index.hnsw.efSearch = settings.ef_search
        return index, {"kind": "hnsw", "hnsw_m": settings.hnsw_m, "ef_search": settings.ef_search}
    raise HemaclipError(f"unknown index kind '{kind}'; choose from {', '.join(INDEX_KINDS)}")


def _tmp_name(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _write_faiss(index: Any, path: Path) -> None:
    import faiss

    tmp = _tmp_name(path)
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_sqlite(path: Path, records: Sequence[CellRecord], meta: Mapping[str, Any]) -> None:
    tmp = _tmp_name(path)
    try:
        tmp.unlink()
        con = sqlite3.connect(tmp)
        try:
            columns = ", ".join(f'"{c}" TEXT' for c in FILTER_COLUMNS if c not in ("label", "split"))
            con.execute(f'CREATE TABLE cells (row INTEGER PRIMARY KEY, path TEXT NOT NULL, label TEXT, split TEXT, {columns})')
            con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            placeholders = ", ".join("?" for _ in range(2 + len(FILTER_COLUMNS)))
            con.executemany(
                f"INSERT INTO cells VALUES ({placeholders})",
                (
                    (
                        row,
                        path_to_text(r.path),  # a name that is not UTF-8 is stored with \xNN escapes
                        r.label,
                        r.split,
                        r.fine_label,
                        *((r.attributes or {}).get(name) for name in ATTRIBUTE_NAMES),
                    )
                    for row, r in enumerate(records)
                ),
            )
            for column in FILTER_COLUMNS:
                con.execute(f'CREATE INDEX "by_{column}" ON cells ("{column}")')
            con.executemany("INSERT INTO meta VALUES (?, ?)", ((k, json.dumps(v)) for k, v in meta.items()))
            con.commit()
        finally:
            con.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _embed_shards(
    model: DualEncoder,
    records: Sequence[CellRecord],
    shard_dir: Path,
    *,
    checkpoint_id: str,
    shard_size: int,
    progress: bool,
    stain_normalizer: Normalizer | None,
    batch_size: int,
) -> tuple[np.ndarray, dict[str, int]]:
    """Embed `records` shard by shard, reusing every finished shard whose key still matches."""
    from tqdm import tqdm

    size = int(model.config.image_size)
    dim = int(model.config.embed_dim)
    preprocess = preprocess_for(model)
    stain = normalizer_id(stain_normalizer)
    shard_dir.mkdir(parents=True, exist_ok=True)
    n_shards = (len(records) + shard_size - 1) // shard_size
    parts: list[np.ndarray] = []
    counts = {"shards": n_shards, "reused": 0, "computed": 0}
    show = progress and sys.stderr.isatty()
    with tqdm(total=len(records), desc="indexing images", unit="img", disable=not show) as bar:
        for number in range(n_shards):
            chunk = records[number * shard_size : (number + 1) * shard_size]
            paths = [Path(r.path) for r in chunk]
            key = _shard_key(checkpoint_id, stain, size, paths)
            target = shard_dir / f"shard-{number:05d}.npz"
            features = _read_shard(target, key, len(chunk), dim)
            if features is None:
                images = np.stack([preprocess.load(p) for p in paths])
                features = embed_images(model, images, batch_size=batch_size, stain_normalizer=stain_normalizer)
                with atomic_write(target, "wb") as handle:
                    np.savez(handle, features=features, key=np.array(key))
                counts["computed"] += 1
            else:
                counts["reused"] += 1
            parts.append(features)
            bar.update(len(chunk))
    # Shards beyond the current plan (a collection that shrank) would only confuse a later resume.
    for stale in shard_dir.glob("shard-*.npz"):
        try:
            if int(stale.stem.split("-")[1]) >= n_shards:
                stale.unlink()
        except (ValueError, IndexError):
            continue
    vectors = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
    return vectors, counts


# ------------------------------------------------------------------------------------------------
# The index
# ------------------------------------------------------------------------------------------------


class CellIndex:
    """Embeddings of a cell collection with FAISS search and per-row metadata (see module docstring)."""

    def __init__(self, path: Path, faiss_index: Any, embeddings: np.ndarray, meta: dict[str, Any]) -> None:
        self.path = Path(path)
        self.faiss_index = faiss_index
        self.embeddings = embeddings
        self.meta = meta
        self.build_counts: dict[str, int] = {}
        self._con = sqlite3.connect(f"file:{self.path / _META_FILE}?mode=ro", uri=True, check_same_thread=False)
        self._values_cache: dict[str, set[str]] = {}
        # One SQLite connection shared by the server's worker threads; calls on it are serialised.
        self._lock = threading.RLock()
        self._rows_by_path: dict[str, int] | None = None

    # ---- construction -------------------------------------------------

    @classmethod
    def build(
        cls,
        model: DualEncoder,
        records: Sequence[CellRecord],
        out: str | Path,
        *,
        checkpoint_id: str,
        kind: str = "auto",
        shard_size: int = 2048,
        progress: bool = True,
        stain_normalizer: Normalizer | None = None,
        batch_size: int = 64,
        settings: IndexSettings = IndexSettings(),
        source: str = "",
        checkpoint_path: str | Path | None = None,
    ) -> CellIndex:
        """Embed `records` with `model` into an index folder `out` (resumable; see module docstring).

        `checkpoint_id` identifies the weights (``file_sha1`` of the checkpoint file); it is stored so
        queries are embedded by the same model and so shards of other weights are never reused;
        `checkpoint_path` (stored too) lets `hemaclip search` find that model again.
        """
        out = Path(out)
        records = list(records)
        if not records:
            raise DataError(f"{out}: nothing to index (the collection has no images)")
        if shard_size < 1:
            raise HemaclipError("shard size must be at least 1")
        chosen = _choose_kind(kind, len(records))
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        vectors, counts = _embed_shards(
            model,
            records,
            out / _SHARD_DIR,
            checkpoint_id=checkpoint_id,
            shard_size=shard_size,
            progress=progress,
            stain_normalizer=stain_normalizer,
            batch_size=batch_size,
        )
        embed_seconds = time.perf_counter() - started
        # The old metadata goes first: an index folder is complete only once meta.sqlite is back.
        (out / _META_FILE).unlink(missing_ok=True)
        with atomic_write(out / _EMBEDDINGS_FILE, "wb") as handle:
            np.save(handle, vectors)
        started = time.perf_counter()
        faiss_index, search_meta = build_faiss(vectors, chosen, settings)
        faiss_seconds = time.perf_counter() - started
        _write_faiss(faiss_index, out / _VECTORS_FILE)
        config = getattr(model, "config", None)
        meta = {
            "format": INDEX_FORMAT,
            "hemaclip_version": __version__,
            "checkpoint_id": checkpoint_id,
            "embed_dim": int(vectors.shape[1]),
            "image_size": int(getattr(config, "image_size", 0) or 0),
            "image_tower": str(getattr(config, "image_tower", "")),
            "count": int(len(records)),
            "checkpoint_path": str(Path(checkpoint_path).resolve()) if checkpoint_path else "",
            "stain_norm": normalizer_id(stain_normalizer),
            "stain_norm_name": str(getattr(stain_normalizer, "name", "none")) if stain_normalizer is not None else "none",
            "source": source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "embed_seconds": round(embed_seconds, 3),
            "faiss_seconds": round(faiss_seconds, 3),
            **search_meta,
        }
        _write_sqlite(out / _META_FILE, records, meta)
        index = cls.load(out)
        index.build_counts = counts
        return index

    @classmethod
    def load(cls, path: str | Path, *, expected_checkpoint_id: str | None = None) -> CellIndex:
        """Open an index folder; one-line DataError if missing/incomplete/another format, CheckpointError
        if `expected_checkpoint_id` is given and the index was built by other weights."""
        import faiss

        path = Path(path)
        if not path.is_dir():
            raise DataError(f"{path}: index not found (build one with: hemaclip index build --dataset wbcatt --out {path})")
        for name in (_META_FILE, _VECTORS_FILE, _EMBEDDINGS_FILE):
            if not (path / name).is_file():
                raise DataError(f"{path}: incomplete index ({name} missing); run 'hemaclip index build' again to finish it")
        try:
            con = sqlite3.connect(f"file:{path / _META_FILE}?mode=ro", uri=True)
            try:
                # A damaged page shows up here, as one line naming the file, not later in a query.
                problems = [row[0] for row in con.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise ValueError(f"damaged database: {problems[0]}")
                meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
                columns = {row[1] for row in con.execute("PRAGMA table_info(cells)")}
                missing = [c for c in ("row", "path", *FILTER_COLUMNS) if c not in columns]
                if missing:  # searched and summarised later; say so now, naming the file
                    raise ValueError("no table 'cells'" if not columns else f"table 'cells' lacks column(s) {', '.join(missing)}")
                rows = con.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
                if rows != meta.get("count"):
                    raise ValueError(f"table 'cells' has {rows} rows, the index {meta.get('count')}")
            finally:
                con.close()
        except (sqlite3.Error, ValueError) as exc:
            raise DataError(f"{path / _META_FILE}: not a hemaclip index metadata file ({exc}); rebuild it with 'hemaclip index build'") from exc
        if meta.get("format") != INDEX_FORMAT:
            raise DataError(
                f"{path}: index format {meta.get('format')!r} (hemaclip {meta.get('hemaclip_version', '?')}) cannot be read by "
                f"hemaclip {__version__} (format {INDEX_FORMAT}); rebuild it with 'hemaclip index build'"
            )
        if expected_checkpoint_id is not None and meta.get("checkpoint_id") != expected_checkpoint_id:
            raise CheckpointError(
                f"{path}: index was built by checkpoint {str(meta.get('checkpoint_id'))[:12]}, not by this one "
                f"({expected_checkpoint_id[:12]}); rebuild it or pass the matching --checkpoint"
            )
        try:
            embeddings = np.load(path / _EMBEDDINGS_FILE, mmap_mode="r")
            faiss_index = faiss.read_index(str(path / _VECTORS_FILE))
        except (OSError, ValueError, RuntimeError) as exc:
            raise DataError(f"{path}: index files cannot be read ({str(exc).splitlines()[0] if str(exc) else exc})") from exc
        if embeddings.ndim != 2 or embeddings.shape != (meta.get("count"), meta.get("embed_dim")) or faiss_index.ntotal != len(embeddings):
            raise DataError(f"{path}: index files disagree with each other (rebuild with 'hemaclip index build')")
        bad = _first_non_finite_row(embeddings)
        if bad is not None:
            raise DataError(f"{path / _EMBEDDINGS_FILE}: row {bad} holds NaN or infinite values (the file is damaged); "
                            "rebuild the index with 'hemaclip index build'")
        if meta.get("kind") == "ivf":
            faiss_index.nprobe = int(meta.get("nprobe", 1))
        elif meta.get("kind") == "hnsw":
            faiss_index.hnsw.efSearch = int(meta.get("ef_search", 64))
        return cls(path, faiss_index, embeddings, meta)

    # ---- facts ----------------------------------------------------------

    def __len__(self) -> int:
        return int(len(self.embeddings))

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def checkpoint_id(self) -> str:
        return str(self.meta.get("checkpoint_id", ""))

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", ""))

    def close(self) -> None:
        self._con.close()

    def check_model(self, model: DualEncoder, what: str = "the model") -> None:
        """Refuse a model whose embedding width differs from the index's (queries would be meaningless)."""
        width = int(getattr(getattr(model, "config", None), "embed_dim", -1))
        if width != self.dim:
            raise CheckpointError(f"{self.path}: index holds {self.dim}-d embeddings but {what} makes {width}-d ones")

    def summary(self) -> dict[str, Any]:
        """Meta facts plus counts per label and split (for `hemaclip index info`)."""
        with self._lock:
            per_label = dict(self._con.execute("SELECT label, COUNT(*) FROM cells GROUP BY label ORDER BY label"))
            per_split = dict(self._con.execute("SELECT split, COUNT(*) FROM cells GROUP BY split ORDER BY split"))
            attr = ATTRIBUTE_NAMES[0]
            with_attributes = self._con.execute(f'SELECT COUNT(*) FROM cells WHERE "{attr}" IS NOT NULL').fetchone()[0]
        return {"path": str(self.path), **self.meta, "per_label": per_label, "per_split": per_split, "with_attributes": with_attributes}

    # ---- rows -------------------------------------------------------------

    def _row_dicts(self, rows: Sequence[int]) -> dict[int, dict[str, Any]]:
        if not rows:
            return {}
        found: dict[int, dict[str, Any]] = {}
        names = ["row", "path", "label", "split", *FILTER_COLUMNS[2:]]
        for start in range(0, len(rows), 500):
            chunk = [int(r) for r in rows[start : start + 500]]
            marks = ",".join("?" for _ in chunk)
            query = f"SELECT {', '.join(chr(34) + n + chr(34) for n in names)} FROM cells WHERE row IN ({marks})"
            with self._lock:
                fetched = self._con.execute(query, chunk).fetchall()
            for values in fetched:
                item = dict(zip(names, values))
                attributes = {name: item.pop(name) for name in ATTRIBUTE_NAMES}
                item["attributes"] = {k: v for k, v in attributes.items() if v is not None}
                found[int(item["row"])] = item
        return found

    def record(self, row: int) -> dict[str, Any]:
        """Metadata of one row (path, label, split, fine_label, attributes); DataError if out of range."""
        found = self._row_dicts([int(row)])
        if int(row) not in found:
            raise DataError(f"{self.path}: no row {row} in this index ({len(self)} rows)")
        return found[int(row)]

    def row_for_path(self, path: str | Path) -> int | None:
        """The row of an image path as stored in the index (None if it is not indexed). The table has no
        index on `path` (a scan, about 1 ms per lookup at 6,000 rows, and the server looks up every
        neighbour), so the mapping is read once, on first use."""
        with self._lock:
            if self._rows_by_path is None:
                self._rows_by_path = {}
                for path_, row in self._con.execute("SELECT path, row FROM cells ORDER BY row DESC"):
                    self._rows_by_path[str(path_)] = int(row)  # descending: the first row of a path wins
            return self._rows_by_path.get(path_to_text(path))

    def image_path(self, row: int) -> Path:
        """The image file of a row, exactly as listed in the index (the server serves nothing else)."""
        return text_to_path(self.record(row)["path"])

    def column_values(self, column: str) -> set[str]:
        """Distinct non-empty values of a filter column."""
        if column not in FILTER_COLUMNS:
            raise HemaclipError(f"unknown filter column '{column}'; choose from {', '.join(FILTER_COLUMNS)}")
        if column not in self._values_cache:
            with self._lock:
                values = self._con.execute(f'SELECT DISTINCT "{column}" FROM cells WHERE "{column}" IS NOT NULL').fetchall()
            self._values_cache[column] = {str(v[0]) for v in values}
        return self._values_cache[column]

    def matching_rows(self, where: Mapping[str, str]) -> np.ndarray:
        """Rows whose metadata equal every `where` item (case-insensitive values); clear errors for unknown
        columns or values."""
        clauses, params = [], []
        for column, value in where.items():
            known = self.column_values(column)
            by_folded = {v.casefold(): v for v in known}
            match = str(value) if str(value) in known else by_folded.get(str(value).strip().casefold())
            if match is None:
                shown = ", ".join(sorted(known)[:12]) or "none in this index"
                raise HemaclipError(f"unknown value '{value}' for filter '{column}'; this index has: {shown}")
            clauses.append(f'"{column}" = ?')
            params.append(match)
        query = "SELECT row FROM cells" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY row"
        with self._lock:
            rows = self._con.execute(query, params).fetchall()
        return np.array([r[0] for r in rows], dtype=np.int64)

    # ---- search -----------------------------------------------------------

    def search(self, queries: np.ndarray, k: int = 10, where: Mapping[str, str] | None = None) -> list[list[dict[str, Any]]]:
        """The `k` nearest rows (cosine similarity, highest first) of each query [n, dim].

        With `where`, only rows whose metadata match are searched, exactly (so k hits come back
        whenever at least k rows match); without it the FAISS index answers.
        """
        queries = np.ascontiguousarray(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if queries.shape[1] != self.dim:
            raise HemaclipError(f"query has {queries.shape[1]} dimensions but the index at {self.path} holds {self.dim}-d vectors")
        if k < 1:
            raise HemaclipError("k must be at least 1")
        if not np.isfinite(queries).all():  # a NaN score is no ranking (and no valid JSON)
            raise HemaclipError("the query's embedding holds NaN or infinite values: the model's weights are damaged")
        if where:
            subset = self.matching_rows(where)
            kk = min(k, len(subset))
            if kk == 0:
                return [[] for _ in queries]
            scores = queries @ np.asarray(self.embeddings[subset]).T
            top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            ordered = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable"), axis=1)
            ids = subset[ordered]
            sims = np.take_along_axis(scores, ordered, axis=1)
        else:
            sims, ids = self.faiss_index.search(queries, min(k, len(self)))
        found = self._row_dicts(sorted({int(i) for i in ids.ravel() if i >= 0}))
        return [
            [{**found[int(i)], "score": float(s)} for s, i in zip(srow, irow) if i >= 0]
            for srow, irow in zip(sims, ids)
        ]

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        """Every row's metadata in order (for exports and checks)."""
        for start in range(0, len(self), 1000):
            block = self._row_dicts(list(range(start, min(start + 1000, len(self)))))
            yield from (block[r] for r in sorted(block))


# ------------------------------------------------------------------------------------------------
# The reference index used by `describe` (neighbours) and the server
# ------------------------------------------------------------------------------------------------


def default_reference_index(model: DualEncoder, checkpoint_path: Path, data_root: str | Path | None = None, progress: bool = True) -> CellIndex:
    """The WBCAtt train split embedded by `checkpoint_path`'s model, built once into the cache and reused."""
    from hemaclip.data.paths import resolve_data_root
    from hemaclip.cache import file_sha1

    checkpoint_id = file_sha1(checkpoint_path)
    root = resolve_data_root(data_root)
    name = hashlib.sha1(f"{checkpoint_id}|{root.resolve()}".encode()).hexdigest()[:16]
    out = cache_dir() / "index" / f"reference-train-{name}"
    try:
        return CellIndex.load(out, expected_checkpoint_id=checkpoint_id)
    except (DataError, CheckpointError):
        pass
    records = load_dataset("wbcatt", data_root=root).split("train")
    return CellIndex.build(
        model,
        records,
        out,
        checkpoint_id=checkpoint_id,
        kind="flat",
        progress=progress,
        source="WBCAtt train split",
        checkpoint_path=checkpoint_path,
    )


def index_model(index: CellIndex, checkpoint: str | Path | None = None) -> tuple[Any, Path]:
    """The model that embeds queries for `index`: `checkpoint` if given, else the one that built it.

    The building checkpoint is found by its stored path, else the shipped default if its SHA-1
    matches. A `checkpoint` of another width is refused; one of other weights is allowed (the
    caller may warn: scores then compare two different embedding spaces).
    """
    from hemaclip.models.checkpoint import load_for_inference
    from hemaclip.models.default import default_checkpoint_path, resolve_checkpoint
    from hemaclip.cache import file_sha1

    if checkpoint is not None:
        path = resolve_checkpoint(checkpoint)
        model, _ = load_for_inference(path)
        index.check_model(model, f"checkpoint {path}")
        return model, path
    candidates = [Path(index.meta["checkpoint_path"])] if index.meta.get("checkpoint_path") else []
    try:
        candidates.append(default_checkpoint_path())
    except CheckpointError:
        pass
    for path in candidates:
        if path.is_file() and file_sha1(path) == index.checkpoint_id:
            model, _ = load_for_inference(path)
            index.check_model(model, f"checkpoint {path}")
            return model, path
    where = index.meta.get("checkpoint_path") or "an unknown path"
    raise CheckpointError(
        f"{index.path}: the checkpoint that built this index ({where}, sha1 {index.checkpoint_id[:12]}) was not found; "
        "pass --checkpoint PATH"
    )
