"""A content-addressed cache of model outputs in one sqlite file (DESIGN §6).

`ResultCache(path)` maps a key (a hex digest the caller builds from the model hash, every
parameter and the input: see `content_key`) to bytes, or to a JSON value with `get_json` /
`put_json`. Several processes may share the file (WAL mode, a 30 s busy timeout). A cache that
cannot be opened or written (a read-only or missing directory, a corrupt file) is skipped
silently: a cache only ever saves time, it never fails a run.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any


def content_key(*parts: Any) -> str:
    """sha256 of the canonical JSON of `parts` (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResultCache:
    """Bytes (or JSON values) by key in a sqlite file; unusable means silently skipped."""

    def __init__(self, path: str | Path, table: str = "results") -> None:
        if not table.isidentifier():
            raise ValueError(f"bad table name {table!r}")
        self.path = Path(path)
        self.table = table
        self._db: sqlite3.Connection | None = None
        self.broken = False
        self.hits = 0
        self.misses = 0

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is None and not self.broken:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=30)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.table} "
                    "(key TEXT PRIMARY KEY, value BLOB NOT NULL, created REAL NOT NULL)"
                )
                db.commit()
                self._db = db
            except (OSError, sqlite3.Error):
                self.broken = True
        return self._db

    def get(self, key: str) -> bytes | None:
        db = self._connect()
        row = None
        if db is not None:
            try:
                row = db.execute(f"SELECT value FROM {self.table} WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error:
                row = None
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        return bytes(row[0])

    def put(self, key: str, value: bytes) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        db = self._connect()
        if db is None or not items:
            return
        now = time.time()
        try:
            db.executemany(
                f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?, ?)",
                [(k, sqlite3.Binary(v), now) for k, v in items],
            )
            db.commit()
        except sqlite3.Error:
            pass

    def get_json(self, key: str) -> Any:
        raw = self.get(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def put_json(self, key: str, value: Any) -> None:
        self.put(key, json.dumps(value, ensure_ascii=False).encode("utf-8"))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
