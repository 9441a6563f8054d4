"""What one answer means for its row, decided once for every way of running a job.

`decide` takes an answer (a `Completion` or a `ProviderError`), the row's tries so far
and the job's rules, and returns one of:

- `Finished(result, error)`: the row's final result (ok, or its error);
- `Retry(reason, when)`: ask again, not before `when` (the loop time `now` plus the
  wait the retry policy or the server chose). A batch run ignores `when`: its retry
  is the row in a later batch;
- `Stop(error)`: the answer says no row can succeed (a rejected key, an unknown model,
  no quota): the job stops and the row stays pending.

It reads no clock and does no I/O, and it changes nothing it is given: every decision
carries the row's tries after this answer, for the caller to keep. Online and Ray runs
(`attempt.py`) and batch runs (`batch/engine.py`) call it, so error classes, schema
retries, content-filter and refusal finals and the row's cost over every paid
attempt are decided the same way in every mode. Decisions are values, never changed
once made, but plain dataclasses: a frozen one takes ten times as long to build, and
one is built for every answer.

Schema retries: an answer that does not match `output.schema` is asked again while
the row's earlier mismatches number fewer than `output.schema_retries`. Attempts
that failed for other reasons (a 429, a 5xx) do not count against them, and
`limits.max_attempts` bounds only retryable errors.

`stays_failed` says which failures are the row's own when the job stops: only those
are kept as final; the others stay pending, so the rerun after the fix sends them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.breaker import RepeatedFailure
from pipeline.config import Price
from pipeline.errors import (
    ContentFiltered,
    JobFatalError,
    JobStopped,
    PausedTurn,
    ProviderError,
    RateLimited,
    Refused,
    RetryableError,
    RowError,
    SchemaViolation,
)
from pipeline.retry import RetryPolicy
from pipeline.spend import RowSpend, attempt_cost
from pipeline.structured import OutputSchema
from pipeline.types import PAUSED_TURN, REFUSAL, Completion, RowResult

# Finish reasons that are not an answer to this row: a final error for the row (never a
# schema retry, never a success), with what the provider sent kept in `response`.
UNANSWERED: dict[str, ProviderError] = {
    "content_filter": ContentFiltered("the provider's content filter stopped the answer"),
    REFUSAL: Refused("the model declined to answer (its words are in response)"),
    PAUSED_TURN: PausedTurn(
        "the provider paused the turn before it finished (a long server-tool run); the "
        "partial answer is in response"
    ),
}
SCHEMA_RETRY = "answer does not match output.schema: asking again"


class RowRef(Protocol):
    """Which row an answer belongs to (a `ChatRequest` is one)."""

    @property
    def index(self) -> int: ...
    @property
    def key(self) -> str: ...
    @property
    def request_hash(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Rules:
    """The job's rules for an answer."""

    policy: RetryPolicy
    price: Price | None
    schema: OutputSchema | None = None
    schema_retries: int = 1


@dataclass(slots=True)
class RowTries:
    """How often one row has been tried so far, and what its paid attempts cost."""

    attempts: int = 0
    schema_failures: int = 0
    spend: RowSpend = field(default_factory=RowSpend)  # every paid attempt is charged


@dataclass(slots=True)
class Finished:
    """The row's final result; `error` is why it failed (None: it did not)."""

    result: RowResult
    tries: RowTries
    error: ProviderError | None = None
    why: str | None = None  # for the run log
    cost_usd: float | None = None  # what this attempt cost (the result's covers every one)


@dataclass(slots=True)
class Retry:
    """Ask again, not before loop time `when` (a batch run ignores it)."""

    reason: str
    when: float
    tries: RowTries
    error: ProviderError  # what came back this time
    wait_s: float = 0.0
    cost_usd: float | None = None  # what this attempt cost


@dataclass(slots=True)
class Stop:
    """No row can succeed until someone fixes something: stop; this row stays pending."""

    error: JobFatalError
    tries: RowTries
    why: str = "job-fatal: stop sending"


Decision = Finished | Retry | Stop


