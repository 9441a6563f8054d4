"""The result columns, declared once: name, Arrow type, and how to read it from a row.

The checkpoint stores these columns, the output Parquet carries them after the
input's own columns, and status, export and the report read them by name. Adding a
column here adds it everywhere; nothing else lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter

import orjson
import pyarrow as pa

from pipeline.types import RowResult

NOT_PROCESSED = "not_processed: no result was recorded"


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: pa.DataType
    read: Callable[[RowResult], object]


def _json(value: object) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _answer(name: str) -> Callable[[RowResult], object]:
    """Read `name` from the row's completion, if it has one."""
    get = attrgetter(name)
    return lambda row: None if row.completion is None else get(row.completion)


def _usage(name: str) -> Callable[[RowResult], object]:
    """Read `name` from the row's usage, if the provider reported one."""
    get = attrgetter(name)

    def read(row: RowResult) -> object:
        usage = row.completion.usage if row.completion is not None else None
        return None if usage is None else get(usage)

    return read


# Every output file has these, in this order.
RESULT_COLUMNS: tuple[Column, ...] = (
    Column("response", pa.string(), _answer("response")),
    Column("reasoning", pa.string(), _answer("reasoning")),
    Column("prompt_tokens", pa.int64(), _usage("prompt_tokens")),
    Column("completion_tokens", pa.int64(), _usage("completion_tokens")),
    Column("reasoning_tokens", pa.int64(), _usage("reasoning_tokens")),
    Column("cached_tokens", pa.int64(), _usage("cached_tokens")),
    Column("total_tokens", pa.int64(), _usage("total_tokens")),
    Column("cost_usd", pa.float64(), attrgetter("cost_usd")),
    Column("finish_reason", pa.string(), _answer("finish_reason")),
    Column("model", pa.string(), _answer("model")),
    Column("latency_s", pa.float64(), attrgetter("latency_s")),
    Column("attempts", pa.int64(), attrgetter("attempts")),
    Column("error", pa.string(), attrgetter("error")),
)
# Stored as JSON text; they become output columns only for jobs with tools or a schema.
_tool_calls = _answer("tool_calls")
JSON_COLUMNS: tuple[Column, ...] = (
    Column("tool_calls", pa.string(), lambda row: _json(_tool_calls(row))),
    Column("parsed", pa.string(), lambda row: _json(row.parsed)),
)
STORED_COLUMNS = RESULT_COLUMNS + JSON_COLUMNS
RESULT_NAMES: tuple[str, ...] = tuple(c.name for c in RESULT_COLUMNS)


def stored_values(result: RowResult) -> tuple[object, ...]:
    """The row's value for every stored column, in STORED_COLUMNS order."""
    return tuple(column.read(result) for column in STORED_COLUMNS)
