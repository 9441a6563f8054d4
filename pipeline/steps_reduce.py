"""Reduce groups too large for one request: split by a token budget, then combined.

With `reduce.max_prompt_tokens`, a group whose rows estimate (~4 characters a token,
each row as JSON) over the budget is cut into parts of whole rows, in order, each under
it (a single row over it is a part of its own: rows are never cut). Each part is one
request of the step, with the part's rows as `rows`. For a group of more than one part,
one more request combines the parts' answers: the `reduce.combine` prompt (or
`DEFAULT_COMBINE`), whose `rows` are the parts' answers (`r.response`, `r.part`, in
order) and whose variables include the `by` columns. The group's row in the reduce
output has the combined answer, and its tokens, cost and attempts add up every request
the group took, so the cost columns still add up to the run's total. A group a part
of which failed gets that part's error instead of a combined answer: it is not combined
from the parts that did answer, which would leave the failed part's rows out unseen.

Combining goes in rounds: when a group's parts' answers do not fit one combining
request (by the same budget or window), they are cut into parts in turn, each part's
answers combined, and those answers combined again, until one request holds them all.
Round 1 is the step `<name>_combine`, round n the step `<name>_combine_<n>`, each with
its own record. A round must make a group smaller: answers each too large to share a
request with another are sent together whole, and the check before sending (or the
provider) makes that the group's error.

Without `max_prompt_tokens`, a step whose model has a known context window
(`model.context_window`, else configs/pricing.yaml) splits a group only when its prompt,
rendered, estimates over `window_budget`: the window less the answer's room, times
`PROMPT_SHARE`. Its parts are packed by what each row adds to the rendered prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import orjson
import polars as pl

from pipeline.config import context_window, load_preset
from pipeline.errors import SpecError
from pipeline.plan import requested_reply_tokens
from pipeline.render import PromptRenderer, estimate_prompt_tokens
from pipeline.spec import JobSpec, ModelSpec, PromptSpec, ReduceSpec, StepSpec

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


# Room kept for the answer when the request names no max_tokens: a reasoning model's
# thinking fills the window too.
REPLY_RESERVE = 4096
# The share of what the window leaves after the answer that a prompt may fill: the
# estimate counts ~4 characters a token, and some text takes more tokens than that.
PROMPT_SHARE = 0.75


def with_reduce_models(spec: JobSpec) -> JobSpec:
    """The job with each reduce step's model named on the step, so that the step alone
    says whether it splits by its model's context window; a budget set over the window,
    or an answer that leaves no room in it, is refused."""
    if spec.steps is None:
        return spec
    return spec.model_copy(update={"steps": [_with_model(spec, step) for step in spec.steps]})


def _with_model(spec: JobSpec, step: StepSpec) -> StepSpec:
    if step.reduce is None:
        return step
    model = step.model or spec.model
    window = context_window(model)
    chosen = step.reduce.max_prompt_tokens
    if window is not None and chosen is not None and chosen > window:
        raise SpecError(
            f"steps.{step.name}.reduce.max_prompt_tokens: {chosen:,} is more than model "
            f"{model.model}'s context window of {window:,} tokens; lower it (leaving room "
            "for the answer) or remove it to split by what fits in the window"
        )
    if window is not None and chosen is None:
        reply = reply_room(model, f"steps.{step.name}")
        if window_budget(window, reply) < 1:
            raise SpecError(
                f"steps.{step.name}.model.params: an answer of up to {reply:,} tokens leaves "
                f"no room for a prompt in model {model.model}'s context window of "
                f"{window:,} tokens; lower max_tokens"
            )
    return step.model_copy(update={"model": model})


def window_budget(window: int, reply: int) -> int:
    """Estimated prompt tokens a request may hold to fit in `window` with an answer of
    `reply` tokens."""
    return math.floor((window - reply) * PROMPT_SHARE)


def reply_room(model: ModelSpec, where: str) -> int:
    """The answer's room in the window: the request's max_tokens (the job's, else the
    provider's default), else `REPLY_RESERVE`."""
    try:
        preset = load_preset(model.provider)
    except SpecError as exc:
        raise SpecError(f"{where}: {exc}") from None
    return requested_reply_tokens({**preset.default_params, **model.params}) or REPLY_RESERVE


def _window_of(step: StepSpec) -> int | None:
    return context_window(step.model) if step.model is not None else None


def splits(step: StepSpec) -> bool:
    """Whether the step's groups may be sent in parts: a budget set, or a known window."""
    if step.reduce is None:
        return False
    return step.reduce.max_prompt_tokens is not None or _window_of(step) is not None


def row_tokens(row: dict[str, Any]) -> int:
    return math.ceil(len(orjson.dumps(row, default=str)) / 4)


Rows = list[dict[str, Any]]


def split_groups(
    groups: pl.DataFrame, step: StepSpec, *, must_shrink: bool = False
) -> pl.DataFrame:
    """Each group as one or more parts of whole rows, each under the step's budget. With
    `must_shrink` (a combining round), a group that would have as many parts as rows is
    one part: another round would not bring it closer to one request."""
    assert step.reduce is not None
    by = step.reduce.by
    cut = _cutter(step)
    parts: list[dict[str, Any]] = []
    for group in groups.iter_rows(named=True):
        pieces = cut(group)
        if must_shrink and len(pieces) >= len(group[ROWS]):
            pieces = [group[ROWS]]
        for number, rows in enumerate(pieces):
            parts.append(
                {**{c: group[c] for c in by}, PART: number, PARTS: len(pieces), ROWS: rows}
            )
    schema: dict[str, Any] = {**{c: groups.schema[c] for c in by}, PART: pl.Int64, PARTS: pl.Int64}
    return pl.DataFrame(parts, schema={**schema, ROWS: groups.schema[ROWS]})


def _cutter(step: StepSpec) -> Callable[[dict[str, Any]], list[Rows]]:
    assert step.reduce is not None
    budget = step.reduce.max_prompt_tokens
    if budget is not None:
        chosen = budget
        return lambda group: packed(group[ROWS], [row_tokens(r) for r in group[ROWS]], chosen)
    window = _window_of(step)
    assert window is not None and step.model is not None
    limit = window_budget(window, reply_room(step.model, f"steps.{step.name}"))
    return WindowCut(step.prompt, limit)


class WindowCut:
    """Parts of a group whose rendered prompts each estimate within `limit` tokens: the
    group whole when it fits, else packed by what each row adds to the prompt."""

    def __init__(self, prompt: PromptSpec, limit: int) -> None:
        self.renderer = PromptRenderer(prompt)
        self.limit = limit

    def __call__(self, group: dict[str, Any]) -> list[Rows]:
        rows = group[ROWS]
        try:
            if self._tokens(group, rows) <= self.limit:
                return [rows]
            base = self._tokens(group, [])
            sizes = [self._tokens(group, [row]) - base for row in rows]
        except Exception:  # the run names the template's error on each part it fails on
            return packed(rows, [row_tokens(r) for r in rows], self.limit)
        return packed(rows, sizes, self.limit - base)

    def _tokens(self, group: dict[str, Any], rows: Rows) -> int:
        values = {**group, ROWS: rows}
        messages = self.renderer.render(tuple(values[v] for v in self.renderer.variables))
        return estimate_prompt_tokens(messages)


def packed(rows: Rows, sizes: list[int], budget: int) -> list[Rows]:
    """`rows` in order, cut into parts whose sizes add up to `budget` at most (a row over
    it alone: rows are never cut)."""
    parts: list[Rows] = [[]]
    used = 0
    for row, size in zip(rows, sizes, strict=True):
        if parts[-1] and used + size > budget:
            parts.append([])
            used = 0
        parts[-1].append(row)
        used += size
    return parts


def combine_step(step: StepSpec, round_number: int = 1) -> StepSpec:
    """The step of one combining round of a split group's parts: the step's model,
    limits, schema and budget, the combine prompt, its own record."""
    assert step.reduce is not None
    suffix = "" if round_number == 1 else f"_{round_number}"
    return StepSpec(
        name=f"{step.name}_combine{suffix}",
        prompt=step.reduce.combine or DEFAULT_COMBINE,
        # over the same groups, keyed by request, cut by the same budget
        reduce=ReduceSpec(by=step.reduce.by, max_prompt_tokens=step.reduce.max_prompt_tokens),
        model=step.model,
        limits=step.limits,
        output=step.output,
    )


def combine_parts(groups: pl.DataFrame, combining: StepSpec) -> pl.DataFrame:
    """A combining round's requests: each group's answers to combine (`combine_input`) in
    parts that fit one request, as a reduce step's groups are cut."""
    if not splits(combining):
        by = [pl.col(c) for c in groups.columns if c != ROWS]
        return groups.select(*by, pl.lit(0).alias(PART), pl.lit(1).alias(PARTS), ROWS)
    return split_groups(groups, combining, must_shrink=True)


def combine_input(answered: pl.DataFrame, step: StepSpec) -> pl.DataFrame:
    """One row per split group whose every part answered: its `by` columns and its
    parts' answers as `rows`."""
    assert step.reduce is not None
    by = step.reduce.by
    split = answered.filter(pl.col(PARTS) > 1).sort(PART, maintain_order=True)
    whole = split.filter(pl.col("error").is_null().all().over(by))
    return whole.group_by(by, maintain_order=True).agg(
        pl.struct(PART, "response", "error").alias(ROWS)
    )


def merged(answered: pl.DataFrame, combined: pl.DataFrame | None, step: StepSpec) -> pl.DataFrame:
    """The step's answers, one row per group: a whole group's own, a split group's
    combined answer (or its first failed part's error) with every part's tokens, cost
    and attempts added to it."""
    assert step.reduce is not None
    by = step.reduce.by

    def group_of(row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row[c] for c in by)

    spent: dict[tuple[Any, ...], dict[str, float]] = {}
    failed: dict[tuple[Any, ...], dict[str, Any]] = {}
    for part in answered.filter(pl.col(PARTS) > 1).iter_rows(named=True):
        sums = spent.setdefault(group_of(part), dict.fromkeys(ADDED_UP, 0))
        for name in ADDED_UP:
            sums[name] += part[name] or 0
        if part["error"] is not None:
            failed.setdefault(group_of(part), part)
    answers = {
        group_of(row): row
        for row in (combined.iter_rows(named=True) if combined is not None else [])
    }
    rows = []
    for row in answered.iter_rows(named=True):
        if row[PARTS] == 1:
            rows.append(row)
        elif row[PART] == 0:
            group = group_of(row)
            final = _group_answer(row, failed.get(group), answers.get(group))
            for name in ADDED_UP:
                final[name] = (final[name] or 0) + spent[group][name]
            rows.append(final)
    return pl.DataFrame(rows, schema=answered.schema).drop(PART, PARTS)


def _group_answer(
    first: dict[str, Any], failed: dict[str, Any] | None, combined: dict[str, Any] | None
) -> dict[str, Any]:
    """A split group's row, with the tokens, cost and attempts of any request beyond its
    parts (the combining one): the failed part's error, or the combined answer."""
    parts = first[PARTS]
    if failed is not None:
        error = f"part {failed[PART] + 1} of {parts}: {failed['error']}"
        return {**failed, **dict.fromkeys(ADDED_UP, 0), "error": error}
    if combined is None:  # the combining run recorded no answer for the group
        error = f"combining the {parts} parts: no answer was recorded"
        return {**first, **dict.fromkeys(ADDED_UP, 0), "response": None, "error": error}
    answer = {**first, **{k: v for k, v in combined.items() if k != ROWS}}
    if answer["error"] is not None:
        answer["error"] = f"combining the {parts} parts: {answer['error']}"
    return answer
