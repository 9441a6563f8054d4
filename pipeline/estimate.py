"""What a job will cost and how long it will take, before it runs (or what is left of it).

Only rows still to send are priced: rows an earlier run answered for their current
request are paid for already and counted apart. Prompt tokens are counted for every
row left: offline (~4 characters a token plus per-message overhead), calibrated
against the provider's `count_tokens` endpoint on the first of them where it has one.
Output tokens are only known from real answers: `--sample N` measures output,
reasoning and latency on the first N rows, sending those of them that have no answer
yet (they are checkpointed, so the full run reuses them and nobody pays twice) and
reading the answers of the others from the checkpoint. Without a sample the report
gives the range from "no output" to "every reply at max_tokens". No completion
request is sent unless a sample is asked for.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import anyio

from pipeline.checkpoint import Checkpoint
from pipeline.config import Price
from pipeline.connect import open_provider
from pipeline.errors import ProviderError
from pipeline.executor import execute_async
from pipeline.job import ResolvedJob
from pipeline.plan import WorkPlan, max_reply_tokens, rendered_rows
from pipeline.providers.base import Provider
from pipeline.render import estimate_prompt_tokens
from pipeline.runs import RunOptions
from pipeline.types import ChatRequest, Message, Usage

CALIBRATION_ROWS = 100
COUNT_CONCURRENCY = 8


@dataclass
class Estimate:
    rows: int  # rows still to send: the ones priced
    input_tokens: int
    counted_with: str
    max_output_per_row: int
    sample_rows: int = 0
    output_per_row: float | None = None
    reasoning_per_row: float | None = None
    latency_s: float | None = None
    cached_share: float = 0.0  # of prompt tokens, as measured on the sample
    cost_input: float | None = None
    cost_expected: float | None = None
    cost_worst: float | None = None
    # The same through the provider's batch API (None: no batch API or no batch price).
    batch_cost_input: float | None = None
    batch_cost_expected: float | None = None
    batch_cost_worst: float | None = None
    wall_s: float | None = None
    wall_basis: str = ""
    answered: int = 0  # rows an earlier run answered for their current request: not priced
    sample_sent: int = 0  # of the sample's rows, those sent now (the rest were answered)


async def estimate(job: ResolvedJob, *, sample: int = 0) -> Estimate:
    sent = await _send_sample(job, sample) if sample > 0 else 0
    local: list[int] = []
    first: list[list[Message]] = []
    for messages in await anyio.to_thread.run_sync(_rows_left, job):
        local.append(estimate_prompt_tokens(messages))
        if len(first) < CALIBRATION_ROWS:
            first.append(messages)
    answered = job.rows - len(local)
    settings = job.settings
    async with open_provider(
        settings, connections=COUNT_CONCURRENCY, timeout_s=job.spec.limits.timeout_s
    ) as provider:
        counted = await _count(provider, first)
    input_tokens, counted_with = sum(local), "offline estimate (~4 characters a token)"
    calibrated = sum(local[: len(first)])
    if counted is not None and calibrated > 0:
        scale = sum(counted) / calibrated
        input_tokens = round(sum(local) * scale)
        counted_with = f"count_tokens endpoint on {len(first)} rows, scaled to all rows"
    result = Estimate(
        rows=len(local),
        input_tokens=input_tokens,
        counted_with=counted_with,
        max_output_per_row=max_reply_tokens(settings.params),
        answered=answered,
        sample_sent=sent,
    )
    if sample > 0:
        await anyio.to_thread.run_sync(_measure, job, sample, result)
    _price(job, result)
    _time(job, result)
    return result


async def _count(provider: Provider, rows: list[list[Message]]) -> list[int] | None:
    try:
        first = await provider.count_tokens(rows[0]) if rows else None
    except ProviderError:
        return None  # best effort (no key set, say): the offline estimate stands
    if first is None:
        return None  # this provider has no endpoint for it
    counts = [first] + [0] * (len(rows) - 1)
    limiter = anyio.CapacityLimiter(COUNT_CONCURRENCY)

    async def count(i: int, messages: list[Message]) -> None:
        async with limiter:
            counts[i] = await provider.count_tokens(messages) or 0

    async with anyio.create_task_group() as group:
        for i, messages in enumerate(rows[1:], start=1):
            group.start_soon(count, i, messages)
    return counts


def _rows_left(job: ResolvedJob) -> list[list[Message]]:
    """The messages of every row a run would still send: all of them before the first run."""
    if not job.checkpoint_path.exists():
        return list(rendered_rows(job.table, job.renderer, job.limit))
    checkpoint = Checkpoint(job.checkpoint_path)
    try:
        planned = job.plan(checkpoint).requests()
        return [item.messages for item in planned if isinstance(item, ChatRequest)]
    finally:
        checkpoint.close()


async def _send_sample(job: ResolvedJob, sample: int) -> int:
    """Send the first `sample` rows that have no answer yet; returns how many were sent."""
    options = RunOptions(show_progress=False, write_output=False)
    rows = min(sample, job.rows)
    sampled = dataclasses.replace(job, limit=rows, rows=rows)
    if job.spec.model.batch:
        # A sample is measured online: a batch may take hours. Its rows are reused by
        # the batch run all the same (the request hash does not depend on the switch).
        online = job.spec.model.model_copy(update={"batch": False})
        sampled.spec = job.spec.model_copy(update={"model": online})
    summary = await execute_async(sampled, options)
    return summary.counters.rows_finished


USAGE = ("prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "total_tokens")


def _measure(job: ResolvedJob, sample: int, result: Estimate) -> None:
    """Output, reasoning, latency and cache share of the first `sample` rows' answers."""
    if not job.checkpoint_path.exists():
        return
    checkpoint = Checkpoint(job.checkpoint_path)
    try:
        measured = list(
            _answers(
                checkpoint, dataclasses.replace(job, limit=min(sample, job.rows)).plan(checkpoint)
            )
        )
    finally:
        checkpoint.close()
    if not measured:
        return
    usages = [usage for usage, _ in measured]
    prompt = sum(u.prompt_tokens for u in usages)
    result.sample_rows = len(measured)
    result.output_per_row = sum(u.output_tokens for u in usages) / len(measured)
    result.reasoning_per_row = sum(u.reasoning_tokens for u in usages) / len(measured)
    result.latency_s = sum(latency for _, latency in measured) / len(measured)
    result.cached_share = sum(u.cached_tokens for u in usages) / prompt if prompt else 0.0


