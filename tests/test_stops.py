"""Job-level stops leave the rows they cut short pending, and still count what was paid.

Driven like test_scheduler: a scripted fake provider on a virtual clock.
"""

from __future__ import annotations

import anyio
import pytest
from test_scheduler import FAST, FakeProvider, Recorder, completion, planned
from virtual_clock import run_virtual

from pipeline import errors
from pipeline.breaker import Breaker, RepeatedFailure, Stalled
from pipeline.config import Price
from pipeline.counters import RunCounters
from pipeline.ratelimit import Pacer
from pipeline.retry import RetryPolicy
from pipeline.scheduler import Outcome, Scheduler
from pipeline.structured import OutputSchema
from pipeline.types import ChatRequest, Completion

PRICE = Price(input=1.0, output=2.0, cached_input=0.5)
ANSWER_USD = PRICE.cost(completion().usage)  # type: ignore[arg-type]
SCHEMA = OutputSchema({"label": {"enum": ["positive", "negative"]}})


def pool(
    provider: FakeProvider,
    breaker: Breaker,
    counters: RunCounters,
    *,
    policy: RetryPolicy = FAST,
    schema: OutputSchema | None = None,
    schema_retries: int = 1,
) -> Scheduler:
    return Scheduler(
        provider,
        Pacer(None, None, max_concurrency=4),
        policy,
        PRICE,
        concurrency=4,
        schema=schema,
        schema_retries=schema_retries,
        breaker=breaker,
        counters=counters,
    )


def test_rows_that_used_their_429_attempts_during_a_stall_stay_pending() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        await anyio.sleep(0.1)
        raise errors.RateLimited("slow down", status=429, retry_after=1.0)

    provider, record, counters = FakeProvider(script), Recorder(), RunCounters()

    async def main() -> Outcome:
        breaker = Breaker(stall_s=30.0)
        policy = RetryPolicy(max_attempts=3, base_delay_s=0.01)
        return await pool(provider, breaker, counters, policy=policy).run(planned(100), record)

    outcome = run_virtual(main)
    assert isinstance(outcome.fatal, Stalled)
    gave_up = {call.index for call in provider.calls if call.attempt == 3}
    assert gave_up, "some rows used every attempt before the stall stopped the job"
    assert record.results == []  # none recorded as failed: the rerun sends them
    assert outcome.left_pending >= len(gave_up)


def test_a_schema_that_no_answer_matches_stops_with_no_row_failed_and_every_answer_paid() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        await anyio.sleep(0.1)
        return completion('{"label": "maybe"}')

    provider, record, counters = FakeProvider(script), Recorder(), RunCounters()

    async def main() -> Outcome:
        breaker = Breaker(same_error_rows=5)
        return await pool(provider, breaker, counters, schema=SCHEMA, schema_retries=1).run(
            planned(100), record
        )

    outcome = run_virtual(main)
    assert isinstance(outcome.fatal, RepeatedFailure)
    assert outcome.fatal.signature == ("schema_violation", None)
    assert record.results == []
    # Every answer was paid for: final ones, and first ones of rows cut short before their retry.
    assert counters.cost_usd == pytest.approx(len(provider.answered) * ANSWER_USD)
    assert counters.tokens == len(provider.answered) * 15


def test_a_paid_first_attempt_of_a_row_stopped_before_its_retry_counts_in_the_run() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        if req.index == 0:
            await anyio.sleep(0.2)
            return completion('{"label": "maybe"}')  # asked again, but the job stops first
        await anyio.sleep(0.1)
        raise errors.AuthenticationError("bad key", status=401)

    provider, record, counters = FakeProvider(script), Recorder(), RunCounters()

    async def main() -> Outcome:
        return await pool(provider, Breaker(), counters, schema=SCHEMA).run(planned(4), record)

    outcome = run_virtual(main)
    assert isinstance(outcome.fatal, errors.AuthenticationError)
    assert [call.index for call in provider.calls].count(0) == 1
    assert record.results == []
    assert counters.cost_usd == pytest.approx(ANSWER_USD)


def test_failures_before_a_success_are_recorded_as_the_rows_own() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        if req.index < 6:
            await anyio.sleep(0.01)
            raise errors.BadRequest("this row's input is invalid", status=400)
        await anyio.sleep(0.1)
        return completion()

    provider, record, counters = FakeProvider(script), Recorder(), RunCounters()

    async def main() -> Outcome:
        return await pool(provider, Breaker(), counters).run(planned(20), record)

    outcome = run_virtual(main)
    assert outcome.fatal is None
    results = record.by_index()
    assert len(results) == 20
    assert sorted(i for i, result in results.items() if not result.ok) == list(range(6))


def test_a_budget_stop_keeps_row_errors_but_not_attempts_that_ran_out_on_overload() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        await anyio.sleep(0.01)
        if req.index % 2:
            raise errors.ServerError("down", status=503)
        raise errors.BadRequest("this row's input is invalid", status=400)

    provider, record, counters = FakeProvider(script), Recorder(), RunCounters()

    async def main() -> Outcome:
        scheduler = pool(provider, Breaker(), counters, policy=RetryPolicy(max_attempts=1))

        async def stop_later() -> None:
            await anyio.sleep(0.05)
            scheduler.fail(errors.BudgetExceeded("budget reached"))

        async with anyio.create_task_group() as group:
            group.start_soon(stop_later)
            outcome = await scheduler.run(planned(1000), record)
        return outcome

    outcome = run_virtual(main)
    assert isinstance(outcome.fatal, errors.BudgetExceeded)
    results = record.by_index()
    assert results and all(index % 2 == 0 for index in results)
    assert all(not result.ok for result in results.values())
    assert outcome.left_pending > 0


def test_refusals_answered_after_the_stop_are_recorded_as_the_rows_own() -> None:
    async def script(req: ChatRequest, attempt: int) -> Completion:
        if req.index == 0:
            await anyio.sleep(0.01)
            raise errors.ModelNotFound("no such model", status=404)
        await anyio.sleep(0.05)
        return completion("I can't help with that.", finish_reason="refusal")

    provider, record, counters = FakeProvider(script), Recorder(), RunCounters()

    async def main() -> Outcome:
        return await pool(provider, Breaker(), counters).run(planned(100), record)

    outcome = run_virtual(main)
    assert isinstance(outcome.fatal, errors.ModelNotFound)
    results = record.by_index()
    assert sorted(results) == [1, 2, 3]  # the requests in flight when the job stopped
    assert all(r.error and r.error.startswith("refused") for r in results.values())
