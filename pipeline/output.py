"""The output: every input row once, in input order, with its result columns.

One writer for every way a job runs. `joined_batches` reads the input batch by batch
and joins each batch with its results (a local checkpoint or a cluster's segments,
any `ResultStore`) by row key; `OutputFile` writes those batches in the format the
path's extension names (`FORMATS`: one class per format) under a temporary name in
the same folder, fsyncs it and renames it over the path, so the path only ever holds
a complete file. `write_output` (local and batch runs, export) and the cluster
driver's assembly both go through `write_joined`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, ClassVar

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.checkpoint import Checkpoint
from pipeline.columns import NOT_PROCESSED, RESULT_COLUMNS, arrow_array
from pipeline.errors import SpecError
from pipeline.inputs import InputTable, row_keys
from pipeline.store import ResultStore
from pipeline.structured import OutputSchema

READ_BATCH_ROWS = 10_000
Hasher = Callable[[pl.DataFrame], list[str]]  # an input batch -> each row's request hash


@dataclass(frozen=True)
class Layout:
    """Which optional columns follow the standard ones: `tool_calls`, then one per
    property of `output.schema`."""

    tool_calls: bool = False
    schema: OutputSchema | None = None

    @property
    def extra_columns(self) -> list[str]:
        return (["tool_calls"] if self.tool_calls else []) + (
            self.schema.columns if self.schema else []
        )


# --- formats ------------------------------------------------------------------------


class OutputFormat(ABC):
    """One output format: how batches of Arrow rows become a file, and how it reads back.

    Write with `write` (every batch has the first one's columns) and `close`; a writer
    that was given only an empty batch still writes what the format has for no rows.
    """

    extension: ClassVar[str]

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def refusal(cls, fields: list[pa.Field]) -> str | None:
        """Why columns of these types cannot be written in this format; None if they can."""
        return None

    @abstractmethod
    def write(self, table: pa.Table) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @classmethod
    @abstractmethod
    def scan(cls, path: Path) -> pl.LazyFrame:
        """A file of this format, lazily, with the result columns' types."""

    @classmethod
    def failed_rows(cls, path: Path) -> int:
        return int(scan_output(path).select(pl.col("error").is_not_null().sum()).collect().item())


class ParquetOutput(OutputFormat):
    """Every column keeps its Arrow type (schema properties as typed, list and struct
    columns, an enum as a dictionary), zstd-compressed."""

    extension = ".parquet"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema, compression="zstd")
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    @classmethod
    def scan(cls, path: Path) -> pl.LazyFrame:
        return pl.scan_parquet(path)

    @classmethod
    def failed_rows(cls, path: Path) -> int:
        # ParquetFile, not read_table: that imports the dataset layer (and pandas).
        errors = pq.ParquetFile(path).read(columns=["error"]).column("error")
        return len(errors) - errors.null_count


