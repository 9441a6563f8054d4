"""The durable record of finished rows: SQLite in WAL mode beside the output.

Why SQLite: one file, atomic multi-row commits, readers (`pipeline status`, the final
assembly) that never block the writer, and point look-ups by row key, so neither a
rerun nor the final assembly has to hold a million results in memory.

Each answer is also appended to a journal the moment it lands (one write(2), no
fsync), and the journal is folded into SQLite in batches about twice a second. A
kill -9 therefore loses no answer that arrived: the next run replays the journal
before it plans anything. Only requests still in flight at the kill are sent again.

A row is keyed by its id AND the hash of the exact request it was: a finished row is
reused only while its request is unchanged.
"""

from __future__ import annotations

import mmap
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pipeline.columns import JSON_COLUMNS, STORED_COLUMNS, stored_values
from pipeline.types import RowResult

_STORED_NAMES = tuple(c.name for c in STORED_COLUMNS)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS results (
    row_key TEXT PRIMARY KEY,
    request_hash TEXT NOT NULL,
    {", ".join(_STORED_NAMES)},
    finished_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_INSERT = (
    f"INSERT OR REPLACE INTO results (row_key, request_hash, {', '.join(_STORED_NAMES)}, "
    f"finished_at) VALUES ({', '.join('?' * (len(_STORED_NAMES) + 3))})"
)
Row = tuple[Any, ...]  # row_key, request_hash, the stored columns, finished_at
_ROW_WIDTH = len(_STORED_NAMES) + 3
_SEGMENT_BYTES = 64 << 10  # doubled when the answers between two commits need more
Sealed = tuple[list[Row], Path | None]  # rows landed, and the journal segment holding them
# Under SQLite's limit of bound parameters (32,766 since 3.32; 999 before).
_LOOKUP_CHUNK = 2000 if sqlite3.sqlite_version_info >= (3, 32) else 900


@dataclass(frozen=True, slots=True)
class Finished:
    request_hash: str
    ok: bool


@dataclass(frozen=True, slots=True)
class Fetched:
    """Stored values for a list of row keys, column by column, in the keys' order.

    `found[i]` says whether key i has a result (for its current request, when hashes
    were given); where it has none, every column holds None.
    """

    found: list[bool]
    values: dict[str, tuple[Any, ...]]

    def filled_from(self, other: Fetched) -> Fetched:
        """These values, with the rows they lack taken from `other` (same keys, names)."""
        take = [not mine and theirs for mine, theirs in zip(self.found, other.found, strict=True)]
        values = {
            name: tuple(
                b if use else a for a, b, use in zip(column, other.values[name], take, strict=True)
            )
            for name, column in self.values.items()
        }
        return Fetched([a or b for a, b in zip(self.found, take, strict=True)], values)


@dataclass(frozen=True, slots=True)
class Totals:
    rows: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    priced_rows: int = 0  # rows with a known cost
    unpriced_rows: int = 0  # rows answered (so paid for) at an unknown price

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            self.rows + other.rows,
            self.failed + other.failed,
            self.prompt_tokens + other.prompt_tokens,
            self.output_tokens + other.output_tokens,
            self.reasoning_tokens + other.reasoning_tokens,
            self.cost_usd + other.cost_usd,
            self.priced_rows + other.priced_rows,
            self.unpriced_rows + other.unpriced_rows,
        )

    @property
    def cost_known(self) -> bool:
        """False when answered rows exist and not one has a known cost."""
        return self.priced_rows > 0 or self.unpriced_rows == 0


