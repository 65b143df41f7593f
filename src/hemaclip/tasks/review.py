"""Review a slide's worth of cells at once: a differential count with intervals, a review queue, corrections.

Why it is built this way:

* **One SQLite store per review** (``<out>/review.sqlite``) holds every described cell (its reading, a
  small thumbnail and its embedding) and an append-only table of corrections. Each correction is its own
  transaction (WAL journal, ``synchronous=FULL``) and triggers refuse any UPDATE or DELETE of it, so a
  correction once acknowledged survives a ``kill -9`` of the server and is never overwritten: a cell's
  current value is its latest correction, else the model's reading.
* **Resume.** A file is described once per (file SHA-1, model SHA-1): running `hemaclip review` again on
  the same folder and ``--out`` describes only the files not in the store yet, then rewrites the reports
  from the store (with the corrections made so far). Cells are committed a batch at a time, so a killed
  run loses at most the batch in flight, and memory stays flat (the reports read back from SQLite).
* **The differential** counts white cells only (platelets and erythroblasts are listed apart, as a lab
  does) and gives each class's share a 95 % Wilson interval (:func:`hemaclip.metrics.statistics.share_intervals`).
* **The queue**: cells flagged unfamiliar first (most unfamiliar first), then the rest by lowest class
  probability, so a person spends their time where the model is least sure.
* The page (``hemaclip serve --review DIR``) addresses cells by id only; no path ever comes from a client.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import html
import io
import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from hemaclip.data.attributes import ATTRIBUTE_NAMES
from hemaclip.errors import HemaclipError
from hemaclip.io import path_to_text, text_to_path

if TYPE_CHECKING:
    from hemaclip.tasks.adapter import CorrectionAdapter
    from hemaclip.tasks.describe import Describer

__all__ = [
    "REVIEW_STORE",
    "ReviewSettings",
    "ReviewStore",
    "check_review_store",
    "export_reviewed",
    "queue_order",
    "review_folder",
    "review_summary",
    "write_review_reports",
]

REVIEW_FORMAT = 1
REVIEW_STORE = "review.sqlite"
CLASS_FIELD = "class"


@dataclass(frozen=True)
class ReviewSettings:
    """Choices of `hemaclip review` (set before any data was looked at; none tuned on a test split)."""

    # Not white cells: counted and listed apart from the white-cell differential.
    outside_differential: tuple[str, ...] = ("platelet", "erythroblast")
    confidence: float = 0.95
    thumbnail_px: int = 96
    batch_size: int = 64
    queue_in_report: int = 60  # cells of the queue shown in report.html (all are in review.json)
    gallery_per_class: int = 48  # thumbnails per class gallery in report.html


DEFAULTS = ReviewSettings()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    source TEXT NOT NULL, file_sha1 TEXT NOT NULL, model_sha1 TEXT NOT NULL, n_cells INTEGER NOT NULL, error TEXT,
    retired TEXT, PRIMARY KEY (source, file_sha1, model_sha1));
CREATE TABLE IF NOT EXISTS cells (
    id INTEGER PRIMARY KEY, source TEXT NOT NULL, cell INTEGER NOT NULL, file_sha1 TEXT NOT NULL,
    model_sha1 TEXT NOT NULL, label TEXT NOT NULL, probability REAL NOT NULL, runner_up TEXT,
    abstain INTEGER NOT NULL, unfamiliar INTEGER, unfamiliarity REAL, attributes TEXT NOT NULL,
    sentence TEXT NOT NULL, box TEXT, cell_found INTEGER NOT NULL, embedding BLOB, class_probabilities BLOB, thumbnail BLOB,
    retired TEXT, UNIQUE (source, file_sha1, model_sha1, cell));
CREATE TABLE IF NOT EXISTS corrections (
    id INTEGER PRIMARY KEY AUTOINCREMENT, cell_id INTEGER NOT NULL REFERENCES cells(id), field TEXT NOT NULL,
    old TEXT NOT NULL, new TEXT NOT NULL, time TEXT NOT NULL, reviewer TEXT NOT NULL, model_sha1 TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS corrections_no_update BEFORE UPDATE ON corrections
    BEGIN SELECT RAISE(ABORT, 'corrections are append-only'); END;
CREATE TRIGGER IF NOT EXISTS corrections_no_delete BEFORE DELETE ON corrections
    BEGIN SELECT RAISE(ABORT, 'corrections are append-only'); END;
"""


TABLES = ("meta", "files", "cells", "corrections")
# Columns added after the first stores were written: (table, column, declaration), added on open.
ADDED_COLUMNS = (("files", "retired", "TEXT"), ("cells", "retired", "TEXT"))
LOCK_FILE = "review.lock"
MAX_CELL_ID = 2**63 - 1  # SQLite's INTEGER range


