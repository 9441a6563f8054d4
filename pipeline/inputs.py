"""The input table: one CSV or Parquet file, or a glob of them, read lazily in batches."""

from __future__ import annotations

import glob
from collections.abc import Iterator, Mapping
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import SpecError

SUPPORTED = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
CSV_SCHEMA_ROWS = 10_000
CSV_TYPES: dict[str, pl.DataType] = {
    "string": pl.String(),
    "integer": pl.Int64(),
    "number": pl.Float64(),
    "boolean": pl.Boolean(),
    "date": pl.Date(),
    "datetime": pl.Datetime(),
}


class InputTable:
    """A lazily scanned input; nothing but the schema is read until asked."""

    def __init__(
        self, pattern: str, id_column: str | None = None, types: Mapping[str, str] | None = None
    ) -> None:
        self.pattern = pattern
        self.id_column = id_column
        self.paths = _expand(pattern)
        self.format = _format_of(self.paths, pattern)
        if types and self.format != "csv":
            raise SpecError("input.types: only for CSV input; a Parquet file carries its types")
        self.types = {name: CSV_TYPES[kind] for name, kind in (types or {}).items()}
        if id_column is not None:
            # Ids are labels, never numbers: 001, 01 and 1 are three different rows.
            self.types.setdefault(id_column, pl.String())
        self.opened_as = self.fingerprint()
        self._scan = self._open()
        try:
            self.schema = self._scan.collect_schema()
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise SpecError(f"input.path: cannot read {pattern}: {_short(exc)}") from None
        if not self.schema:
            raise SpecError(f"input.path: {pattern} has no columns")
        if id_column is not None and id_column not in self.schema:
            raise SpecError(
                f"input.id_column: column '{id_column}' is not in {pattern} "
                f"(columns: {', '.join(self.schema)})"
            )
        if unknown := sorted(set(types or {}) - set(self.schema)):
            raise SpecError(
                f"input.types: column(s) {', '.join(unknown)} not in {pattern} "
                f"(columns: {', '.join(self.schema)})"
            )

    @property
    def columns(self) -> list[str]:
        return list(self.schema)

    def fingerprint(self) -> tuple[object, ...]:
        """Changes when the input does: the files matched, their size, mtime and inode,
        and for Parquet each row group's row count and byte size."""
        try:
            paths = _expand(self.pattern)
            parts: list[object] = []
            for path in paths:
                parts.append((str(path), *storage.signature(path)))
                if not storage.is_remote(path):
                    parts.append(Path(path).stat().st_ino)  # replaced by a rename
                if self.format == "parquet":
                    meta = pq.ParquetFile(storage.open_input(path)).metadata
                    groups = range(meta.num_row_groups)
                    parts.append(
                        tuple(
                            (meta.row_group(g).num_rows, meta.row_group(g).total_byte_size)
                            for g in groups
                        )
                    )
            return tuple(parts)
        except (SpecError, OSError, pa.ArrowException) as exc:
            return ("unreadable", str(exc))

    def changed(self) -> bool:
        """True when the input is no longer what was read when the run was planned."""
        return self.fingerprint() != self.opened_as

    def _open(self) -> pl.LazyFrame:
        sources = [str(p) for p in self.paths]
        if self.format == "csv":
            # Only columns present get an override; a missing one is reported above.
            header = pl.scan_csv(sources, n_rows=0).collect_schema()
            overrides = {k: v for k, v in self.types.items() if k in header}
            return pl.scan_csv(
                sources, infer_schema_length=CSV_SCHEMA_ROWS, schema_overrides=overrides
            )
        return pl.scan_parquet(sources)

    def check(self) -> int:
        """Read the whole input once; returns the row count. Refuses bad ids and bad rows."""
        checks: list[pl.Expr] = [pl.len().alias("rows")]
        if self.format == "csv":
            # Parses every value, so a type that changes after row 10,000 fails here, not mid-run.
            checks.append(pl.sum_horizontal(pl.all().null_count()).alias("_nulls"))
        if self.id_column:
            ids = pl.col(self.id_column)
            checks += [ids.null_count().alias("null_ids"), ids.n_unique().alias("unique_ids")]
        try:
            stats = self._scan.select(checks).collect(engine="streaming").row(0, named=True)
        except (pl.exceptions.PolarsError, OSError) as exc:
            hint = ""
            if self.format == "csv" and isinstance(exc, pl.exceptions.ComputeError):
                hint = (
                    f"; a column's type is guessed from its first {CSV_SCHEMA_ROWS:,} rows: "
                    "give it in input.types (e.g. `types: {zip: string}`)"
                )
            raise SpecError(
                f"input.path: cannot read {self.pattern}: {_short(exc)}{hint}"
            ) from None
        rows = int(stats["rows"])
        if self.id_column:
            self._check_ids(stats, rows)
        return rows

    def _check_ids(self, stats: dict[str, int], rows: int) -> None:
        if stats["null_ids"]:
            raise SpecError(
                f"input.id_column: column '{self.id_column}' has {stats['null_ids']} empty "
                "value(s); every row needs an id"
            )
        if stats["unique_ids"] != rows:
            duplicates = (
                self._scan.group_by(self.id_column)
                .len()
                .filter(pl.col("len") > 1)
                .head(3)
                .collect()
            )
            shown = ", ".join(repr(v) for v in duplicates.to_series(0).to_list())
            raise SpecError(
                f"input.id_column: column '{self.id_column}' must be unique, "
                f"but {rows - stats['unique_ids']} value(s) repeat, e.g. {shown}"
            )

    def batches(
        self, batch_size: int, limit: int | None = None, start: int = 0, stop: int | None = None
    ) -> Iterator[pl.DataFrame]:
        """Yield the input in order, `batch_size` rows at a time: the first `limit` rows,
        or rows `start` to `stop` of those."""
        end = stop if limit is None else min(limit, stop if stop is not None else limit)
        if self.format == "parquet":
            yield from self._parquet_batches(batch_size, start, end)
            return
        scan = self._scan.slice(start, None if end is None else max(0, end - start))
        for batch in scan.collect_batches(chunk_size=batch_size):
            if batch.height:
                yield batch

    def _parquet_batches(
        self, batch_size: int, start: int, end: int | None
    ) -> Iterator[pl.DataFrame]:
        # pyarrow reads one row group at a time and waits for the consumer; polars'
        # collect_batches reads ahead without bound, which holds the whole input in memory.
        position = 0
        for path in self.paths:
            source = pq.ParquetFile(storage.open_input(path))
            for group in range(source.metadata.num_row_groups):
                rows = source.metadata.row_group(group).num_rows
                if position + rows <= start:
                    position += rows  # wholly before the start: not even read
                    continue
                for record_batch in source.iter_batches(batch_size=batch_size, row_groups=[group]):
                    frame = pl.from_arrow(record_batch)
                    assert isinstance(frame, pl.DataFrame)
                    low = max(start - position, 0)
                    high = frame.height if end is None else min(frame.height, end - position)
                    if high > low:
                        yield frame.slice(low, high - low).cast(self.schema)  # type: ignore[arg-type]
                    position += frame.height
                    if end is not None and position >= end:
                        return


