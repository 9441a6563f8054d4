"""Exactly-once across a cluster: finished rows as immutable segment files.

Every commit of a shard's worker writes one new Parquet file (its finished rows)
and one JSON-lines file (its run-log lines) under
`<output>.cluster/shards/<shard>/`, named by the worker's attempt id and a sequence
number. Nothing is ever rewritten, so no lock is needed and any node can read what
any other committed: object stores make a PUT visible only once it is complete, and
on a local or network file system a segment is written under a temporary name and
renamed. A shard retried after its worker died reads its segments first and sends
only the rows not in them; the final assembly reads every segment of a shard and
keeps one result per row (the latest, should a row ever have been committed twice).

Between two commits each answer is appended to the shard's journal the moment it
lands (the same `checkpoint.Journal` a local run keeps beside its database). The
worker that takes a shard over, Ray's retry of a killed worker or a rerun after the
driver died, first commits whatever journal the previous one left as a segment of
its own, so a killed worker costs only the requests it had in flight. The journal
lives in the shared folder when that is a file system, else on the node's local disk
(an object store has no append), where a retry on the same node finds it.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.checkpoint import Fetched, Finished, Journal, Row, Sealed, Totals, fetched
from pipeline.columns import STORED_COLUMNS, stored_values
from pipeline.types import RowResult

SEGMENT_SCHEMA = pa.schema(
    [
        ("row_key", pa.string()),
        ("request_hash", pa.string()),
        *((c.name, c.type) for c in STORED_COLUMNS),
        ("finished_at", pa.float64()),
    ]
)


class StateRoot:
    """The folder every node shares: a local or network path, or an object-store URI."""

    def __init__(self, location: str) -> None:
        self.location = location.rstrip("/")
        if storage.is_remote(self.location):
            self.fs, self.path = storage.filesystem(self.location)
            self.local = False
        else:
            # Absolute: workers do not share the driver's working directory.
            self.location = _absolute(self.location)
            self.fs = pafs.LocalFileSystem()
            self.path = self.location
            self.local = True

    def join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file so that readers see all of it or nothing."""
        if self.local:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            temporary = f"{path}.{uuid.uuid4().hex}.tmp"
            with self.fs.open_output_stream(temporary) as stream:
                stream.write(data)
            self.fs.move(temporary, path)
        else:
            with self.fs.open_output_stream(path) as stream:
                stream.write(data)

    def read_bytes(self, path: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(path) as stream:
                return bytes(stream.read())
        except FileNotFoundError:
            return None

    def list_files(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(folder, recursive=False, allow_not_found=True)
        return sorted(
            info.path
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and not info.path.endswith(".tmp")
        )

    def list_folders(self, folder: str) -> list[str]:
        selector = pafs.FileSelector(folder, recursive=False, allow_not_found=True)
        return sorted(
            info.path
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.Directory
        )

    def remove_all(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)


def _absolute(location: str) -> str:
    from pathlib import Path

    return str(Path(location).resolve())


@dataclass
class ShardResults:
    """What a shard's segments hold: key -> (request hash, result fields...).

    A `results.ResultStore`, as a local checkpoint is: the planner, the output writer,
    status and export read a cluster's rows through it.
    """

    records: dict[str, tuple[object, ...]]  # the `_FIELDS`, then finished_at

    def finished(self, keys: list[str]) -> dict[str, Finished]:
        found = {}
        for key in keys:
            record = self.records.get(key)
            if record is not None:
                found[key] = Finished(str(record[0]), record[_ERROR] is None)
        return found

    def fetch(
        self, keys: list[str], names: Sequence[str], hashes: list[str] | None = None
    ) -> Fetched:
        """As `ResultStore.fetch`."""
        positions = [_FIELDS.index(name) for name in names]
        stored = {
            key: (key, record[0], *(record[i] for i in positions))
            for key in keys
            if (record := self.records.get(key)) is not None
        }
        return fetched(keys, stored, ("row_key", "request_hash", *names), hashes)

    def totals(self) -> Totals:
        rows = failed = prompt = output = reasoning = priced = unpriced = 0
        cost = 0.0
        for record in self.records.values():
            rows += 1
            failed += record[_ERROR] is not None
            prompt += int(record[_PROMPT] or 0)  # type: ignore[call-overload]
            output += int(record[_COMPLETION] or 0)  # type: ignore[call-overload]
            reasoning += int(record[_REASONING] or 0)  # type: ignore[call-overload]
            cost += float(record[_COST] or 0.0)  # type: ignore[arg-type]
            priced += record[_COST] is not None
            unpriced += record[_COST] is None and record[_RESPONSE] is not None
        return Totals(rows, failed, prompt, output, reasoning, cost, priced, unpriced)

    def recent(self, window_s: float) -> tuple[int, float | None]:
        """As `ResultStore.recent`: rows finished in the last `window_s` seconds, and
        when the last one finished."""
        since = time.time() - window_s
        stamps = [float(record[-1]) for record in self.records.values()]  # type: ignore[arg-type]
        return sum(stamp >= since for stamp in stamps), max(stamps, default=None)

    def get_meta(self, name: str) -> str | None:
        """Segments keep no run state: a cluster's progress is in its driver."""
        return None

    def merge(self, other: ShardResults) -> None:
        self.records.update(other.records)


def _finished_at(record: Sequence[object]) -> float:
    stamp = record[-1]
    return float(stamp) if isinstance(stamp, int | float) else 0.0


# positions in a record (the request hash first, then the stored columns)
_FIELDS = ("request_hash", *(c.name for c in STORED_COLUMNS))
_ERROR = _FIELDS.index("error")
_PROMPT = _FIELDS.index("prompt_tokens")
_COMPLETION = _FIELDS.index("completion_tokens")
_REASONING = _FIELDS.index("reasoning_tokens")
_COST = _FIELDS.index("cost_usd")
_RESPONSE = _FIELDS.index("response")


class ShardStore:
    """One shard's segments: read what is committed, commit more."""

    def __init__(self, root: StateRoot, shard: int, attempt: str | None = None) -> None:
        self.root = root
        self.folder = root.join("shards", f"{shard:05d}")
        self.attempt = attempt or uuid.uuid4().hex[:12]
        self._sequence = 0

    def read(self) -> ShardResults:
        records: dict[str, tuple[object, ...]] = {}
        for path in self.root.list_files(self.folder):
            if not path.endswith(".parquet"):
                continue
            data = self.root.read_bytes(path)
            if data is None:
                continue
            try:
                table = pq.read_table(pa.BufferReader(data))
            except (pa.ArrowInvalid, OSError):
                continue  # a torn write from a killed worker on a file system without rename
            # A segment written before a column was added has none: null, as in the checkpoint.
            columns = [
                table.column(name).to_pylist()
                if name in table.column_names
                else [None] * len(table)
                for name in (*_FIELDS, "finished_at")
            ]
            for key, *values in zip(table.column("row_key").to_pylist(), *columns, strict=True):
                # The latest result of a row wins, whichever segment holds it: segments
                # are named by attempt, and a later run's may sort before an earlier one's.
                earlier = records.get(key)
                if earlier is None or _finished_at(values) >= _finished_at(earlier):
                    records[key] = tuple(values)
        return ShardResults(records)

    def commit(self, rows: list[Row], log_lines: list[bytes]) -> None:
        """Write one immutable segment: the log lines first, then the rows (`record`s)."""
        name = f"{self.attempt}-{self._sequence:06d}"
        self._sequence += 1
        if log_lines:
            self.root.write_bytes(f"{self.folder}/{name}.jsonl", b"\n".join(log_lines) + b"\n")
        if rows:
            table = pa.Table.from_pylist(
                [dict(zip(SEGMENT_SCHEMA.names, row, strict=True)) for row in rows],
                schema=SEGMENT_SCHEMA,
            )
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink, compression="zstd")
            self.root.write_bytes(f"{self.folder}/{name}.parquet", sink.getvalue().to_pybytes())

    def log_lines(self) -> list[bytes]:
        lines: list[bytes] = []
        for path in self.root.list_files(self.folder):
            if path.endswith(".jsonl"):
                lines.extend((self.root.read_bytes(path) or b"").splitlines())
        return lines

    def journal(self, layout_id: str) -> Journal:
        """The shard's journal (not yet opened): in the shared folder on a file system,
        else on this node's disk under a name only this layout of this output uses."""
        shard = self.folder.rsplit("/", 1)[1]
        if self.root.local:
            folder = Path(self.root.path) / "journal" / shard
        else:
            digest = hashlib.sha256(f"{self.root.location}\0{layout_id}".encode()).hexdigest()
            folder = Path(tempfile.gettempdir()) / "pipeline-journal" / digest[:16] / shard
        folder.mkdir(parents=True, exist_ok=True)
        return Journal(folder, "landed")

    def take_over(self, journal: Journal) -> int:
        """Commit the answers an earlier worker of this shard journaled but never
        committed, then start a new journal; returns how many rows it recovered.
        Only the worker that holds the shard's lock may call this."""
        rows = journal.replay()
        if rows:
            self.commit(rows, [])
        journal.discard_sealed()
        journal.open()
        return len(rows)


@dataclass
class ShardRecord:
    """A shard's `sink.Record`: each answer journaled as it lands; each commit one
    immutable segment of the shard, after which the journal of its rows is dropped."""

    store: ShardStore
    journal: Journal
    _rows: list[Row] = field(default_factory=list)

    def land(self, result: RowResult) -> None:
        row = record(result)
        self.journal.append(row)
        self._rows.append(row)

    def seal(self) -> Sealed:
        rows, self._rows = self._rows, []
        return rows, self.journal.rotate()

    def commit(self, sealed: Sealed, meta: dict[str, str], log_lines: list[bytes]) -> None:
        # A shard keeps no meta values: its planner starts over its rows on each attempt.
        rows, segment = sealed
        self.store.commit(rows, log_lines)
        if segment is not None:
            segment.unlink(missing_ok=True)


def record(result: RowResult) -> Row:
    """A finished row as the journal and the segments keep it."""
    return (result.key, result.request_hash, *stored_values(result), time.time())
