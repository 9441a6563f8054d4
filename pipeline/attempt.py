"""One attempt of one row, from its slot in the window to the decision on what next.

An `Attempt` takes a slot and a paced turn from the pacer, reserves its projected
cost in the budget, sends the request, turns the answer or the error into the
row's result, settles the budget with what it really cost, hands the pacer what
the server said, and decides whether the row is finished or asked again (and
writes that decision, with its reason, to the run log). The deadline of the call
is the HTTP client's per-request timer, set from `limits.timeout_s`: a second
timer per attempt here would cost more CPU than everything else an attempt does.

Job-level failures (a rejected key, an exhausted budget) leave as exceptions; the
scheduler stops the run on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

from pipeline.breaker import Breaker
from pipeline.budget import Budget
from pipeline.config import Price
from pipeline.counters import RunCounters
from pipeline.errors import (
    JobFatalError,
    JobStopped,
    ProviderError,
    RateLimited,
    RetryableError,
    SchemaViolation,
)
from pipeline.providers.base import Provider
from pipeline.ratelimit import Turns
from pipeline.retry import RetryPolicy
from pipeline.runlog import RunLog
from pipeline.spend import RowSpend, attempt_cost
from pipeline.structured import OutputSchema
from pipeline.types import ChatRequest, Completion, RowResult

CONTENT_FILTERED = "content_filtered: the provider's content filter stopped the answer"
SCHEMA_RETRY = "answer does not match output.schema: asking again"


@dataclass
class AttemptCounts:
    """What the attempts of a run did, for the summary."""

    retries: int = 0
    rate_limited: int = 0
    first_sent_at: float | None = None  # loop clock: the first attempt's start
    last_answer_at: float | None = None  # loop clock: the last attempt's end

    @property
    def active_s(self) -> float:
        """From the first request sent to the last answer received."""
        if self.first_sent_at is None or self.last_answer_at is None:
            return 0.0
        return self.last_answer_at - self.first_sent_at


@dataclass
class Attempts:
    """What every attempt of a run shares."""

    provider: Provider
    pacer: Turns
    policy: RetryPolicy
    price: Price | None
    budget: Budget
    log: RunLog
    counts: AttemptCounts
    counters: RunCounters
    breaker: Breaker
    stop_job: Callable[[JobStopped], None]  # the breaker's verdict stops the run
    schema: OutputSchema | None = None
    schema_retries: int = 1


@dataclass(slots=True)
class RowTries:
    """How often one row has been tried so far."""

    attempts: int = 0
    schema_failures: int = 0
    spend: RowSpend = field(default_factory=RowSpend)  # every paid attempt is charged


@dataclass(frozen=True, slots=True)
class Verdict:
    """The row's final result, or how long to wait before asking again."""

    result: RowResult | None
    retry_in: float = 0.0


