"""Reduce groups too large for one request: split by a token budget, then combined.

With `reduce.max_prompt_tokens`, a group whose rows estimate (~4 characters a token,
each row as JSON) over the budget is cut into parts of whole rows, in order, each under
it (a single row over it is a part of its own: rows are never cut). Each part is one
request of the step, with the part's rows as `rows`. For a group of more than one part,
one more request combines the parts' answers: the `reduce.combine` prompt (or
`DEFAULT_COMBINE`), whose `rows` are the parts' answers (`r.response`, `r.part`, in
order) and whose variables include the `by` columns. The group's row in the reduce
output has the combined answer, and its tokens, cost and attempts add up every request
the group took, so the cost columns still add up to the run's total.
"""

from __future__ import annotations

import math
from typing import Any

import orjson
import polars as pl

from pipeline.spec import PromptSpec, ReduceSpec, StepSpec

PART, PARTS = "part", "parts"  # a part's number in its group, and the group's parts
ROWS = "rows"
ADDED_UP = (
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "total_tokens",
    "cost_usd",
    "attempts",
)
DEFAULT_COMBINE = PromptSpec(
    template=(
        "Combine these {{ rows|length }} partial answers into one answer:\n"
        "{% for r in rows %}- {{ r.response }}\n{% endfor %}"
    )
)


def splits(step: StepSpec) -> bool:
    return step.reduce is not None and step.reduce.max_prompt_tokens is not None


def row_tokens(row: dict[str, Any]) -> int:
    return math.ceil(len(orjson.dumps(row, default=str)) / 4)


def split_groups(groups: pl.DataFrame, step: StepSpec) -> pl.DataFrame:
    """Each group as one or more parts of whole rows, each under the step's budget."""
    assert step.reduce is not None and step.reduce.max_prompt_tokens is not None
    budget, by = step.reduce.max_prompt_tokens, step.reduce.by
    parts: list[dict[str, Any]] = []
    for group in groups.iter_rows(named=True):
        cut = _packed(group[ROWS], budget)
        for number, rows in enumerate(cut):
            parts.append({**{c: group[c] for c in by}, PART: number, PARTS: len(cut), ROWS: rows})
    schema: dict[str, Any] = {**{c: groups.schema[c] for c in by}, PART: pl.Int64, PARTS: pl.Int64}
    return pl.DataFrame(parts, schema={**schema, ROWS: groups.schema[ROWS]})


def _packed(rows: list[dict[str, Any]], budget: int) -> list[list[dict[str, Any]]]:
    parts: list[list[dict[str, Any]]] = [[]]
    used = 0
    for row in rows:
        tokens = row_tokens(row)
        if parts[-1] and used + tokens > budget:
            parts.append([])
            used = 0
        parts[-1].append(row)
        used += tokens
    return parts


def combine_step(step: StepSpec) -> StepSpec:
    """The step that combines a split group's parts: the step's model, limits and
    schema, the combine prompt, its own record."""
    assert step.reduce is not None
    return StepSpec(
        name=f"{step.name}_combine",
        prompt=step.reduce.combine or DEFAULT_COMBINE,
        reduce=ReduceSpec(by=step.reduce.by),  # over the same groups, keyed by request
        model=step.model,
        limits=step.limits,
        output=step.output,
    )


def combine_input(answered: pl.DataFrame, step: StepSpec) -> pl.DataFrame:
    """One row per split group: its `by` columns and its parts' answers as `rows`."""
    assert step.reduce is not None
    split = answered.filter(pl.col(PARTS) > 1).sort(PART, maintain_order=True)
    return split.group_by(step.reduce.by, maintain_order=True).agg(
        pl.struct(PART, "response", "error").alias(ROWS)
    )


def merged(answered: pl.DataFrame, combined: pl.DataFrame | None, step: StepSpec) -> pl.DataFrame:
    """The step's answers, one row per group: a whole group's own, a split group's
    combined answer with every part's tokens, cost and attempts added to it."""
    assert step.reduce is not None
    by = step.reduce.by
    if combined is None or combined.height == 0:
        return answered.drop(PART, PARTS)

    def group_of(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row[c] for c in by)

    spent: dict[tuple[Any, ...], dict[str, float]] = {}
    for part in answered.filter(pl.col(PARTS) > 1).iter_rows(named=True):
        sums = spent.setdefault(group_of(part), dict.fromkeys(ADDED_UP, 0))
        for name in ADDED_UP:
            sums[name] += part[name] or 0
    answers = {group_of(row): row for row in combined.iter_rows(named=True)}
    rows = []
    for row in answered.iter_rows(named=True):
        if row[PARTS] == 1:
            rows.append(row)
        elif row[PART] == 0:
            group = group_of(row)
            final = dict(answers[group])
            for name in ADDED_UP:
                final[name] = (final[name] or 0) + spent[group][name]
            rows.append({**row, **{k: v for k, v in final.items() if k != ROWS}})
    return pl.DataFrame(rows, schema=answered.schema).drop(PART, PARTS)