class _TextOutput(OutputFormat):
    """A text format written batch by batch through polars: an enum column is its text,
    numbers and booleans are written as text, nulls as the format's empty value."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._handle: IO[bytes] | None = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._started = False

    def write(self, table: pa.Table) -> None:
        assert self._handle is not None, "written after close"
        frame = pl.from_arrow(table)
        assert isinstance(frame, pl.DataFrame)
        self._write_frame(frame, self._handle, first=not self._started)
        self._started = True

    @abstractmethod
    def _write_frame(self, frame: pl.DataFrame, handle: IO[bytes], *, first: bool) -> None: ...

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    @classmethod
    def scan(cls, path: Path) -> pl.LazyFrame:
        # Text carries no types: an all-empty column would read back as nulls of no type.
        arrow = pa.schema([(column.name, column.type) for column in RESULT_COLUMNS])
        results = pl.DataFrame(arrow.empty_table()).schema
        return cls._scan_text(path).with_columns(
            pl.col(name).cast(dtype) for name, dtype in results.items()
        )

    @classmethod
    @abstractmethod
    def _scan_text(cls, path: Path) -> pl.LazyFrame: ...


class CsvOutput(_TextOutput):
    """One header line, then a line per row; list and object columns have no place in
    a CSV cell and are refused when the job is checked."""

    extension = ".csv"

    @classmethod
    def refusal(cls, fields: list[pa.Field]) -> str | None:
        nested = [
            f.name
            for f in fields
            if pa.types.is_nested(f.type) and not pa.types.is_dictionary(f.type)
        ]
        if not nested:
            return None
        return (
            f"CSV cannot hold the list or object column(s) {', '.join(nested)} of "
            "output.schema; write .parquet or .jsonl"
        )

    def _write_frame(self, frame: pl.DataFrame, handle: IO[bytes], *, first: bool) -> None:
        frame.write_csv(handle, include_header=first)

    @classmethod
    def _scan_text(cls, path: Path) -> pl.LazyFrame:
        return pl.scan_csv(path)


class JsonLinesOutput(_TextOutput):
    """One JSON object per row; list and object columns stay JSON arrays and objects."""

    extension = ".jsonl"

    def _write_frame(self, frame: pl.DataFrame, handle: IO[bytes], *, first: bool) -> None:
        frame.write_ndjson(handle)

    @classmethod
    def _scan_text(cls, path: Path) -> pl.LazyFrame:
        return pl.scan_ndjson(path)


# The one list of formats: `output.path`'s extension picks one.
FORMATS: dict[str, type[OutputFormat]] = {
    f.extension: f for f in (ParquetOutput, CsvOutput, JsonLinesOutput)
}


def output_format(path: Path, layout: Layout | None = None) -> type[OutputFormat]:
    """The output's format, from its extension; SpecError for any other, or for a
    layout whose columns the format cannot hold."""
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        names = ", ".join(FORMATS)
        listed = names.rsplit(", ", 1)
        raise SpecError(
            f"output.path: {path} does not end in {' or '.join(listed)}; the format "
            "follows the extension"
        )
    if layout is not None and layout.schema is not None:
        refusal = found.refusal(layout.schema.arrow_fields())
        if refusal:
            raise SpecError(f"output.path: {refusal}")
    return found


def scan_output(path: Path) -> pl.LazyFrame:
    """An output file of any supported format, lazily."""
    return FORMATS.get(path.suffix.lower(), ParquetOutput).scan(path)


def count_failed(path: Path) -> int:
    return output_format(path).failed_rows(path)


# --- the atomic file ----------------------------------------------------------------


class OutputFile:
    """A file that appears at `path` complete or not at all.

    Batches go to a temporary name in the same folder (so the rename never crosses a
    file system); `commit` closes it, fsyncs it and renames it over `path`. Used as a
    context manager it commits when the block ends normally and removes the temporary
    file when it raises.
    """

    def __init__(self, path: Path, fmt: type[OutputFormat] | None = None) -> None:
        self.path = path
        kind = fmt or output_format(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for leftover in path.parent.glob(f".{path.name}.*.tmp"):
            leftover.unlink(missing_ok=True)  # from a writer that was killed
        self._temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._writer = kind(self._temporary)
        self.rows = 0
        self.batches = 0

    def write(self, table: pa.Table) -> None:
        self._writer.write(table)
        self.rows += table.num_rows
        self.batches += 1

    def commit(self) -> None:
        self._writer.close()
        _fsync(self._temporary)
        os.replace(self._temporary, self.path)

    def discard(self) -> None:
        try:
            self._writer.close()
        finally:
            self._temporary.unlink(missing_ok=True)

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            try:
                self.commit()
            except BaseException:
                self.discard()
                raise
        else:
            self.discard()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# --- joining results ----------------------------------------------------------------


@dataclass
class Written:
    rows: int = 0
    failed: int = 0  # rows written with an error (never processed included)


def write_joined(
    output: OutputFile,
    table: InputTable,
    results: ResultStore,
    layout: Layout,
    *,
    hashes: Hasher | None = None,
    limit: int | None = None,
    start: int = 0,
    stop: int | None = None,
    finished_only: bool = False,
) -> Written:
    """Write input rows `start` to `stop` (of the first `limit`) with their results.

    `hashes` gives each row's current request hash: a result recorded for another
    request counts as missing, and a row without an id column is keyed by it.
    `finished_only` writes just the rows that have a result.
    """
    written = Written()
    for joined, found in joined_batches(
        table, results, layout, hashes=hashes, limit=limit, start=start, stop=stop
    ):
        if finished_only:
            joined = joined.filter(arrow_array(found, pa.bool_()))
        output.write(joined)
        errors = joined.column("error")
        written.rows += joined.num_rows
        written.failed += len(errors) - errors.null_count
    if output.batches == 0:
        # No rows: the file still has every column (a header, a Parquet schema).
        output.write(_empty(table, results, layout))
    return written


def joined_batches(
    table: InputTable,
    results: ResultStore,
    layout: Layout,
    *,
    hashes: Hasher | None = None,
    limit: int | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[pa.Table, list[bool]]]:
    """Input batches with their result columns, and which rows have a result."""
    offset = start
    for batch in table.batches(READ_BATCH_ROWS, limit, start, stop):
        current = hashes(batch) if hashes else None
        # Without an id column a row's key is its request hash (see plan.keys_for).
        if table.id_column is None and current is not None:
            keys = current
        else:
            keys = row_keys(batch, offset, table.id_column)
        yield _with_results(batch.to_arrow(), keys, results, layout, current)
        offset += batch.height


def _empty(table: InputTable, results: ResultStore, layout: Layout) -> pa.Table:
    empty = pl.DataFrame(schema=table.schema).to_arrow()
    return _with_results(empty, [], results, layout)[0]


def write_output(
    table: InputTable,
    results: ResultStore,
    path: Path,
    limit: int | None = None,
    *,
    layout: Layout = Layout(),
    finished_only: bool = False,
    hashes: Hasher | None = None,
) -> int:
    """Write the output atomically; returns the number of rows written.

    `finished_only` writes just the rows that have a result (a partial export of a
    run in progress) and leaves the record of the last full output alone. With `hashes`
    (a row's current request hash), results recorded for another request count as missing.
    """
    with OutputFile(path) as output:
        written = write_joined(
            output,
            table,
            results,
            layout,
            hashes=hashes,
            limit=limit,
            finished_only=finished_only,
        )
    # A checkpoint remembers the full output it last wrote, so a rerun rewrites nothing;
    # a cluster's segments keep no run state (its driver assembles every time).
    if not finished_only and isinstance(results, Checkpoint):
        results.set_meta("output_stamp", _stamp(table, results, path, limit))
    return written.rows


def output_is_current(
    table: InputTable, checkpoint: Checkpoint, path: Path, limit: int | None
) -> bool:  # the layout is part of the request hash, so results change when it does
    """True when `path` is exactly what write_output wrote last for these inputs and results."""
    return path.exists() and checkpoint.get_meta("output_stamp") == _stamp(
        table, checkpoint, path, limit
    )


def _stamp(table: InputTable, checkpoint: Checkpoint, path: Path, limit: int | None) -> str:
    inputs = [(str(p), *storage.signature(p)) for p in table.paths]
    output = path.stat()
    state = checkpoint.state()
    return repr((str(path.resolve()), inputs, limit, state, output.st_size, output.st_mtime_ns))


def join_results(
    inputs: pa.Table, keys: list[str], results: ResultStore, layout: Layout
) -> pa.Table:
    """An input batch with its result columns, exactly as the output file has them."""
    return _with_results(inputs, keys, results, layout)[0]


def _with_results(
    inputs: pa.Table,
    keys: list[str],
    results: ResultStore,
    layout: Layout,
    current: list[str] | None = None,
) -> tuple[pa.Table, list[bool]]:
    """The input batch with its result columns appended, and which rows have a result."""
    names = [c.name for c in RESULT_COLUMNS]
    if layout.tool_calls:
        names.append("tool_calls")
    if layout.schema is not None:
        names.append("parsed")
    stored = results.fetch(keys, names, current)
    values = stored.values
    for column in RESULT_COLUMNS:
        column_values = values[column.name]
        if column.name == "error":
            column_values = tuple(
                e if found else NOT_PROCESSED
                for e, found in zip(column_values, stored.found, strict=True)
            )
        inputs = inputs.append_column(column.name, arrow_array(column_values, column.type))
    if layout.tool_calls:
        inputs = inputs.append_column("tool_calls", arrow_array(values["tool_calls"], pa.string()))
    if layout.schema is not None:
        objects = [None if text is None else orjson.loads(text) for text in values["parsed"]]
        fields = layout.schema.arrow_fields()
        for field, array in zip(fields, layout.schema.arrays(objects), strict=True):
            inputs = inputs.append_column(field.with_type(array.type), array)
    return inputs, stored.found