class Attempt:
    __slots__ = ("latency", "request", "run", "sent_at", "tries")

    def __init__(self, run: Attempts, request: ChatRequest, tries: RowTries) -> None:
        self.run = run
        self.request = request
        self.tries = tries
        self.sent_at = 0.0
        self.latency = 0.0

    async def make(self, wanted: Callable[[], bool]) -> Verdict | None:
        """Send once and decide; None when the run stopped while this waited its turn."""
        run, request = self.run, self.request
        self.sent_at = await run.pacer.take_turn(request)
        answer: Completion | ProviderError | None = None
        try:
            if not wanted():
                return None
            self.tries.attempts += 1
            if run.counts.first_sent_at is None:
                run.counts.first_sent_at = self.sent_at
            reservation = run.budget.reserve(request)
            try:
                answer = await self._send()
            finally:
                run.budget.settle(reservation, answer)
        finally:
            run.pacer.end_turn(request, self.sent_at, answer)
        run.counts.last_answer_at = ended = anyio.current_time()
        self.latency = ended - self.sent_at
        if isinstance(answer, Completion):
            return self._answered(answer)
        assert answer is not None  # _send returns or raises
        return self._failed(answer)

    async def _send(self) -> Completion | ProviderError:
        try:
            with self.run.counters.sending():
                return await self.run.provider.complete(self.request)
        except ProviderError as error:
            return error

    def _answered(self, completion: Completion) -> Verdict:
        run, tries = self.run, self.tries
        result = self._result(completion=completion)
        tries.spend.add(completion, result.cost_usd)
        invalid = self._check_schema(result)
        retry = invalid is not None and tries.schema_failures < run.schema_retries
        self._log(
            200,
            "ok" if invalid is None else invalid.kind,
            wait_s=0.0 if retry else None,
            why=SCHEMA_RETRY if retry else None,
            message=invalid.message[:300] if invalid else None,
            cost_usd=result.cost_usd,
        )
        self._tell_breaker_answer(result, invalid, final=not retry)
        if not retry:
            return Verdict(tries.spend.charge(result))
        tries.schema_failures += 1
        run.counts.retries += 1
        return Verdict(None)

    def _failed(self, error: ProviderError) -> Verdict:
        run = self.run
        if isinstance(error, RateLimited):
            run.counts.rate_limited += 1
        delay, why = self._decide(error)
        self._log(error.status, error.kind, wait_s=delay, why=why, message=error.message[:300])
        if isinstance(error, JobFatalError):
            raise error
        self._stop_if(run.breaker.answered_with(error))
        if delay is None:
            self._stop_if(run.breaker.row_failed(error))
            attempts = self.tries.attempts
            tried = f" after {attempts} attempts" if attempts > 1 else ""
            return Verdict(self.tries.spend.charge(self._result(error=error.describe() + tried)))
        run.counts.retries += 1
        return Verdict(None, delay)

    def _tell_breaker_answer(
        self, result: RowResult, invalid: SchemaViolation | None, *, final: bool
    ) -> None:
        """Tell the breaker what an HTTP 200 came to: a success, or a schema mismatch."""
        breaker = self.run.breaker
        if invalid is None:
            if result.error is None:
                breaker.succeeded()
            return
        stop = breaker.answered_with(invalid)
        if stop is None and final:
            stop = breaker.row_failed(invalid)
        self._stop_if(stop)

    def _stop_if(self, stop: JobStopped | None) -> None:
        if stop is not None:
            self.run.stop_job(stop)

    def _decide(self, error: ProviderError) -> tuple[float | None, str]:
        """Seconds to wait before asking again (None: the row is finished), and why."""
        if isinstance(error, JobFatalError):
            return None, "job-fatal: stop sending"
        attempts = self.tries.attempts
        delay = self.run.policy.delay(attempts, error)
        if delay is None:
            if isinstance(error, RetryableError):
                return None, f"gave up after {attempts} attempts"
            return None, "not retryable: recorded as the row's error"
        if isinstance(error, RateLimited):
            hint = f"{error.retry_after:g}s as the server asked" if error.retry_after else "1s"
            return delay, f"rate limited: whole pool paused {hint}"
        if error.retry_after is not None:
            return delay, f"server asked to retry after {error.retry_after:g}s"
        return delay, "exponential backoff with jitter"

    def _result(
        self, *, completion: Completion | None = None, error: str | None = None
    ) -> RowResult:
        request, price = self.request, self.run.price
        if completion is not None and completion.finish_reason == "content_filter":
            error = CONTENT_FILTERED
        return RowResult(
            request.index,
            request.key,
            request.request_hash,
            self.tries.attempts,
            self.latency,
            completion=completion,
            error=error,
            cost_usd=attempt_cost(completion, price) if completion is not None else None,
        )

    def _check_schema(self, result: RowResult) -> SchemaViolation | None:
        """Parse the answer into `result.parsed`; a mismatch becomes the row's error."""
        schema = self.run.schema
        if schema is None or result.completion is None or result.error is not None:
            return None
        try:
            result.parsed = schema.parse(result.completion.response)
        except SchemaViolation as exc:
            result.error = exc.describe()
            return exc
        return None

    def _log(
        self,
        status: int | None,
        outcome: str,
        *,
        wait_s: float | None,
        why: str | None,
        message: str | None,
        cost_usd: float | None = None,
    ) -> None:
        run = self.run
        run.log.attempt(
            self.request.key,
            self.tries.attempts,
            status=status,
            latency_s=self.latency,
            outcome=outcome,
            in_flight=run.counters.in_flight,
            wait_s=wait_s,
            why=why,
            message=message,
            cost_usd=cost_usd,
        )