def check_review_store(path: Path) -> None:
    """Refuse (one line naming the file) a file that is not an intact review store: empty, not SQLite,
    damaged pages (``PRAGMA quick_check``) or missing tables. Reads only: the file is left as it was."""
    if path.is_dir():
        raise HemaclipError(f"{path}: a folder, not a review store")
    if path.stat().st_size == 0:
        raise HemaclipError(f"{path}: an empty file, not a review store (left as it is; move it away to start a new review)")
    try:
        db = sqlite3.connect(str(path), isolation_level=None)
        try:
            problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.DatabaseError as err:
        raise HemaclipError(f"{path}: not a review store or damaged ({err}); left as it is") from None
    if problems != ["ok"]:
        raise HemaclipError(f"{path}: the review store is damaged ({problems[0]}); left as it is: restore it from a backup")
    missing = [t for t in TABLES if t not in tables]
    if missing:
        raise HemaclipError(f"{path}: not a review store (no {', '.join(missing)} table); left as it is")


class ReviewStore:
    """The SQLite file of one review: described cells, their thumbnails and embeddings, and corrections.

    Thread-safe (one connection behind a lock), so the web server's worker threads can share it. An
    existing file is checked before anything is written to it (:func:`check_review_store`); only a new
    one is created. A `writer` (``hemaclip review``) holds ``review.lock`` beside the store until
    :meth:`close`, so a second writer is refused; the review server (corrections only) needs no lock.
    """

    def __init__(self, path: str | Path, *, create: bool = False, writer: bool = False) -> None:
        from filelock import FileLock, Timeout

        self.path = Path(path)
        exists = self.path.exists()
        if not create and not exists:
            raise HemaclipError(f"{self.path}: no review store here (run `hemaclip review FOLDER --out DIR` first)")
        if exists:
            check_review_store(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer_lock = None
        if writer:
            lock = FileLock(self.path.with_name(LOCK_FILE), blocking=False)
            try:
                lock.acquire()
            except Timeout:
                raise HemaclipError(f"{self.path.parent}: another `hemaclip review` is writing this review "
                                    f"({LOCK_FILE} is held); let it finish, then run again") from None
            self._writer_lock = lock
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            if not exists:
                self._db.executescript(_SCHEMA)
            with self._transaction():
                for table, column, kind in ADDED_COLUMNS:
                    if column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.DatabaseError as err:
            self._release()
            raise HemaclipError(f"{self.path}: not a review store ({err})") from None

    def _release(self) -> None:
        if self._writer_lock is not None:
            self._writer_lock.release()
            self._writer_lock = None

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        """The connection's lock; a database error (a page damaged after the store was opened) becomes
        one line naming the file."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as err:
                raise HemaclipError(f"{self.path}: the review store cannot be read or written ({err})") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._release()

    # -- meta ---------------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        with self._guarded():
            return {k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")}

    def set_meta(self, **values: Any) -> None:
        with self._guarded(), self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in values.items()])

    def apply_flag_bar(self, bar: float, reword: Callable[[str, dict[str, Any], bool], tuple[str, dict[str, Any]]]) -> int:
        """Flag every scored cell above `bar` unfamiliar (and the rest not): the folder's verdict decides the bar.

        A cell whose flag changes gets the sentence and stated attributes of its new flag from
        ``reword(label, attributes, unfamiliar)`` (e.g. :func:`reword_cell` bound to the describer), so a flag and its
        sentence never disagree: a cell only the stricter bar flags gets the plain warning, never the confident
        sentence written for the in-lab bar. Returns the number of cells whose flag changed."""
        with self._guarded(), self._transaction():
            rows = self._db.execute("SELECT id, label, attributes, unfamiliar, unfamiliarity FROM cells "
                                    "WHERE unfamiliarity IS NOT NULL AND retired IS NULL").fetchall()
            changed = 0
            for cell_id, label, attributes, unfamiliar, score in rows:
                flag = bool(score > float(bar))
                if unfamiliar is not None and bool(unfamiliar) == flag:
                    continue
                changed += 1
                sentence, reworded = reword(label, json.loads(attributes), flag)
                self._db.execute("UPDATE cells SET unfamiliar = ?, sentence = ?, attributes = ? WHERE id = ?",
                                 (int(flag), sentence, json.dumps(reworded), cell_id))
            return changed

    def _transaction(self) -> Any:
        store = self

        class _Tx:
            def __enter__(self) -> None:
                store._db.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind: Any, *_: Any) -> None:
                store._db.execute("COMMIT" if kind is None else "ROLLBACK")

        return _Tx()

    # -- cells ---------------------------------------------------------------------------------------

    def done_files(self, model_sha1: str) -> set[tuple[str, str]]:
        """(source, file SHA-1) of the files already described by this model (and still counted)."""
        with self._guarded():
            return {(s, h) for s, h in self._db.execute("SELECT source, file_sha1 FROM files WHERE model_sha1 = ? AND retired IS NULL",
                                                        (model_sha1,))}

    def retire_missing(self, present: dict[str, str], model_sha1: str) -> dict[str, int]:
        """Stop counting the cells of files that changed (another SHA-1 now) or are gone from `present`
        (source -> SHA-1 of what is in the folder now). Their rows and corrections stay in the store (a
        file changed back is counted again, with the same cell ids and corrections). Returns the numbers of
        files changed and removed and of cells no longer counted."""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out = {"changed": 0, "removed": 0, "cells": 0}
        with self._guarded(), self._transaction():
            rows = self._db.execute("SELECT source, file_sha1 FROM files WHERE model_sha1 = ? AND retired IS NULL", (model_sha1,)).fetchall()
            for source, file_sha1 in rows:
                if present.get(source) == file_sha1:
                    continue
                why = "changed" if source in present else "removed"
                out[why] += 1
                key = (source, file_sha1, model_sha1)
                self._db.execute("UPDATE files SET retired = ? WHERE source = ? AND file_sha1 = ? AND model_sha1 = ?", (f"{why} {stamp}", *key))
                out["cells"] += self._db.execute("UPDATE cells SET retired = ? WHERE source = ? AND file_sha1 = ? AND model_sha1 = ?",
                                                 (f"{why} {stamp}", *key)).rowcount
        return out

    def add_file(self, source: str, file_sha1: str, model_sha1: str, cells: Sequence[dict[str, Any]], error: str | None = None) -> None:
        """Record one described file and its cells (rows of :func:`cell_row`) in one transaction."""
        self.add_files([(source, file_sha1, model_sha1, cells, error)])

    def add_files(self, items: Sequence[tuple[str, str, str, Sequence[dict[str, Any]], str | None]]) -> None:
        """Record a batch of described files and their cells in one transaction.

        An upsert keyed on the cell's identity (source, file SHA-1, model SHA-1, cell number): a cell
        described again (a second run, a file changed back) keeps its id, so no correction is orphaned
        (``INSERT OR REPLACE`` deleted the row and inserted one with a new id)."""
        key = ("source", "file_sha1", "model_sha1", "cell")
        columns = ("source", "cell", "file_sha1", "model_sha1", "label", "probability", "runner_up", "abstain", "unfamiliar",
                   "unfamiliarity", "attributes", "sentence", "box", "cell_found", "embedding", "class_probabilities", "thumbnail")
        updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
        sql = (f"INSERT INTO cells({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
               f"ON CONFLICT({', '.join(key)}) DO UPDATE SET {updates}, retired = NULL")
        with self._guarded(), self._transaction():
            for source, file_sha1, model_sha1, cells, error in items:
                for row in cells:
                    self._db.execute(sql, tuple({**row, "source": source, "file_sha1": file_sha1, "model_sha1": model_sha1}[c] for c in columns))
                self._db.execute("INSERT INTO files(source, file_sha1, model_sha1, n_cells, error) VALUES (?, ?, ?, ?, ?) "
                                 "ON CONFLICT(source, file_sha1, model_sha1) DO UPDATE SET n_cells = excluded.n_cells, "
                                 "error = excluded.error, retired = NULL", (source, file_sha1, model_sha1, len(cells), error))

    def cells(self, with_embeddings: bool = False) -> list[dict[str, Any]]:
        """Every counted cell (not of a changed or removed file) with the model's reading and its current
        values (latest correction wins)."""
        extra = ", embedding, class_probabilities" if with_embeddings else ""
        with self._guarded():
            rows = self._db.execute(
                "SELECT id, source, cell, file_sha1, label, probability, runner_up, abstain, unfamiliar, unfamiliarity, "
                f"attributes, sentence, box, cell_found{extra} FROM cells WHERE retired IS NULL ORDER BY id").fetchall()
            latest = self._latest_corrections()
        out = []
        for row in rows:
            cell = dict(zip(("id", "source", "cell", "file_sha1", "label", "probability", "runner_up", "abstain", "unfamiliar",
                             "unfamiliarity", "attributes", "sentence", "box", "cell_found"), row[:14]))
            cell["attributes"] = json.loads(cell["attributes"])
            cell["box"] = json.loads(cell["box"]) if cell["box"] else None
            cell["abstain"], cell["cell_found"] = bool(cell["abstain"]), bool(cell["cell_found"])
            cell["unfamiliar"] = None if cell["unfamiliar"] is None else bool(cell["unfamiliar"])
            mine = latest.get(cell["id"], {})
            cell["current"] = {CLASS_FIELD: mine.get(CLASS_FIELD, cell["label"]),
                               **{n: mine.get(n, a["value"]) for n, a in cell["attributes"].items()}}
            cell["reviewed"] = bool(mine)
            if with_embeddings:
                cell["embedding"] = None if row[14] is None else np.frombuffer(row[14], dtype=np.float32)
                cell["class_probabilities"] = None if row[15] is None else np.frombuffer(row[15], dtype=np.float32)
            out.append(cell)
        return out

    def has_cell(self, cell_id: int) -> bool:
        """Whether `cell_id` is a counted cell of this review."""
        if not 0 <= int(cell_id) <= MAX_CELL_ID:
            return False
        with self._guarded():
            return self._db.execute("SELECT 1 FROM cells WHERE id = ? AND retired IS NULL", (int(cell_id),)).fetchone() is not None

    def thumbnail(self, cell_id: int) -> bytes | None:
        if not 0 <= int(cell_id) <= MAX_CELL_ID:
            return None
        with self._guarded():
            row = self._db.execute("SELECT thumbnail FROM cells WHERE id = ?", (int(cell_id),)).fetchone()
        return None if row is None else row[0]

    def errors(self) -> list[tuple[str, str]]:
        with self._guarded():
            return list(self._db.execute("SELECT source, error FROM files WHERE error IS NOT NULL AND retired IS NULL ORDER BY source"))

    # -- corrections ---------------------------------------------------------------------------------

    def _latest_corrections(self) -> dict[int, dict[str, str]]:
        latest: dict[int, dict[str, str]] = {}
        for cell_id, name, new in self._db.execute("SELECT cell_id, field, new FROM corrections ORDER BY id"):
            latest.setdefault(int(cell_id), {})[name] = new
        return latest

    def allowed_values(self) -> dict[str, list[str]]:
        """Field -> the values a reviewer may give it: the model's classes, each attribute's values."""
        meta = self.meta()
        return {CLASS_FIELD: list(meta.get("classes", [])), **{k: list(v) for k, v in meta.get("attribute_values", {}).items()}}

    def correct(self, cell_id: int, name: str, value: str, reviewer: str) -> dict[str, Any]:
        """Append one correction (or acceptance, when `value` equals the current value) and return it.

        Validated against the store's own vocabulary; committed before this returns.
        """
        allowed = self.allowed_values()
        if name not in allowed:
            raise HemaclipError(f"unknown field '{name}'; choose from {', '.join(allowed)}")
        if value not in allowed[name]:
            raise HemaclipError(f"unknown value '{value}' for {name}; choose from {', '.join(allowed[name])}")
        reviewer = " ".join(str(reviewer).split())[:80]
        if not reviewer:
            raise HemaclipError("a reviewer name is required for every correction")
        model_sha1 = str(self.meta().get("model_sha1", ""))
        if not 0 <= int(cell_id) <= MAX_CELL_ID:
            raise HemaclipError(f"no cell {cell_id} in this review")
        with self._guarded(), self._transaction():
            row = self._db.execute("SELECT label, attributes, retired FROM cells WHERE id = ?", (int(cell_id),)).fetchone()
            if row is None:
                raise HemaclipError(f"no cell {cell_id} in this review")
            if row[2] is not None:
                raise HemaclipError(f"cell {cell_id} is no longer counted: its file {row[2].split()[0]} since it was described "
                                    "(reload the review)")
            last = self._db.execute("SELECT new FROM corrections WHERE cell_id = ? AND field = ? ORDER BY id DESC LIMIT 1",
                                    (int(cell_id), name)).fetchone()
            model_value = row[0] if name == CLASS_FIELD else json.loads(row[1]).get(name, {}).get("value", "")
            old = last[0] if last else model_value
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            cursor = self._db.execute(
                "INSERT INTO corrections(cell_id, field, old, new, time, reviewer, model_sha1) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (int(cell_id), name, old, value, stamp, reviewer, model_sha1))
        return {"id": cursor.lastrowid, "cell_id": int(cell_id), "field": name, "old": old, "new": value, "time": stamp,
                "reviewer": reviewer, "model_sha1": model_sha1}

    def corrections(self) -> list[dict[str, Any]]:
        with self._guarded():
            rows = self._db.execute("SELECT id, cell_id, field, old, new, time, reviewer, model_sha1 FROM corrections ORDER BY id").fetchall()
        return [dict(zip(("id", "cell_id", "field", "old", "new", "time", "reviewer", "model_sha1"), r)) for r in rows]


# ------------------------------------------------------------------------------------------------ #
# describing a folder into the store
# ------------------------------------------------------------------------------------------------ #


def _thumbnail(image: Image.Image, box: Sequence[int] | None, size: int) -> bytes:
    crop = image.crop(tuple(box)) if box else image
    crop = crop.convert("RGB")
    crop.thumbnail((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def cell_row(description: Any, image: Image.Image | None, settings: ReviewSettings = DEFAULTS) -> dict[str, Any]:
    """The store's row of one :class:`hemaclip.tasks.describe.CellDescription` (thumbnail from `image`)."""
    d = description
    embedding = None if d.embedding is None else np.asarray(d.embedding, dtype=np.float32).tobytes()
    probs = None if d.class_probabilities is None else np.asarray(d.class_probabilities, dtype=np.float32).tobytes()
    return {
        "cell": int(d.cell), "label": d.label, "probability": float(d.probability), "runner_up": d.runner_up,
        "abstain": int(bool(d.abstain)), "unfamiliar": None if d.unfamiliar is None else int(bool(d.unfamiliar)),
        "unfamiliarity": d.unfamiliarity, "attributes": json.dumps(d.attributes), "sentence": d.sentence,
        "box": json.dumps(d.box) if d.box else None, "cell_found": int(bool(d.cell_found)), "embedding": embedding,
        "class_probabilities": probs,
        "thumbnail": _thumbnail(image, d.box if d.cell_found else None, settings.thumbnail_px) if image is not None else None,
    }


def reword_cell(describer: Any, label: str, attributes: dict[str, Any], unfamiliar: bool) -> tuple[str, dict[str, Any]]:
    """A stored cell's sentence and attributes (``{name: {value, probability, stated}}``) for a new unfamiliarity
    flag, by the describer's own rule (:meth:`hemaclip.tasks.describe.Describer.sentence_for`)."""
    values = {n: a["value"] for n, a in attributes.items()}
    probabilities = {n: float(a["probability"]) for n, a in attributes.items()}
    sentence, stated = describer.sentence_for(label, values, probabilities, unfamiliar)
    return sentence, {n: {**a, "stated": stated.get(n) == a["value"]} for n, a in attributes.items()}


def _grouped_by_source(descriptions: Iterable[Any]) -> Iterator[tuple[str, list[Any]]]:
    """Consecutive descriptions of the same file, as (source, [descriptions])."""
    current: str | None = None
    group: list[Any] = []
    for d in descriptions:
        if current is not None and d.source != current:
            yield current, group
            group = []
        current = d.source
        group.append(d)
    if current is not None:
        yield current, group


def review_folder(
    describer: Describer,
    model_sha1: str,
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    settings: ReviewSettings = DEFAULTS,
    progress: bool = True,
    adapter: CorrectionAdapter | None = None,
    adapter_id: str | None = None,
) -> ReviewStore:
    """Describe every image under `inputs` into ``<out>/review.sqlite`` (files already described by this
    model are skipped), committing a batch of files at a time. Returns the open store, which holds the
    review's writer lock until it is closed (a second writer is refused meanwhile).

    The review counts what is under `inputs` now: cells of files changed or removed since an earlier run
    stop being counted (meta ``changes``: files changed, removed, cells no longer counted); corrections of
    unchanged files are kept, and every correction stays in the store.

    With `adapter` (:class:`hemaclip.tasks.adapter.CorrectionAdapter`, identified by `adapter_id`), each
    cell's class is read through it; a review folder keeps one model and one adapter throughout."""
    out = Path(out)
    store = ReviewStore(out / REVIEW_STORE, create=True, writer=True)
    try:
        return _review_into(store, describer, model_sha1, inputs, out, settings, progress, adapter, adapter_id)
    except BaseException:
        store.close()
        raise


def _review_into(store: ReviewStore, describer: Describer, model_sha1: str, inputs: Sequence[str | Path], out: Path,
                 settings: ReviewSettings, progress: bool, adapter: CorrectionAdapter | None, adapter_id: str | None) -> ReviewStore:
    from hemaclip.cache import file_sha1
    from hemaclip.data.preprocess import decode_image
    from hemaclip.tasks.describe import iter_image_paths

    meta = store.meta()
    if meta.get("model_sha1") not in (None, model_sha1):
        raise HemaclipError(f"{out} holds a review made with another model (SHA-1 {str(meta['model_sha1'])[:10]}); "
                            "choose another --out")
    if meta.get("model_sha1") is not None and meta.get("adapter") != adapter_id:
        raise HemaclipError(f"{out} holds a review made {'with adapter ' + str(meta.get('adapter')) if meta.get('adapter') else 'without an adapter'}; "
                            "choose another --out")
    readout = describer.readout
    if adapter is not None and list(adapter.classes) != list(readout.class_names):
        raise HemaclipError("the adapter was fitted for other classes than this model's")
    store.set_meta(format=REVIEW_FORMAT, model_sha1=model_sha1, classes=list(readout.class_names),
                   attribute_values={n: list(v) for n, v in readout.attribute_values.items()},
                   inputs=[str(p) for p in inputs], calibrated=bool(describer.calibrated),
                   familiarity=describer.familiarity is not None, adapter=adapter_id)
    files = list(iter_image_paths(inputs))
    if not files:
        raise HemaclipError(f"no image files found in {', '.join(str(p) for p in inputs)}")
    # Sources are stored as path_to_text: a name that is not valid UTF-8 gets \xNN escapes (SQLite takes UTF-8 only).
    hashes = {path_to_text(p): file_sha1(p) if p.is_file() else "" for p in files}
    changes = store.retire_missing(hashes, model_sha1)
    done = store.done_files(model_sha1)
    todo = [p for p in files if (path_to_text(p), hashes[path_to_text(p)]) not in done]
    pending: list[tuple[str, str, str, list[dict[str, Any]], str | None]] = []
    described = describer.describe_paths(todo, batch_size=settings.batch_size, progress=progress)
    if adapter is not None:
        from hemaclip.tasks.adapter import adapt_description

        described = (adapt_description(adapter, d, describer.abstain_below) for d in described)
    for name, group in _grouped_by_source(described):
        source = path_to_text(name)
        if group[0].error is not None:
            pending.append((source, hashes.get(source, ""), model_sha1, [], group[0].error))
        else:
            image = decode_image(Path(name))
            pending.append((source, hashes[source], model_sha1, [cell_row(d, image, settings) for d in group], None))
        if len(pending) >= settings.batch_size:
            store.add_files(pending)
            pending = []
    if pending:
        store.add_files(pending)
    if describer.familiarity is not None:
        scores = [c["unfamiliarity"] for c in store.cells() if c["unfamiliarity"] is not None]
        shift = describer.familiarity.folder_shift(scores)
        # a shifted folder's cells are judged by the stricter bar (familiarity.SHIFTED_FOLDER_QUANTILE)
        store.apply_flag_bar(describer.familiarity.bar_for(shift), reword=functools.partial(reword_cell, describer))
        store.set_meta(folder_shift=shift.to_dict() if shift is not None else None)
    store.set_meta(described_now=len(todo), reused=len(files) - len(todo), changes=changes)
    return store


# ------------------------------------------------------------------------------------------------ #
# summary: differential, queue, attributes per class
# ------------------------------------------------------------------------------------------------ #


def queue_order(cells: Sequence[dict[str, Any]]) -> list[int]:
    """Cell ids in review order: unfamiliar first (most unfamiliar first), then lowest class probability."""
    def key(c: dict[str, Any]) -> tuple[int, float, int]:
        if c.get("unfamiliar"):
            return (0, -float(c.get("unfamiliarity") or 0.0), int(c["id"]))
        return (1, float(c["probability"]), int(c["id"]))

    return [int(c["id"]) for c in sorted(cells, key=key)]


def _reason(cell: dict[str, Any]) -> str:
    if cell.get("unfamiliar"):
        return f"unfamiliar (score {cell['unfamiliarity']:.3g})"
    if cell.get("abstain"):
        return f"abstains (p = {cell['probability']:.2f})"
    return f"p = {cell['probability']:.2f}, runner-up {cell.get('runner_up')}"


def review_summary(store: ReviewStore, settings: ReviewSettings = DEFAULTS, cells: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The review as plain data: differential with Wilson intervals, counts outside it, the queue, the
    attribute summary per class and the folder-level warning; current values (corrections applied)."""
    from hemaclip.metrics.statistics import share_intervals

    meta = store.meta()
    cells = store.cells() if cells is None else cells
    labels = [c["current"][CLASS_FIELD] for c in cells]
    classes = [c for c in meta.get("classes", []) if c not in settings.outside_differential]
    counted = Counter(label for label in labels if label not in settings.outside_differential)
    differential = share_intervals({c: counted.get(c, 0) for c in classes}, settings.confidence)
    outside = {c: sum(1 for label in labels if label == c) for c in settings.outside_differential if c in meta.get("classes", [])}
    by_id = {c["id"]: c for c in cells}
    queue = [{"id": i, "label": by_id[i]["current"][CLASS_FIELD], "model_label": by_id[i]["label"],
              "probability": by_id[i]["probability"], "unfamiliar": by_id[i]["unfamiliar"],
              "unfamiliarity": by_id[i]["unfamiliarity"], "reviewed": by_id[i]["reviewed"], "reason": _reason(by_id[i]),
              "source": by_id[i]["source"], "cell": by_id[i]["cell"]} for i in queue_order(cells)]
    attributes: dict[str, dict[str, Any]] = {}
    for label in sorted(set(labels)):
        mine = [c for c in cells if c["current"][CLASS_FIELD] == label]
        rows = {}
        for name in ATTRIBUTE_NAMES:
            values = Counter(c["current"].get(name) for c in mine if name in c["current"])
            if values:
                value, n = values.most_common(1)[0]
                rows[name] = {"value": value, "share": n / sum(values.values()), "counts": dict(values)}
        attributes[label] = {"cells": len(mine), "attributes": rows}
    shift = meta.get("folder_shift")
    flagged = sum(1 for c in cells if c.get("unfamiliar"))
    return {
        "format": REVIEW_FORMAT,
        "model_sha1": meta.get("model_sha1"),
        "inputs": meta.get("inputs", []),
        "cells": len(cells),
        "white_cells": int(sum(counted.values())),
        "reviewed": sum(1 for c in cells if c["reviewed"]),
        "corrected": sum(1 for c in cells if c["current"][CLASS_FIELD] != c["label"]),
        "differential": differential,
        "interval": f"{settings.confidence:.0%} Wilson score interval per class (binomial share of the white cells)",
        "outside_differential": outside,
        "unfamiliar": None if not meta.get("familiarity") else flagged,
        "folder_shift": shift,
        "warning": shift.get("message") if isinstance(shift, dict) and shift.get("shifted") else None,
        "calibrated": meta.get("calibrated"),
        "queue": queue,
        "attributes_per_class": attributes,
        "errors": [{"source": s, "error": e} for s, e in store.errors()],
        # since the previous run: files changed, removed, and their cells no longer counted
        "changes": meta.get("changes"),
        "classes": meta.get("classes", []),
        "attribute_values": meta.get("attribute_values", {}),
    }


# ------------------------------------------------------------------------------------------------ #
# reports: review.json, cells.csv, report.html (self-contained)
# ------------------------------------------------------------------------------------------------ #


def _data_url(jpeg: bytes | None) -> str:
    return "" if not jpeg else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _card(store: ReviewStore, cell: dict[str, Any], note: str) -> str:
    src = _data_url(store.thumbnail(cell["id"]))
    cls = " unfamiliar" if cell.get("unfamiliar") else ""
    return (f'<figure class="cell{cls}"><img src="{src}" alt="cell {cell["id"]}"><figcaption><b>#{cell["id"]}</b> '
            f'{html.escape(str(cell["current"][CLASS_FIELD]))}<br><span>{html.escape(note)}</span></figcaption></figure>')


_STYLE = """body{font-family:system-ui,sans-serif;max-width:70rem;margin:1.5rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}th,td{border:1px solid #ccc;padding:.2rem .5rem;text-align:left}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}.warning{color:#a05a00;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:.4rem}.cell{margin:0;width:104px;font-size:.72rem;border:1px solid #ddd;padding:2px}
.cell img{width:96px;height:96px;object-fit:contain;display:block}.cell.unfamiliar{border:2px dashed #d62728}
.muted{color:#666;font-size:.85rem}"""


def write_review_reports(store: ReviewStore, out: str | Path, settings: ReviewSettings = DEFAULTS) -> dict[str, Any]:
    """Write ``review.json``, ``cells.csv`` and a self-contained ``report.html`` into `out`, each atomically."""
    import csv

    from hemaclip.io import atomic_write, display_path, write_json

    out = Path(out)
    cells = store.cells()
    summary = review_summary(store, settings, cells)
    for q in summary["queue"]:
        q["source"] = display_path(q["source"])
    summary["inputs"] = [display_path(p) for p in summary["inputs"]]
    write_json(out / "review.json", summary)
    names = [n for n in ATTRIBUTE_NAMES if any(n in c["attributes"] for c in cells)]
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(["id", "source", "cell", "file_sha1", "model_label", "probability", "label", "reviewed", "unfamiliar",
                     "unfamiliarity", "box", *names])
    for c in cells:
        writer.writerow([c["id"], display_path(c["source"]), c["cell"], c["file_sha1"], c["label"], c["probability"],
                         c["current"][CLASS_FIELD], int(c["reviewed"]), "" if c["unfamiliar"] is None else int(c["unfamiliar"]),
                         "" if c["unfamiliarity"] is None else c["unfamiliarity"], json.dumps(c["box"]),
                         *[c["current"].get(n, "") for n in names]])
    with atomic_write(out / "cells.csv") as handle:
        handle.write(table.getvalue())
    with atomic_write(out / "report.html") as handle:
        handle.write(_report_html(store, summary, cells, settings))
    return summary


def _report_html(store: ReviewStore, summary: dict[str, Any], cells: Sequence[dict[str, Any]], settings: ReviewSettings) -> str:
    e = html.escape
    by_id = {c["id"]: c for c in cells}
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>hemaclip review</title><style>{_STYLE}</style></head><body>",
             "<h1>hemaclip review</h1>",
             f"<p class='muted'>Folder: {e(', '.join(summary['inputs']))} &middot; model SHA-1 {e(str(summary['model_sha1'])[:12])} &middot; "
             f"{summary['cells']} cells ({summary['white_cells']} white cells in the differential), {summary['reviewed']} reviewed, "
             f"{summary['corrected']} class corrections. Research software: not a diagnosis.</p>"]
    if summary["warning"]:
        parts.append(f"<p class='warning'>{e(summary['warning'])}</p>")
    if summary["calibrated"] is False:
        parts.append("<p class='warning'>Probabilities are uncalibrated for this checkpoint (T = 1).</p>")
    if summary["unfamiliar"] is None:
        parts.append("<p class='muted'>No familiarity file beside the checkpoint: no cell is flagged as unfamiliar "
                     "(run <code>hemaclip calibrate</code>); the queue is ordered by class probability alone.</p>")
    else:
        parts.append(f"<p class='muted'>{summary['unfamiliar']} of {summary['cells']} cells flagged unfamiliar.</p>")
    parts.append(f"<h2>Differential count</h2><table><thead><tr><th>class</th><th>cells</th><th>share</th><th>{e(summary['interval'])}</th>"
                 "</tr></thead><tbody>")
    for name, row in summary["differential"].items():
        share = "&ndash;" if row["count"] == 0 and summary["white_cells"] == 0 else f"{row['share']:.1%}"
        ci = "&ndash;" if summary["white_cells"] == 0 else f"[{row['low']:.1%}, {row['high']:.1%}]"
        parts.append(f"<tr><td>{e(name)}</td><td class='num'>{row['count']}</td><td class='num'>{share}</td><td class='num'>{ci}</td></tr>")
    parts.append("</tbody></table>")
    if summary["outside_differential"]:
        parts.append("<p class='muted'>Outside the white-cell differential: " + ", ".join(
            f"{e(k)} {v}" for k, v in summary["outside_differential"].items()) + "</p>")
    shown = summary["queue"][: settings.queue_in_report]
    parts.append(f"<h2>Review queue</h2><p class='muted'>Unfamiliar cells first, then lowest class probability; the first {len(shown)} "
                 f"of {len(summary['queue'])} (all are in review.json).</p><div class='grid'>")
    parts.extend(_card(store, by_id[q["id"]], q["reason"]) for q in shown)
    parts.append("</div><h2>Cells per class</h2>")
    for label in sorted({c["current"][CLASS_FIELD] for c in cells}):
        mine = [c for c in cells if c["current"][CLASS_FIELD] == label]
        parts.append(f"<h3>{e(label)} ({len(mine)})</h3><div class='grid'>")
        parts.extend(_card(store, c, f"p = {c['probability']:.2f}") for c in mine[: settings.gallery_per_class])
        parts.append("</div>")
        if len(mine) > settings.gallery_per_class:
            parts.append(f"<p class='muted'>and {len(mine) - settings.gallery_per_class} more</p>")
    parts.append("<h2>Attributes per class</h2><p class='muted'>Most common value of each WBCAtt attribute among the cells of a class, "
                 "with its share.</p><table><thead><tr><th>class</th><th>cells</th>"
                 + "".join(f"<th>{e(n.replace('_', ' '))}</th>" for n in ATTRIBUTE_NAMES) + "</tr></thead><tbody>")
    for label, block in summary["attributes_per_class"].items():
        cols = "".join(f"<td>{e(block['attributes'][n]['value'])} ({block['attributes'][n]['share']:.0%})</td>"
                       if n in block["attributes"] else "<td></td>" for n in ATTRIBUTE_NAMES)
        parts.append(f"<tr><td>{e(label)}</td><td class='num'>{block['cells']}</td>{cols}</tr>")
    parts.append("</tbody></table>")
    if summary["errors"]:
        parts.append("<h2>Files that could not be read</h2><ul>" + "".join(
            f"<li>{e(x['source'])}: {e(x['error'])}</li>" for x in summary["errors"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ #
# export: reviewed cells as a `folder` dataset, to feed back into hemaclip
# ------------------------------------------------------------------------------------------------ #


def _split_of(file_sha1: str) -> str:
    """A fixed 70/10/20 split by the source file's hash: the cells of one picture always share a split."""
    bucket = int(file_sha1[:8], 16) % 10
    return "train" if bucket < 7 else "val" if bucket < 8 else "test"


def export_reviewed(store: ReviewStore, dest: str | Path, settings: ReviewSettings = DEFAULTS) -> dict[str, int]:
    """Write the reviewed white cells as a `folder` dataset: ``DEST/<class>/cell-<id>.png`` (the cell's crop
    from its source file) and ``DEST/attributes.csv`` (path, the 11 current attribute values, split).

    Only cells a reviewer touched are exported; platelets and erythroblasts are left out (the folder format
    gives every row the 11 white-cell attributes). The folder is built beside `dest` and renamed into place,
    so it is either complete or absent. Returns the count per class."""
    import csv
    import os
    import shutil
    import tempfile

    from hemaclip.data.preprocess import decode_image

    dest = Path(dest)
    if dest.exists():
        raise HemaclipError(f"{dest} already exists: choose a new folder for the export")
    cells = [c for c in store.cells() if c["reviewed"] and c["current"][CLASS_FIELD] not in settings.outside_differential]
    if not cells:
        raise HemaclipError(f"{store.path}: no reviewed white cells to export")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        rows = []
        for c in cells:
            label = c["current"][CLASS_FIELD]
            image = decode_image(text_to_path(c["source"]))
            crop = image.crop(tuple(c["box"])) if c["box"] and c["cell_found"] else image
            (tmp / label).mkdir(exist_ok=True)
            crop.save(tmp / label / f"cell-{c['id']}.png")
            rows.append({"path": f"{label}/cell-{c['id']}.png", **{n: c["current"][n] for n in ATTRIBUTE_NAMES},
                         "split": _split_of(c["file_sha1"])})
        with (tmp / "attributes.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", *ATTRIBUTE_NAMES, "split"])
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dict(Counter(c["current"][CLASS_FIELD] for c in cells))
