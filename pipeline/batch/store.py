"""Durable batch state, in the job's checkpoint file beside the row results.

Each chunk of requests moves through states, each committed before the next step:

    planned    its request file is written and its rows are recorded (the intent)
    uploaded   the provider holds the file (OpenAI-style: its file id is recorded)
    submitted  the batch exists (its batch id is recorded); polled until it ends
    collected  its results are in the checkpoint as row results
    failed     the provider refused the batch (validation errors): nothing recorded
    dropped    planned but never uploaded when the run died: its rows are planned again

`batch_items` maps each short custom_id of a chunk to the row it stands for (row key,
request hash, row index, attempt), so a result line finds its row without the raw
row id ever leaving the machine.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_chunks (
    chunk_id INTEGER PRIMARY KEY,
    api TEXT NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    requests INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    path TEXT,
    file_id TEXT,
    batch_id TEXT,
    status TEXT,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    detail TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS batch_items (
    chunk_id INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    row_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    row_index INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    PRIMARY KEY (chunk_id, custom_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batch_items_by_row ON batch_items (row_key);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
OPEN_STATES = ("planned", "uploaded", "submitted")
_LOOKUP_CHUNK = 900


@dataclass(frozen=True)
class Chunk:
    chunk_id: int
    api: str
    model: str
    state: str
    requests: int
    bytes: int
    path: str | None
    file_id: str | None
    batch_id: str | None
    status: str | None
    done: int
    failed: int
    detail: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Item:
    custom_id: str
    row_key: str
    request_hash: str
    row_index: int
    attempt: int


class BatchStore:
    """Batch tables in the checkpoint's SQLite file, on their own connection."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def job_fingerprint(self) -> str:
        """A random id for this job's checkpoint, carried in each batch's metadata."""
        row = self._db.execute("SELECT value FROM meta WHERE name = 'batch_job'").fetchone()
        if row:
            return str(row[0])
        value = secrets.token_hex(8)
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('batch_job', ?)", (value,))
        return self.job_fingerprint()

    def set_meta(self, name: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def add_chunk(self, api: str, model: str, path: Path, size: int, items: list[Item]) -> Chunk:
        """Record the intent: the chunk and its rows, atomically, before any upload."""
        now = time.time()
        with self._db:
            self._db.execute("BEGIN")
            cursor = self._db.execute(
                "INSERT INTO batch_chunks (api, model, state, requests, bytes, path, "
                "created_at, updated_at) VALUES (?, ?, 'planned', ?, ?, ?, ?, ?)",
                (api, model, len(items), size, str(path), now, now),
            )
            chunk_id = int(cursor.lastrowid or 0)
            self._db.executemany(
                "INSERT INTO batch_items VALUES (?, ?, ?, ?, ?, ?)",
                (
                    (chunk_id, i.custom_id, i.row_key, i.request_hash, i.row_index, i.attempt)
                    for i in items
                ),
            )
        return self.chunk(chunk_id)

    def update(self, chunk_id: int, **fields: object) -> Chunk:
        fields["updated_at"] = time.time()
        names = ", ".join(f"{name} = ?" for name in fields)
        self._db.execute(
            f"UPDATE batch_chunks SET {names} WHERE chunk_id = ?", (*fields.values(), chunk_id)
        )
        return self.chunk(chunk_id)

    def chunk(self, chunk_id: int) -> Chunk:
        row = self._db.execute(
            "SELECT * FROM batch_chunks WHERE chunk_id = ?", (chunk_id,)
        ).fetchone()
        return Chunk(*row)

    def chunks(self, states: Iterable[str] | None = None) -> list[Chunk]:
        if states is None:
            rows = self._db.execute("SELECT * FROM batch_chunks ORDER BY chunk_id").fetchall()
        else:
            wanted = list(states)
            marks = ", ".join("?" * len(wanted))
            rows = self._db.execute(
                f"SELECT * FROM batch_chunks WHERE state IN ({marks}) ORDER BY chunk_id", wanted
            ).fetchall()
        return [Chunk(*row) for row in rows]

    def open_chunks(self) -> list[Chunk]:
        return self.chunks(OPEN_STATES)

    def items(self, chunk_id: int, custom_ids: list[str]) -> dict[str, Item]:
        found: dict[str, Item] = {}
        for start in range(0, len(custom_ids), _LOOKUP_CHUNK):
            part = custom_ids[start : start + _LOOKUP_CHUNK]
            marks = ", ".join("?" * len(part))
            for row in self._db.execute(
                "SELECT custom_id, row_key, request_hash, row_index, attempt FROM batch_items "
                f"WHERE chunk_id = ? AND custom_id IN ({marks})",
                (chunk_id, *part),
            ):
                found[row[0]] = Item(*row)
        return found

    def all_items(self, chunk_id: int) -> Iterator[Item]:
        for row in self._db.execute(
            "SELECT custom_id, row_key, request_hash, row_index, attempt FROM batch_items "
            "WHERE chunk_id = ?",
            (chunk_id,),
        ):
            yield Item(*row)

    def attempts(self, keys: list[str]) -> dict[tuple[str, str], int]:
        """Batch attempts made so far per (row key, request hash), in collected chunks."""
        found: dict[tuple[str, str], int] = {}
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            part = keys[start : start + _LOOKUP_CHUNK]
            marks = ", ".join("?" * len(part))
            for key, request_hash, attempt in self._db.execute(
                "SELECT i.row_key, i.request_hash, max(i.attempt) FROM batch_items i "
                "JOIN batch_chunks c USING (chunk_id) "
                f"WHERE c.state = 'collected' AND i.row_key IN ({marks}) "
                "GROUP BY i.row_key, i.request_hash",
                part,
            ):
                found[(key, request_hash)] = int(attempt)
        return found

    def drop_items(self, chunk_id: int) -> None:
        self._db.execute("DELETE FROM batch_items WHERE chunk_id = ?", (chunk_id,))


def read_chunks(path: Path) -> list[Chunk]:
    """Every chunk, read without writing (safe beside a running job; no tables: none)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute("SELECT * FROM batch_chunks ORDER BY chunk_id").fetchall()
    except sqlite3.OperationalError:
        return []  # a checkpoint no batch run has touched
    finally:
        db.close()
    return [Chunk(*row) for row in rows]


def open_batches(path: Path) -> int:
    """Batches submitted and not yet collected, by the checkpoint at `path` (none when
    it does not exist, or is damaged: opening it for a run says so, and how to fix it)."""
    if not path.exists():
        return 0
    try:
        chunks = read_chunks(path)
    except sqlite3.DatabaseError:
        return 0
    return sum(chunk.state == "submitted" for chunk in chunks)


def describe_errors(errors: list[dict[str, object]]) -> str:
    """Line errors as stored in a chunk's detail and shown to the user."""
    return orjson.dumps(errors).decode()