def _expand(pattern: str) -> list[Path | str]:
    if storage.is_remote(pattern):
        return list(storage.expand(pattern))
    if glob.has_magic(pattern):
        paths: list[Path | str] = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not paths:
            raise SpecError(f"input.path: no file matches '{pattern}'")
        return paths
    path = Path(pattern)
    if not path.exists():
        raise SpecError(f"input.path: file not found: {pattern}")
    if path.is_dir():
        raise SpecError(f"input.path: {pattern} is a folder; name a file or a glob like dir/*.csv")
    return [path]


def _format_of(paths: list[Path | str], pattern: str) -> str:
    formats = {SUPPORTED.get(storage.suffix(p)) for p in paths}
    if None in formats:
        odd = next(p for p in paths if storage.suffix(p) not in SUPPORTED)
        raise SpecError(f"input.path: {odd} is neither .csv nor .parquet")
    if len(formats) > 1:
        raise SpecError(f"input.path: '{pattern}' mixes CSV and Parquet files; use one format")
    return formats.pop()  # type: ignore[return-value]


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def row_keys(batch: pl.DataFrame, offset: int, id_column: str | None) -> list[str]:
    """The key each row is checkpointed under: its id, else its position in the input."""
    if id_column is None:
        return [str(i) for i in range(offset, offset + batch.height)]
    return [str(v) for v in batch.get_column(id_column).to_list()]
