"""Splitting the input into shards: row ranges cut at file and row-group boundaries.

A shard is a range of the input's row positions, so a worker reads it with the same
`InputTable.batches(start=..., stop=...)` a local run uses, and every row keeps the
key (id, or position) it has on one machine. Parquet is cut at row-group boundaries
(a worker skips every row group outside its range without reading it), CSV at file
boundaries; a unit bigger than a shard is split into row ranges.

The layout is saved beside the segments on the first run and reused by every rerun,
so a resumed run finds each row's segments in the shard that wrote them.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import asdict, dataclass

import orjson
import polars as pl
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.inputs import InputTable

SHARDS_PER_WORKER = 4  # small enough to rebalance, big enough that a shard is worth a task
MIN_SHARD_ROWS = 50


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_shards(table: InputTable, rows: int, workers: int) -> list[Shard]:
    """Cut the first `rows` rows of the input into about SHARDS_PER_WORKER per worker."""
    target = max(MIN_SHARD_ROWS, math.ceil(rows / max(1, workers * SHARDS_PER_WORKER)))
    shards: list[Shard] = []
    start = position = 0
    for unit in _units(table):
        position += unit
        stop = min(position, rows)
        # Cut a big unit into pieces of the target size; glue small ones together.
        while stop - start >= 2 * target:
            shards.append(Shard(len(shards), start, start + target))
            start += target
        if stop - start >= target:
            shards.append(Shard(len(shards), start, stop))
            start = stop
        if stop >= rows:
            break
    if start < rows:
        shards.append(Shard(len(shards), start, rows))
    return shards


def _units(table: InputTable) -> list[int]:
    """Rows per indivisible unit, in input order: row groups, or whole CSV files."""
    units: list[int] = []
    for path in table.paths:
        if table.format == "parquet":
            metadata = pq.ParquetFile(storage.open_input(path)).metadata
            units.extend(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups))
        else:
            scan = pl.scan_csv(str(path), infer_schema_length=0)
            units.append(int(scan.select(pl.len()).collect().item()))
    return units


def dump(shards: list[Shard], rows: int) -> bytes:
    """The layout to save, with an id of its own: journals kept outside the shared
    folder name it, so a fresh start never replays answers of an earlier layout."""
    return orjson.dumps(
        {"rows": rows, "id": uuid.uuid4().hex, "shards": [asdict(s) for s in shards]}
    )


def load(data: bytes, rows: int) -> tuple[list[Shard], str] | None:
    """The saved layout and its id, or None when it was made for a different input."""
    try:
        saved = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if saved.get("rows") != rows:
        return None
    return [Shard(**s) for s in saved["shards"]], str(saved.get("id", ""))
