"""A cache of answers shared by every job on this machine (opt-in: `cache:` in the job,
or `run --cache DIR`).

Keyed by the provider (preset and endpoint), the model and the request hash (which
covers the model, params, templates and the row's values): a request any job already
got an answer to is answered from here before a run plans anything, recorded with
cost 0 and 0 attempts (so it is counted as reused, not paid), and every answer a run
pays for is added when its output is assembled. One SQLite file in WAL mode, so
concurrent jobs read and add safely; the least recently used answers beyond
`cache.max_entries` are dropped.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from pipeline.checkpoint import Checkpoint
from pipeline.columns import STORED_COLUMNS
from pipeline.job import ResolvedJob
from pipeline.spec import CacheSpec

_NAMES = [c.name for c in STORED_COLUMNS]
_COST, _ATTEMPTS, _ERROR = (_NAMES.index(n) for n in ("cost_usd", "attempts", "error"))
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS answers (
    cache_key TEXT PRIMARY KEY, {", ".join(_NAMES)}, used_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS answers_used ON answers (used_at);
"""
LOOKUP_CHUNK = 900  # under SQLite's smallest limit of bound parameters


def cache_file(spec: CacheSpec) -> Path:
    return Path(spec.path).expanduser() / "answers.sqlite"


@contextmanager
def _open(spec: CacheSpec) -> Iterator[sqlite3.Connection]:
    path = cache_file(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path, isolation_level=None, timeout=30.0)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        yield db


def _provider_key(job: ResolvedJob) -> bytes:
    settings = job.settings
    return f"{settings.name}\n{settings.base_url}\n{settings.model}\n".encode()


def cache_key(provider: bytes, request_hash: str) -> str:
    return hashlib.blake2b(provider + request_hash.encode(), digest_size=16).hexdigest()


def _missing_rows(job: ResolvedJob, checkpoint: Checkpoint) -> Iterator[list[tuple[str, str]]]:
    """(key, request hash) of the rows without a result for their current request."""
    plan = job.plan(checkpoint)
    for keys, hashes in plan.current_hashes():
        finished = checkpoint.finished(keys)
        yield [
            (key, request_hash)
            for key, request_hash in zip(keys, hashes, strict=True)
            if (found := finished.get(key)) is None or found.request_hash != request_hash
        ]


def fill_from_cache(job: ResolvedJob, checkpoint: Checkpoint) -> list[str]:
    """Record the cached answers of the rows that have none; returns a note."""
    spec = job.spec.cache
    if spec is None:
        return []
    provider, found = _provider_key(job), 0
    with _open(spec) as db:
        for missing in _missing_rows(job, checkpoint):
            for start in range(0, len(missing), LOOKUP_CHUNK):
                found += _fill(db, checkpoint, provider, missing[start : start + LOOKUP_CHUNK])
    if not found:
        return []
    return [f"cache: {found:,} answer(s) reused from {spec.path} at no cost"]


def _fill(
    db: sqlite3.Connection, checkpoint: Checkpoint, provider: bytes, rows: list[tuple[str, str]]
) -> int:
    wanted = {cache_key(provider, request_hash): (key, request_hash) for key, request_hash in rows}
    marks = ", ".join("?" * len(wanted))
    cached = db.execute(
        f"SELECT cache_key, {', '.join(_NAMES)} FROM answers WHERE cache_key IN ({marks})",
        list(wanted),
    ).fetchall()
    records = []
    for hit in cached:
        values = list(hit[1:])
        values[_COST], values[_ATTEMPTS] = 0.0, 0  # not paid for by this job
        records.append((*wanted[hit[0]], *values))
    checkpoint.replace_results(records)
    if cached:
        db.execute(
            f"UPDATE answers SET used_at = ? WHERE cache_key IN ({', '.join('?' * len(cached))})",
            [time.time(), *(hit[0] for hit in cached)],
        )
    return len(records)


def remember_answers(job: ResolvedJob, checkpoint: Checkpoint) -> None:
    """Add the answers this job paid for to the cache, then bound its size."""
    spec = job.spec.cache
    if spec is None:
        return
    provider = _provider_key(job)
    plan = job.plan(checkpoint)
    with _open(spec) as db:
        for keys, hashes in plan.current_hashes():
            current = dict(zip(keys, hashes, strict=True))
            rows = [
                (cache_key(provider, row[1]), *row[2:], time.time())
                for row in checkpoint.stored_rows(keys)
                if current.get(row[0]) == row[1] and _paid_answer(row[2:])
            ]
            with db:
                db.execute("BEGIN")
                db.executemany(
                    f"INSERT OR IGNORE INTO answers VALUES ({', '.join('?' * (len(_NAMES) + 2))})",
                    rows,
                )
        _bound(db, spec.max_entries)


def _paid_answer(values: tuple[Any, ...]) -> bool:
    return values[_ERROR] is None and bool(values[_ATTEMPTS])


def _bound(db: sqlite3.Connection, max_entries: int) -> None:
    """Drop the least recently used answers beyond the limit."""
    with db:
        db.execute("BEGIN IMMEDIATE")
        (count,) = db.execute("SELECT count(*) FROM answers").fetchone()
        if count > max_entries:
            db.execute(
                "DELETE FROM answers WHERE cache_key IN "
                "(SELECT cache_key FROM answers ORDER BY used_at LIMIT ?)",
                (count - max_entries,),
            )
