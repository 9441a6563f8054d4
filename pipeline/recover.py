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

from pipeline.checkpoint import EXTRA_FIELDS, RESULT_FIELDS, Checkpoint
from pipeline.output import NOT_PROCESSED, Layout
from pipeline.plan import WorkPlan

READ_BATCH_ROWS = 10_000


def adopt_output(output: Path, checkpoint: Checkpoint, plan: WorkPlan, layout: Layout) -> int:
    """Record the answered rows of `output` in an empty checkpoint; returns how many.

    Rows the output marks as never processed are left out; anything that cannot be
    read as this job's output adopts nothing (the run then sends as usual).
    """
    if not output.exists() or output.suffix.lower() != ".parquet":
        return 0
    needed = set(plan.renderer.variables) | set(RESULT_FIELDS)
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
        results = batch.select(RESULT_FIELDS).rows()
        tool_calls = (
            batch["tool_calls"].to_list() if "tool_calls" in batch.columns else [None] * len(keys)
        )
        parsed = _parsed(batch, layout)
        rows = [
            (key, request_hash, *result, calls, answer)
            for key, request_hash, result, calls, answer in zip(
                keys, hashes, results, tool_calls, parsed, strict=True
            )
            if result[-1] != NOT_PROCESSED
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


assert len(EXTRA_FIELDS) == 2, "tool_calls and parsed, in that order"
