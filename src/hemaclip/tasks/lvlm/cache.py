"""Every request and its answer, kept on disk in SQLite, so a run resumes after a crash and scoring again
costs no request.

Why SQLite: one row is written per answer inside a transaction, and SQLite's journal makes that row
either fully there or not there at all, also after ``kill -9`` or a power cut; a JSONL file would need
its own repair of a torn last line. The key is a hash of what decides the answer (model, protocol,
query image SHA-1, the prompt with images as SHA-1 stand-ins, and the sampling settings), never of
credentials: the API key is not part of any request body and is never written here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CACHE_FILE", "CachedAnswer", "ResponseCache", "request_key"]

CACHE_FILE = "cache.sqlite"
_FORMAT = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    protocol TEXT NOT NULL,
    image_sha1 TEXT NOT NULL,
    request TEXT NOT NULL,
    response TEXT NOT NULL,
    content TEXT,
    attempts INTEGER NOT NULL,
    seconds REAL NOT NULL,
    created TEXT NOT NULL
);
"""


def request_key(model: str, protocol: str, image_sha1: str, keyed_request: Mapping[str, Any]) -> str:
    """SHA-256 of model, protocol, query image and the request (images as SHA-1 stand-ins)."""
    payload = json.dumps({"model": model, "protocol": protocol, "image_sha1": image_sha1, "request": keyed_request},
                         sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    """One cached answer: the assistant's text, the full JSON body, how many attempts and seconds it took."""

    key: str
    content: str | None
    response: dict[str, Any]
    attempts: int
    seconds: float


class ResponseCache:
    """The SQLite file of one run folder: `get` by key, `put` one answer per transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("PRAGMA synchronous=FULL")
        with self._db:
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta (name, value) VALUES ('format', ?)", (str(_FORMAT),))

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def get(self, key: str) -> CachedAnswer | None:
        row = self._db.execute("SELECT key, content, response, attempts, seconds FROM responses WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        return CachedAnswer(key=row[0], content=row[1], response=json.loads(row[2]), attempts=int(row[3]), seconds=float(row[4]))

    def put(self, key: str, *, model: str, protocol: str, image_sha1: str, keyed_request: Mapping[str, Any],
            response: Mapping[str, Any], content: str | None, attempts: int, seconds: float) -> None:
        """Store one answer in its own transaction (a second answer for the same key is ignored)."""
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO responses (key, model, protocol, image_sha1, request, response, content, attempts, "
                "seconds, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, model, protocol, image_sha1, json.dumps(keyed_request, sort_keys=True), json.dumps(response),
                 content, int(attempts), float(seconds), now))