def _answers(checkpoint: Checkpoint, plan: WorkPlan) -> Iterator[tuple[Usage, float]]:
    """(usage, latency) of each planned row answered for its current request."""
    names = (*USAGE, "latency_s", "error")
    for keys, hashes in plan.current_hashes():
        stored = checkpoint.fetch(keys, names, hashes)
        columns = [stored.values[name] for name in names]
        for found, *values in zip(stored.found, *columns, strict=True):
            *counts, latency, error = values
            if found and error is None and counts[1] is not None:
                yield Usage(*(count or 0 for count in counts)), latency or 0.0


def _price(job: ResolvedJob, result: Estimate) -> None:
    result.cost_input, result.cost_expected, result.cost_worst = _costs(job.settings.price, result)
    if job.settings.preset.batch_api is not None:
        costs = _costs(job.settings.batch_price, result)
        result.batch_cost_input, result.batch_cost_expected, result.batch_cost_worst = costs


def _costs(
    price: Price | None, result: Estimate
) -> tuple[float | None, float | None, float | None]:
    """(input only, expected, every reply at max_tokens) at this price."""
    if price is None:
        return None, None, None

    def cost(output_per_row: float, cached_share: float = 0.0) -> float:
        usage = Usage(
            prompt_tokens=result.input_tokens,
            completion_tokens=round(result.rows * output_per_row),
            cached_tokens=round(result.input_tokens * cached_share),
        )
        return price.cost(usage)

    # The range assumes no cache hits; the expected cost uses the share the sample measured.
    expected = None
    if result.output_per_row is not None:
        expected = cost(result.output_per_row, result.cached_share)
    return cost(0), expected, cost(result.max_output_per_row)


def _time(job: ResolvedJob, result: Estimate) -> None:
    limits = job.spec.limits
    bounds: list[tuple[float, str]] = []
    if limits.requests_per_minute:
        bounds.append((result.rows / (limits.requests_per_minute / 60), "requests_per_minute"))
    if limits.tokens_per_minute:
        charged = result.input_tokens + result.rows * result.max_output_per_row
        bounds.append((charged / (limits.tokens_per_minute / 60), "tokens_per_minute"))
    if result.latency_s is not None:
        slots = limits.concurrency or 256
        bounds.append((result.rows * result.latency_s / slots, "concurrency x sampled latency"))
    if bounds:
        result.wall_s, result.wall_basis = max(bounds)
    else:
        result.wall_basis = "unknown: set limits, or measure latency with --sample"
    if result.wall_s is not None:
        result.wall_s = math.ceil(result.wall_s)
