"""The result columns, declared once: name, Arrow type, and where a row keeps the value.

The checkpoint stores these columns, the output Parquet carries them after the
input's own columns, and status, export and the report read them by name. Adding a
column here adds it everywhere; nothing else lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal

import numpy as np
import orjson
import polars as pl
import pyarrow as pa

from pipeline.types import RowResult

NOT_PROCESSED = "not_processed: no result was recorded"
Source = Literal["completion", "usage", "row"]


@dataclass(frozen=True, slots=True)
class Column:
    """`source.attribute` of a `RowResult` (`completion`, its `usage`, or the row itself)."""

    name: str
    type: pa.DataType
    source: Source
    json: bool = False  # stored as JSON text

    def read(self, row: RowResult) -> object:
        value = _sources(row)[self.source]
        value = None if value is None else getattr(value, self.name)
        return _json(value) if self.json else value


# Built through polars: `pa.array` imports pandas whenever it is installed, which
# costs half a second at the end of every run.
_POLARS_TYPES: dict[pa.DataType, pl.DataType] = {
    pa.string(): pl.String(),
    pa.int64(): pl.Int64(),
    pa.float64(): pl.Float64(),
    pa.bool_(): pl.Boolean(),
}


def arrow_array(values: Sequence[Any], type: pa.DataType) -> pa.Array:
    """`values` (None for null) as an Arrow array of `type`."""
    dtype = _POLARS_TYPES.get(type)
    if dtype is None:
        return pa.array(values, type=type)
    array = pl.Series(values=values, dtype=dtype).to_arrow()
    if array.type == pa.large_string() and type == pa.string():
        return _narrow_offsets(array)
    return array if array.type == type else array.cast(type)


def _narrow_offsets(array: pa.Array) -> pa.Array:
    """A `large_string` array as `string`, sharing its data.

    `cast` would do it, but it loads `pyarrow.compute`: 80 ms at the end of every run.
    """
    validity, offsets, data = array.buffers()
    wide = np.frombuffer(offsets, dtype=np.int64)
    if len(wide) and wide[-1] > np.iinfo(np.int32).max:
        return array.cast(pa.string())  # over 2 GiB of text: Arrow says why it can't
    narrow = pa.py_buffer(wide.astype(np.int32))
    return pa.Array.from_buffers(
        pa.string(), len(array), [validity, narrow, data], array.null_count, array.offset
    )


def _sources(row: RowResult) -> dict[Source, object]:
    completion = row.completion
    usage = completion.usage if completion is not None else None
    return {"completion": completion, "usage": usage, "row": row}


def _json(value: object) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


# Every output file has these, in this order.
RESULT_COLUMNS: tuple[Column, ...] = (
    Column("response", pa.string(), "completion"),
    Column("reasoning", pa.string(), "completion"),
    Column("prompt_tokens", pa.int64(), "usage"),
    Column("completion_tokens", pa.int64(), "usage"),
    Column("reasoning_tokens", pa.int64(), "usage"),
    Column("cached_tokens", pa.int64(), "usage"),
    Column("cache_write_tokens", pa.int64(), "usage"),
    Column("total_tokens", pa.int64(), "usage"),
    Column("cost_usd", pa.float64(), "row"),
    Column("finish_reason", pa.string(), "completion"),
    Column("model", pa.string(), "completion"),
    Column("system_fingerprint", pa.string(), "completion"),
    Column("service_tier", pa.string(), "completion"),
    Column("latency_s", pa.float64(), "row"),
    Column("attempts", pa.int64(), "row"),
    Column("error", pa.string(), "row"),
)
# They become output columns only for jobs with tools or a schema.
JSON_COLUMNS: tuple[Column, ...] = (
    Column("tool_calls", pa.string(), "completion", json=True),
    Column("parsed", pa.string(), "row", json=True),
)
RESULT_NAMES: tuple[str, ...] = tuple(c.name for c in RESULT_COLUMNS)


def _getter(columns: list[Column]) -> Callable[[object], tuple[object, ...]]:
    """Reads the columns' attributes at once (operator.attrgetter runs in C)."""
    if not columns:
        return lambda value: ()
    get = attrgetter(*(c.name for c in columns))
    return (lambda value: (get(value),)) if len(columns) == 1 else get


# The checkpoint stores the columns grouped by where they come from, so a few C-level
# attrgetters read a row: this runs once per answer, on the event loop.
def _group(source: Source, json: bool) -> list[Column]:
    return [c for c in RESULT_COLUMNS + JSON_COLUMNS if c.source == source and c.json == json]


_COMPLETION, _USAGE, _ROW = (_group(s, False) for s in ("completion", "usage", "row"))
_COMPLETION_JSON, _ROW_JSON = _group("completion", True), _group("row", True)
assert not _group("usage", True), "usage holds numbers only"
STORED_COLUMNS: tuple[Column, ...] = (*_COMPLETION, *_USAGE, *_ROW, *_COMPLETION_JSON, *_ROW_JSON)
_get_completion, _get_usage, _get_row = _getter(_COMPLETION), _getter(_USAGE), _getter(_ROW)
_get_completion_json, _get_row_json = _getter(_COMPLETION_JSON), _getter(_ROW_JSON)
_NO_COMPLETION = (None,) * len(_COMPLETION)
_NO_USAGE = (None,) * len(_USAGE)
_NO_COMPLETION_JSON = (None,) * len(_COMPLETION_JSON)


def stored_values(row: RowResult) -> tuple[object, ...]:
    """The row's value for every stored column, in STORED_COLUMNS order."""
    completion = row.completion
    usage = completion.usage if completion is not None else None
    return (
        *(_NO_COMPLETION if completion is None else _get_completion(completion)),
        *(_NO_USAGE if usage is None else _get_usage(usage)),
        *_get_row(row),
        *map(_json, _get_completion_json(completion) if completion else _NO_COMPLETION_JSON),
        *map(_json, _get_row_json(row)),
    )