class Checkpoint:
    """One writer connection and one reader connection on the same database file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect()
        self._writer.executescript(_SCHEMA)
        self._add_missing_columns()
        self._reader = self._connect()
        self.since = float(self.get_meta("fresh_since") or 0.0)
        self._journal = Journal(path.parent, f"{path.stem}.landed")
        self._landed: list[Row] = []

    def _add_missing_columns(self) -> None:
        # A checkpoint written by an earlier version lacks the newer (nullable) columns.
        present = {row[1] for row in self._writer.execute("PRAGMA table_info(results)")}
        for column in JSON_COLUMNS:
            if column.name not in present:
                self._writer.execute(f"ALTER TABLE results ADD COLUMN {column.name}")

    def get_meta(self, name: str) -> str | None:
        row = self._reader.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_meta(self, name: str, value: str) -> None:
        self._writer.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def start_fresh(self) -> None:
        """Ignore every result recorded so far (kept on disk until replaced)."""
        newest = self._reader.execute("SELECT max(finished_at) FROM results").fetchone()[0]
        self.since = max(time.time(), (newest or 0.0) + 1e-3)
        self.set_meta("fresh_since", repr(self.since))
        self.set_meta("output_stamp", "")
        self.set_meta("plan_cursor", "0")

    def _stamp(self) -> float:
        """When a row finished, as the checkpoint orders rows: the wall clock, never
        earlier than the last `--fresh`, so a clock stepped back cannot hide new rows."""
        return max(time.time(), self.since)

    def _connect(self) -> sqlite3.Connection:
        # The writer runs in worker threads, one call at a time; the reader on the loop.
        connection = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA busy_timeout=10000")
        return connection

    def write(self, results: Iterable[RowResult], meta: dict[str, str] | None = None) -> None:
        """Commit a batch of finished rows (and any meta values) atomically."""
        now = self._stamp()
        self._write_rows([_row(result, now) for result in results], meta)

    # -- answers as they land: the journal ---------------------------------------------

    def recover(self) -> int:
        """Fold answers a killed run journaled but never committed into the database, and
        start a new journal. Only the run that writes may call this; returns the rows."""
        rows = self._journal.replay()
        self._write_rows(rows)
        self._journal.discard_sealed()
        self._journal.open()
        return len(rows)

    def land(self, result: RowResult) -> None:
        """Hand a finished row to the operating system at once; `commit` makes it queryable."""
        row = _row(result, self._stamp())
        self._journal.append(row)
        self._landed.append(row)

    def seal(self) -> Sealed:
        """Everything landed since the last seal, and the journal segment that holds it.

        Call on the thread that lands rows, so no row falls between the two."""
        rows, self._landed = self._landed, []
        return rows, self._journal.rotate()

    def commit(self, sealed: Sealed, meta: dict[str, str]) -> None:
        """Commit sealed rows (and meta values) atomically, then drop their journal segment."""
        rows, segment = sealed
        self._write_rows(rows, meta)
        if segment is not None:
            segment.unlink(missing_ok=True)

    def _write_rows(self, rows: list[Row], meta: dict[str, str] | None = None) -> None:
        if not rows and not meta:
            return
        with self._writer:
            self._writer.execute("BEGIN")
            self._writer.executemany(_INSERT, rows)
            for name, value in (meta or {}).items():
                self._writer.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def import_results(self, rows: list[tuple[Any, ...]]) -> None:
        """Add results recovered from elsewhere (key, hash, then the stored columns); a
        key already recorded keeps its result."""
        statement = (
            f"INSERT OR IGNORE INTO results (row_key, request_hash, {', '.join(_STORED_NAMES)}, "
            f"finished_at) VALUES ({', '.join('?' * (len(_STORED_NAMES) + 3))})"
        )
        now = self._stamp()
        with self._writer:
            self._writer.execute("BEGIN")
            self._writer.executemany(statement, [(*row, now) for row in rows])

    def key_by_request(self) -> None:
        """Re-key results by their request hash (for a job without an id column).

        Earlier versions keyed such rows by position; their answers stay valid for
        their requests, so they are kept under the new key instead of bought again.
        """
        if self.get_meta("keyed_by_request") == "1":
            return
        base = (
            "CASE WHEN instr(request_hash, ':') > 0 "
            "THEN substr(request_hash, 1, instr(request_hash, ':') - 1) ELSE request_hash END"
        )
        with self._writer:
            self._writer.execute("BEGIN")
            self._writer.execute(
                f"UPDATE OR IGNORE results SET row_key = {base} WHERE row_key != {base}"
            )
            self._writer.execute("INSERT OR REPLACE INTO meta VALUES ('keyed_by_request', '1')")

    def carry(self, moves: list[tuple[str, str, str, str]]) -> None:
        """Record answers under the request a row makes now: (key recorded, new key, new
        request hash, what the answer was given for). A key that changes (a row keyed by
        its request) moves, so the answer is counted once; `carried` keeps, per row,
        what the kept answer was given for."""
        copy = (
            f"INSERT OR REPLACE INTO results (row_key, request_hash, {', '.join(_STORED_NAMES)}, "
            f"finished_at) SELECT ?, ?, {', '.join(_STORED_NAMES)}, finished_at FROM results "
            "WHERE row_key = ?"
        )
        with self._writer:
            self._writer.execute("BEGIN")
            self._writer.execute(
                "CREATE TABLE IF NOT EXISTS carried (row_key TEXT PRIMARY KEY, given_for TEXT)"
            )
            for old_key, new_key, new_hash, given_for in moves:
                self._writer.execute(copy, (new_key, new_hash, old_key))
                if new_key != old_key:
                    self._writer.execute("DELETE FROM results WHERE row_key = ?", (old_key,))
                self._writer.execute(
                    "INSERT OR REPLACE INTO carried VALUES (?, ?)", (new_key, given_for)
                )

    def replace_results(self, rows: list[tuple[Any, ...]]) -> None:
        """Record results found elsewhere (key, hash, then the stored columns), replacing
        whatever the keys held."""
        now = self._stamp()
        self._write_rows([(*row, now) for row in rows])

    def stored_rows(self, keys: list[str]) -> list[tuple[Any, ...]]:
        """(key, hash, then the stored columns) of these keys' results."""
        return list(self._select(f"row_key, request_hash, {', '.join(_STORED_NAMES)}", keys))

    def finished(self, keys: list[str]) -> dict[str, Finished]:
        """Which of these rows already have a result, and for which request."""
        found: dict[str, Finished] = {}
        for key, request_hash, error in self._select(
            "row_key, request_hash, error IS NOT NULL", keys
        ):
            found[key] = Finished(request_hash, not error)
        return found

    def fetch(
        self, keys: list[str], names: Sequence[str], hashes: list[str] | None = None
    ) -> Fetched:
        """The named columns' values for `keys`; with `hashes` (each key's current request
        hash), a result recorded for another request counts as missing."""
        selected = ("row_key", "request_hash", *names)
        stored = {row[0]: row for row in self._select(", ".join(selected), keys)}
        return fetched(keys, stored, selected, hashes)

    def _select(self, columns: str, keys: list[str]) -> Iterator[tuple[Any, ...]]:
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[start : start + _LOOKUP_CHUNK]
            marks = ", ".join("?" * len(chunk))
            yield from self._reader.execute(
                f"SELECT {columns} FROM results WHERE row_key IN ({marks}) AND finished_at >= ?",
                [*chunk, self.since],
            )

    def state(self) -> tuple[int, float]:
        """Changes whenever a result is added or replaced: (rows, latest finish time)."""
        row = self._reader.execute(
            "SELECT count(*), coalesce(max(finished_at), 0) FROM results WHERE finished_at >= ?",
            (self.since,),
        ).fetchone()
        return int(row[0]), float(row[1])

    def recent(self, window_s: float) -> tuple[int, float | None]:
        """Rows finished in the last `window_s` seconds, and when the last one finished."""
        row = self._reader.execute(
            "SELECT count(*) FILTER (WHERE finished_at >= ?), max(finished_at) FROM results "
            "WHERE finished_at >= ?",
            (time.time() - window_s, self.since),
        ).fetchone()
        return int(row[0]), row[1]

    def adopt(self, other: Path) -> int:
        """Copy in the results another run of the same job recorded (a `--limit` run's,
        or the full run's for a `--limit` run) for rows this one has no result for; each
        keeps its request hash, so it is reused only while the request is unchanged."""
        if not other.exists() or other.resolve() == self.path.resolve():
            return 0
        names = ", ".join(("row_key", "request_hash", *_STORED_NAMES, "finished_at"))
        with self._writer:
            self._writer.execute("ATTACH DATABASE ? AS other", (str(other),))
        try:
            since = self._writer.execute(
                "SELECT value FROM other.meta WHERE name = 'fresh_since'"
            ).fetchone()
            with self._writer:
                cursor = self._writer.execute(
                    f"INSERT OR REPLACE INTO main.results ({names}) SELECT {names} "
                    "FROM other.results AS o WHERE o.finished_at >= ? AND o.finished_at >= ? "
                    "AND NOT EXISTS (SELECT 1 FROM main.results AS m "
                    "WHERE m.row_key = o.row_key AND m.finished_at >= ?)",
                    (float(since[0]) if since else 0.0, self.since, self.since),
                )
                return cursor.rowcount
        finally:
            self._writer.execute("DETACH DATABASE other")

    def copy_to(self, path: Path) -> None:
        """A consistent copy of the database at `path` (SQLite's online backup)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        copy = sqlite3.connect(path)
        try:
            self._reader.backup(copy)
        finally:
            copy.close()

    def totals(self, beyond: Checkpoint | None = None) -> Totals:
        """Rows, tokens and cost recorded; with `beyond`, only of rows it has no result for."""
        where = "WHERE finished_at >= ?"
        if beyond is not None:
            keys = self._reader.execute(
                "SELECT row_key FROM results WHERE finished_at >= ?", (self.since,)
            ).fetchall()
            found = beyond.finished([key for (key,) in keys])
            self._reader.execute(
                "CREATE TEMP TABLE IF NOT EXISTS beyond (row_key TEXT PRIMARY KEY)"
            )
            self._reader.execute("DELETE FROM temp.beyond")
            self._reader.executemany("INSERT INTO temp.beyond VALUES (?)", [(k,) for k in found])
            where += " AND row_key NOT IN (SELECT row_key FROM temp.beyond)"
        row = self._reader.execute(
            "SELECT count(*), count(error), total(prompt_tokens), "
            "total(completion_tokens), total(reasoning_tokens), total(cost_usd), count(cost_usd), "
            f"total(cost_usd IS NULL AND response IS NOT NULL) FROM results {where}",
            (self.since,),
        ).fetchone()
        rows, failed, prompt, output, reasoning, cost, priced, unpriced = row
        return Totals(
            int(rows),
            int(failed),
            int(prompt),
            int(output),
            int(reasoning),
            cost,
            int(priced),
            int(unpriced),
        )

    def close(self) -> None:
        self._journal.close()
        self._writer.close()
        self._reader.close()


def fetched(
    keys: list[str],
    stored: dict[str, tuple[Any, ...]],
    selected: tuple[str, ...],
    hashes: list[str] | None,
) -> Fetched:
    """`stored` rows (row_key, request_hash, then the rest of `selected`) in `keys` order,
    column by column; with `hashes`, a row recorded for another request counts as missing."""
    missing = (None,) * len(selected)
    rows = [stored.get(key, missing) for key in keys]
    if hashes is not None:
        # A recorded hash may carry a suffix (":skipped", a row not sent because its
        # prompt was empty): it still answers that request.
        rows = [
            row if row[1] is not None and str(row[1]).partition(":")[0] == request_hash else missing
            for row, request_hash in zip(rows, hashes, strict=True)
        ]
    columns = list(zip(*rows, strict=True)) if rows else [()] * len(selected)
    values = dict(zip(selected, columns, strict=True))
    return Fetched([key is not None for key in values["row_key"]], values)


def _row(result: RowResult, finished_at: float) -> Row:
    return (result.key, result.request_hash, *stored_values(result), finished_at)


class Journal:
    """Answers appended one line each, in numbered segments beside the database.

    Each segment is a file mapped into memory: a line copied into the mapping is in the
    operating system's page cache at once, so it survives the process being killed,
    without a system call per answer (a write(2) per answer measured 8 us here; the copy
    well under 1). Only a power cut needs fsync, which would cost a disk flush per answer.
    Segments are sealed as their rows are committed and deleted after; whatever a
    killed run left is replayed on the next start. A line torn by the kill is skipped
    (its row is simply sent again), as is the zero-filled tail of an unfinished segment.
    """

    def __init__(self, directory: Path, stem: str) -> None:
        self.directory = directory
        self.stem = stem
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._used = 0
        self._path: Path | None = None

    def segments(self) -> list[Path]:
        found = self.directory.glob(f"{self.stem}.*.jsonl")
        return sorted(found, key=lambda path: int(path.suffixes[-2][1:]))

    def replay(self) -> list[Row]:
        rows: list[Row] = []
        for segment in self.segments():
            for line in segment.read_bytes().rstrip(b"\0").splitlines():
                try:
                    row = tuple(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue  # torn by the kill
                if len(row) == _ROW_WIDTH:
                    rows.append(row)
        return rows

    def discard_sealed(self) -> None:
        for segment in self.segments():
            if segment != self._path:
                segment.unlink()

    def open(self) -> None:
        existing = self.segments()
        number = int(existing[-1].suffixes[-2][1:]) + 1 if existing else 1
        self._path = self.directory / f"{self.stem}.{number}.jsonl"
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        _reserve(self._fd, _SEGMENT_BYTES)
        self._map = mmap.mmap(self._fd, _SEGMENT_BYTES)
        self._used = 0

    def append(self, row: Row) -> None:
        if self._map is None:
            return
        line = orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE)
        end = self._used + len(line)
        if end > len(self._map):
            self._grow(end)
        self._map[self._used : end] = line
        self._used = end

    def _grow(self, needed: int) -> None:
        assert self._map is not None and self._fd is not None
        size = max(needed, 2 * len(self._map))
        _reserve(self._fd, size)
        self._map.resize(size)

    def rotate(self) -> Path | None:
        """Start a new segment; returns the one just closed (None when not journaling)."""
        sealed = self._path
        if self._map is None:
            return None
        self.close()
        self.open()
        return sealed

    def close(self) -> None:
        if self._map is not None and self._fd is not None:
            self._map.close()
            os.ftruncate(self._fd, self._used)
            os.close(self._fd)
        self._map = self._fd = None


def _reserve(fd: int, size: int) -> None:
    """Give the journal file `size` bytes of disk now. A sparse file would be filled
    through the memory map, where a full disk is a SIGBUS that kills the process; a
    reservation that fails is an OSError the run can stop on cleanly."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:
        os.ftruncate(fd, size)
