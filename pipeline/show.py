"""`pipeline show`: the rows of an output Parquet, readable in a terminal.

Each row gets a header line (id, row number, status, tokens, cost, latency,
attempts), then its error, the input columns asked for, and its reasoning and
response, wrapped to the terminal's width.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl

from pipeline.report import Target, input_columns, result_columns

INDENT = "    "


@dataclass(frozen=True)
class ShowOptions:
    errors_only: bool = False
    row_id: str | None = None
    id_column: str | None = None
    columns: tuple[str, ...] = ()
    limit: int = 20  # 0: every row
    width: int | None = None  # None: the terminal's


class ShowError(ValueError):
    """The arguments name a column or row that is not in the output."""


def _id_column(frame: pl.DataFrame, target: Target, options: ShowOptions) -> str | None:
    inputs = input_columns(frame)
    if options.id_column is not None:
        if options.id_column not in inputs:
            raise ShowError(f"--id-column {options.id_column}: no such input column")
        return options.id_column
    if target.from_job:
        return target.id_column  # None: the job keys its rows by position
    # A bare Parquet: its first input column, when that is unique.
    first = inputs[0] if inputs else None
    if first is not None and frame.get_column(first).n_unique() == frame.height:
        return first
    return None


def render_rows(target: Target, options: ShowOptions) -> Iterator[str]:
    """The text of `pipeline show`, one block per row."""
    frame = pl.read_parquet(target.source)
    width = max(options.width or shutil.get_terminal_size((100, 24)).columns, 40)
    id_column = _id_column(frame, target, options)
    inputs = input_columns(frame)
    unknown = [c for c in options.columns if c not in inputs]
    if unknown:
        raise ShowError(
            f"--columns: no input column {', '.join(unknown)}; "
            f"the input columns are {', '.join(inputs)}"
        )
    selected = frame.with_row_index("_row")
    if options.errors_only:
        selected = selected.filter(pl.col("error").is_not_null())
    if options.row_id is not None:
        selected = _by_id(selected, id_column, options.row_id)
    total = selected.height
    if options.limit:
        selected = selected.head(options.limit)
    if total == 0:
        yield "no failing rows" if options.errors_only else "no rows"
        return
    typed = result_columns(frame)
    for row in selected.iter_rows(named=True):
        yield _block(row, id_column, options.columns, width, typed)
    if selected.height < total:
        yield f"showing {selected.height} of {total} rows; --limit 0 shows all"


def _by_id(frame: pl.DataFrame, id_column: str | None, wanted: str) -> pl.DataFrame:
    """The row whose id is `wanted`, else (a whole number) the row at that position."""
    if id_column is not None:
        found = frame.filter(pl.col(id_column).cast(pl.String) == wanted)
        if found.height:
            return found
    if wanted.isdigit():
        found = frame.filter(pl.col("_row") == int(wanted))
        if found.height:
            return found
    what = f"{id_column} or row number" if id_column else "row number"
    raise ShowError(f"--id {wanted}: no row has that {what}")


def _block(
    row: dict[str, Any],
    id_column: str | None,
    columns: tuple[str, ...],
    width: int,
    typed: list[str],
) -> str:
    failed = row["error"] is not None
    name = f"{row[id_column]} (row {row['_row']})" if id_column else f"row {row['_row']}"
    facts = [
        name,
        "FAILED" if failed else "ok",
    ]
    if row["prompt_tokens"] is not None:
        facts.append(
            f"{row['prompt_tokens']} in / {row['completion_tokens'] or 0} out / "
            f"{row['reasoning_tokens'] or 0} reasoning tokens"
        )
    if row["cost_usd"] is not None:
        facts.append(f"${row['cost_usd']:.6f}")
    if row["latency_s"] is not None:
        facts.append(latency_text(row["latency_s"]))
    attempts = row["attempts"] or 0
    facts.append(f"{attempts} attempt{'' if attempts == 1 else 's'}")
    header = textwrap.fill(" · ".join(facts), width, subsequent_indent=INDENT)
    lines = [_bold(header, failed)]
    if failed:
        lines.append(_field("error", row["error"], width))
    for column in columns:
        lines.append(_field(column, row[column], width))
    values = [(c, row[c]) for c in typed if row[c] is not None]
    if row["reasoning"] is not None:
        lines.append(_field("reasoning", row["reasoning"], width))
    for column, value in values:
        lines.append(_field(column, value, width))
    # Typed columns say it all; the raw answer matters when there are none (or it failed).
    if row["response"] is not None and (failed or not values):
        lines.append(_field("response", row["response"], width))
    return "\n".join(lines) + "\n"


def latency_text(seconds: float) -> str:
    """Seconds, or milliseconds for answers under a tenth of a second (fast errors)."""
    return f"{seconds:.2f}s" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def _field(label: str, value: Any, width: int) -> str:
    """`  label: value` when it fits on one line, else the label and the value wrapped below."""
    text = "" if value is None else str(value)
    inline = f"  {label}: {text}"
    if len(inline) <= width and "\n" not in text:
        return inline
    paragraphs = [
        textwrap.fill(part, width, initial_indent=INDENT, subsequent_indent=INDENT) or INDENT
        for part in text.splitlines() or [""]
    ]
    return f"  {label}:\n" + "\n".join(p.rstrip() for p in paragraphs)


def _bold(text: str, failed: bool) -> str:
    import click

    return click.style(text, bold=True, fg="red" if failed else None)
