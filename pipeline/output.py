"""The final Parquet: every input row once, in input order, with its result columns.

Assembled batch by batch from the input and the checkpoint, written to a temporary
file beside the target and renamed over it, so the output path only ever holds a
complete file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.checkpoint import Checkpoint
from pipeline.columns import NOT_PROCESSED, RESULT_COLUMNS, arrow_array
from pipeline.errors import SpecError
from pipeline.inputs import InputTable, row_keys
from pipeline.structured import OutputSchema

READ_BATCH_ROWS = 10_000


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


OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}


def output_format(path: Path, layout: Layout | None = None) -> str:
    """The output's format, from its extension; SpecError for any other."""
    found = OUTPUT_FORMATS.get(path.suffix.lower())
    if found is None:
        raise SpecError(
            f"output.path: {path} does not end in .parquet, .csv or .jsonl; the format "
            "follows the extension"
        )
    if found == "csv" and layout is not None and layout.schema is not None:
        nested = [
            f.name
            for f in layout.schema.arrow_fields()
            if pa.types.is_nested(f.type) and not pa.types.is_dictionary(f.type)
        ]
        if nested:
            raise SpecError(
                f"output.path: CSV cannot hold the list or object column(s) "
                f"{', '.join(nested)} of output.schema; write .parquet or .jsonl"
            )
    return found


def scan_output(path: Path) -> pl.LazyFrame:
    """An output file of any supported format, lazily."""
    found = OUTPUT_FORMATS.get(path.suffix.lower(), "parquet")
    if found == "parquet":
        return pl.scan_parquet(path)
    frame = pl.scan_csv(path) if found == "csv" else pl.scan_ndjson(path)
    # Text formats carry no types: an all-empty column would read back as nulls of no type.
    arrow = pa.schema([(column.name, column.type) for column in RESULT_COLUMNS])
    results = pl.DataFrame(arrow.empty_table()).schema
    return frame.with_columns(pl.col(name).cast(dtype) for name, dtype in results.items())


def count_failed(path: Path) -> int:
    if output_format(path) == "parquet":
        # ParquetFile, not read_table: that imports the dataset layer (and pandas).
        errors = pq.ParquetFile(path).read(columns=["error"]).column("error")
        return len(errors) - errors.null_count
    return int(scan_output(path).select(pl.col("error").is_not_null().sum()).collect().item())


def write_output(
    table: InputTable,
    checkpoint: Checkpoint,
    path: Path,
    limit: int | None = None,
    *,
    layout: Layout = Layout(),
    finished_only: bool = False,
    hashes: Callable[[pl.DataFrame], list[str]] | None = None,
) -> int:
    """Write the output atomically; returns the number of rows written.

    `finished_only` writes just the rows that have a result (a partial export of a
    run in progress) and leaves the record of the last full output alone. With `hashes`
    (a row's current request hash), results recorded for another request count as missing.
    """
    fmt = output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)  # from a writer that was killed
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    rows = 0
    writer: pq.ParquetWriter | None = None
    try:
        offset = 0
        for batch in table.batches(READ_BATCH_ROWS, limit):
            current = hashes(batch) if hashes else None
            # Without an id column a row's key is its request hash (see plan.keys_for).
            if table.id_column is None and current is not None:
                keys = current
            else:
                keys = row_keys(batch, offset, table.id_column)
            joined, found = _with_results(batch.to_arrow(), keys, checkpoint, layout, current)
            if finished_only:
                joined = joined.filter(arrow_array(found, pa.bool_()))
            if writer is None:
                writer = pq.ParquetWriter(temporary, joined.schema, compression="zstd")
            writer.write_table(joined)
            offset += batch.height
            rows += joined.num_rows
        if writer is None:
            empty = pl.DataFrame(schema=table.schema).to_arrow()
            schema = _with_results(empty, [], checkpoint, layout)[0].schema
            writer = pq.ParquetWriter(temporary, schema)
        writer.close()
        writer = None
        if fmt != "parquet":
            temporary = _convert(temporary, fmt)
        _fsync(temporary)
        os.replace(temporary, path)
        if not finished_only:
            checkpoint.set_meta("output_stamp", _stamp(table, checkpoint, path, limit))
    finally:
        if writer is not None:
            writer.close()
        temporary.unlink(missing_ok=True)
    return rows


def join_results(
    inputs: pa.Table, keys: list[str], results: Checkpoint, layout: Layout
) -> pa.Table:
    """An input batch with its result columns, exactly as the output file has them.

    `results` is anything with the checkpoint's `fetch`: a cluster run passes the rows
    its shards committed.
    """
    return _with_results(inputs, keys, results, layout)[0]


def _with_results(
    inputs: pa.Table,
    keys: list[str],
    checkpoint: Checkpoint,
    layout: Layout,
    current: list[str] | None = None,
) -> tuple[pa.Table, list[bool]]:
    """The input batch with its result columns appended, and which rows have a result."""
    names = [c.name for c in RESULT_COLUMNS]
    if layout.tool_calls:
        names.append("tool_calls")
    if layout.schema is not None:
        names.append("parsed")
    stored = checkpoint.fetch(keys, names, current)
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


def _convert(parquet: Path, fmt: str) -> Path:
    """Rewrite the assembled Parquet as CSV or JSON lines beside it (streaming)."""
    converted = parquet.with_name(parquet.name.removesuffix(".tmp") + f".{fmt}.tmp")
    try:
        frame = pl.scan_parquet(parquet)
        if fmt == "csv":
            frame.sink_csv(converted)
        else:
            frame.sink_ndjson(converted)
    except BaseException:
        converted.unlink(missing_ok=True)
        raise
    finally:
        parquet.unlink(missing_ok=True)
    return converted


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
