"""Rebuilding a lost checkpoint from the complete output beside it.

The output holds every input column and every result column, so each of its rows
can be keyed and hashed exactly as the planner does: a row whose request is
unchanged gets its answer back instead of being paid for again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.checkpoint import Checkpoint
from pipeline.columns import NOT_PROCESSED, RESULT_COLUMNS, STORED_COLUMNS
from pipeline.output import Layout
from pipeline.plan import WorkPlan

READ_BATCH_ROWS = 10_000


def adopt_output(output: Path, checkpoint: Checkpoint, plan: WorkPlan, layout: Layout) -> int:
    """Record the answered rows of `output` in an empty checkpoint; returns how many.

    Rows the output marks as never processed are left out; anything that cannot be
    read as this job's output adopts nothing (the run then sends as usual).
    """
    if not output.exists() or output.suffix.lower() != ".parquet":
        return 0
    needed = set(plan.renderer.variables) | {c.name for c in RESULT_COLUMNS}
    if plan.table.id_column:
        needed.add(plan.table.id_column)
    try:
        source = pq.ParquetFile(output)
        if not needed <= set(source.schema_arrow.names):
            return 0
        adopted = 0
        for rows in _records(source, plan, layout):
            checkpoint.import_results(rows)
            adopted += len(rows)
        return adopted
    except (OSError, pa.ArrowException, pl.exceptions.PolarsError):
        return 0


def _records(
    source: pq.ParquetFile, plan: WorkPlan, layout: Layout
) -> Iterator[list[tuple[Any, ...]]]:
    offset = 0
    for record_batch in source.iter_batches(batch_size=READ_BATCH_ROWS):
        batch = pl.from_arrow(record_batch)
        assert isinstance(batch, pl.DataFrame)
        hashes = plan.hashes_for(batch)
        keys = plan.keys_for(batch, offset, hashes)
        parsed = _parsed(batch, layout)
        columns: list[list[Any]] = []
        for column in STORED_COLUMNS:
            if column.name == "parsed":
                columns.append(parsed)
            elif column.name in batch.columns:
                columns.append(batch[column.name].to_list())
            else:
                columns.append([None] * batch.height)
        errors = batch["error"].to_list()
        rows = [
            (key, request_hash, *values)
            for key, request_hash, error, *values in zip(
                keys, hashes, errors, *columns, strict=True
            )
            if error != NOT_PROCESSED
        ]
        offset += batch.height
        yield rows


def _parsed(batch: pl.DataFrame, layout: Layout) -> list[str | None]:
    if layout.schema is None:
        return [None] * batch.height
    columns = [c for c in layout.schema.columns if c in batch.columns]
    if not columns:
        return [None] * batch.height
    errors = batch["error"].to_list()
    return [
        None if error is not None else orjson.dumps(row, default=str).decode()
        for row, error in zip(batch.select(columns).to_dicts(), errors, strict=True)
    ]