def decide(
    answer: Completion | ProviderError,
    tries: RowTries,
    rules: Rules,
    *,
    row: RowRef,
    now: float,
    latency_s: float | None = None,
    rng: random.Random | None = None,
) -> Decision:
    """What `answer` (to attempt `tries.attempts` of `row`) means for the row."""
    if isinstance(answer, Completion):
        return _answered(answer, tries, rules, row, now, latency_s)
    return _failed(answer, tries, rules, row, now, latency_s, rng)


def stays_failed(error: ProviderError | None, stop: JobStopped | JobFatalError) -> bool:
    """Whether a row that failed with `error` keeps that result when the job stops for `stop`.

    Only the row's own outcomes stay: its content refused, or a row error unlike the one
    the job stopped for. Attempts that ran out on 429s, 5xx or dropped connections, and
    the error repeated row after row until the job stopped, say nothing about the row:
    it stays pending and the rerun after the fix sends it.
    """
    if error is None or isinstance(error, ContentFiltered):
        return True
    if not isinstance(error, RowError):
        return False
    if isinstance(stop, RepeatedFailure):
        return (error.kind, error.status) != stop.signature
    return True


def _answered(
    completion: Completion,
    tries: RowTries,
    rules: Rules,
    row: RowRef,
    now: float,
    latency_s: float | None,
) -> Decision:
    cost = attempt_cost(completion, rules.price)
    spend = _plus(tries.spend, completion, cost)
    result = _result(row, tries.attempts, latency_s, completion=completion, cost=cost)
    paid = RowTries(tries.attempts, tries.schema_failures, spend)
    unanswered = UNANSWERED.get(completion.finish_reason or "")
    if unanswered is not None:
        result.error = unanswered.describe()
        return Finished(spend.charge(result), paid, unanswered, cost_usd=cost)
    if rules.schema is None:
        return Finished(spend.charge(result), paid, cost_usd=cost)
    try:
        result.parsed = rules.schema.parse(completion.response)
    except SchemaViolation as invalid:
        cut = completion.finish_reason == "length"  # asked again, it would be cut again
        if tries.schema_failures < rules.schema_retries and not cut:
            after = RowTries(tries.attempts, tries.schema_failures + 1, spend)
            return Retry(SCHEMA_RETRY, now, after, invalid, cost_usd=cost)
        result.error = invalid.describe()
        return Finished(spend.charge(result), paid, invalid, cost_usd=cost)
    return Finished(spend.charge(result), paid, cost_usd=cost)


def _failed(
    error: ProviderError,
    tries: RowTries,
    rules: Rules,
    row: RowRef,
    now: float,
    latency_s: float | None,
    rng: random.Random | None,
) -> Decision:
    if isinstance(error, JobFatalError):
        return Stop(error, tries)
    attempts = tries.attempts
    delay = rules.policy.delay(attempts, error, rng)
    if delay is not None:
        return Retry(_why_wait(error), now + delay, tries, error, delay)
    if isinstance(error, RetryableError):
        why = f"gave up after {attempts} attempts"
    else:
        why = "not retryable: recorded as the row's error"
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    result = _result(row, attempts, latency_s, error=error.describe() + tried)
    return Finished(tries.spend.charge(result), tries, error, why)


def _why_wait(error: ProviderError) -> str:
    if isinstance(error, RateLimited):
        hint = f"{error.retry_after:g}s as the server asked" if error.retry_after else "1s"
        return f"rate limited: whole pool paused {hint}"
    if error.retry_after is not None:
        return f"server asked to retry after {error.retry_after:g}s"
    return "exponential backoff with jitter"


def _result(
    row: RowRef,
    attempts: int,
    latency_s: float | None,
    *,
    completion: Completion | None = None,
    cost: float | None = None,
    error: str | None = None,
) -> RowResult:
    return RowResult(
        row.index,
        row.key,
        row.request_hash,
        attempts,
        latency_s,
        completion=completion,
        error=error,
        cost_usd=cost,
    )


def _plus(spend: RowSpend, completion: Completion, cost: float | None) -> RowSpend:
    """`spend` with one more paid attempt, leaving `spend` as it was."""
    after = RowSpend(spend.usage, spend.cost_usd, spend.paid)
    after.add(completion, cost)
    return after
