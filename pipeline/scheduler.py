"""The worker pool: planned rows -> workers -> pending results -> recorder.

A fixed number of workers (the concurrency cap) share one lazy plan: a worker that
is free pulls the next row, which is rendered only then, so nothing runs ahead of
the pool and memory stays flat. Pulling is a plain `next()` on a generator that
never awaits, which is safe to share on one event loop and costs nothing per row.
Finished rows are appended to a list that one recorder task hands to the
checkpoint in batches, inside shielded scopes: a result that exists is never lost
to cancellation. Everything lives in task groups.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import anyio
from anyio.abc import TaskGroup

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
from pipeline.providers import Provider
from pipeline.ratelimit import Pacer
from pipeline.retry import RetryPolicy
from pipeline.runlog import RunLog
from pipeline.spend import RowSpend, attempt_cost
from pipeline.structured import OutputSchema
from pipeline.types import ChatRequest, Completion, RowResult

FLUSH_INTERVAL_S = 0.5
FLUSH_MAX_ROWS = 2000

RecordBatch = Callable[[list[RowResult]], Awaitable[None]]
Planned = ChatRequest | RowResult


@dataclass
class Outcome:
    """How the pool ended."""

    fatal: JobFatalError | JobStopped | None = None
    interrupted: bool = False
    recorded: int = 0
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


class Scheduler:
    def __init__(
        self,
        provider: Provider,
        pacer: Pacer,
        policy: RetryPolicy,
        price: Price | None,
        *,
        concurrency: int,
        budget: Budget | None = None,
        log: RunLog | None = None,
        schema: OutputSchema | None = None,
        schema_retries: int = 1,
        grace_s: float = 10.0,
        counters: RunCounters | None = None,
        on_stop: Callable[[float], None] | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.provider = provider
        self.pacer = pacer
        self.policy = policy
        self.price = price
        self.concurrency = concurrency
        self.budget = budget if budget is not None and budget.active else None
        self.log = log or RunLog(None)
        self.schema = schema
        self.schema_retries = schema_retries
        self.grace_s = grace_s
        self.outcome = Outcome()
        self.counters = counters or RunCounters()
        self._on_stop = on_stop  # told the grace period when the first stop begins
        self.breaker = breaker or Breaker()
        self._stopping = False
        self._work: TaskGroup | None = None
        self._pending: list[RowResult] = []
        self._flush_wanted = anyio.Event()

    async def run(
        self, planned: Iterator[Planned], record: RecordBatch, *, handle_signals: bool = False
    ) -> Outcome:
        """Process every planned row; returns when all are recorded or the run stopped."""
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._record_periodically, record)
                if handle_signals:
                    outer.start_soon(self._watch_signals)
                async with anyio.create_task_group() as work:
                    self._work = work
                    shared = iter(planned)
                    for _ in range(self.concurrency):
                        work.start_soon(self._worker, shared)
                outer.cancel_scope.cancel()
        finally:
            await self._flush(record)
        return self.outcome

    def stop(self) -> None:
        """Stop taking new rows; requests in flight may finish within the grace period."""
        if self._stopping or self._work is None:
            return
        self.outcome.interrupted = True
        self._stop_taking_rows()
        if self._on_stop is not None:
            self._on_stop(self.grace_s)

    def _stop_taking_rows(self) -> None:
        # Requests already sent are paid for: let them land (and be recorded) for a while.
        self._stopping = True
        if self._work is not None:
            self._work.cancel_scope.deadline = anyio.current_time() + self.grace_s

    def stop_now(self) -> None:
        self._stopping = True
        self.outcome.interrupted = True
        if self._work is not None:
            self._work.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if self._stopping:
                    self.stop_now()
                else:
                    self.stop()

    async def _worker(self, planned: Iterator[Planned]) -> None:
        for item in planned:
            if self._stopping:
                return
            if isinstance(item, ChatRequest):
                try:
                    result = await self._process(item)
                except (JobFatalError, JobStopped) as exc:
                    self._fail_job(exc)
                    return
                if result is None:
                    return
                item = result
            self._pending.append(item)
            if len(self._pending) >= FLUSH_MAX_ROWS:
                self._flush_wanted.set()

    def _fail_job(self, error: JobFatalError | JobStopped) -> None:
        if self.outcome.fatal is None:
            self.outcome.fatal = error
        self._stop_taking_rows()

    async def _process(self, request: ChatRequest) -> RowResult | None:
        """The row's final result, or None when the run stopped before it was sent."""
        attempt = 0
        schema_failures = 0
        spend = RowSpend()
        pacer = self.pacer
        while True:
            attempt += 1
            await pacer.acquire(request.prompt_estimate * pacer.prompt_scale + request.reply_budget)
            if self._stopping:
                pacer.release(succeeded=False)
                return None
            reservation = None
            started = anyio.current_time()
            if self.outcome.first_sent_at is None:
                self.outcome.first_sent_at = started
            try:
                if self.budget is not None:
                    reservation = self.budget.reserve(request)
                # The deadline (limits.timeout_s) is the HTTP client's, set once for the pool.
                with self.counters.sending():
                    completion = await self.provider.complete(request)
            except ProviderError as exc:
                error: ProviderError = exc
            except BaseException:
                pacer.release(succeeded=False)
                self._settle(reservation, None)
                raise
            else:
                self.outcome.last_answer_at = anyio.current_time()
                pacer.release(succeeded=True)
                pacer.observe(completion.rate_limits)
                if completion.usage is not None:
                    pacer.learn_prompt_scale(
                        request.prompt_estimate, completion.usage.prompt_tokens
                    )
                latency = anyio.current_time() - started
                result = self._success(request, completion, attempt, latency)
                self._settle(reservation, result)
                spend.add(completion, result.cost_usd)
                invalid = self._check_schema(result)
                retry = invalid is not None and schema_failures < self.schema_retries
                self.log.attempt(
                    request.key,
                    attempt,
                    status=200,
                    latency_s=latency,
                    outcome="ok" if invalid is None else invalid.kind,
                    in_flight=self.counters.in_flight,
                    wait_s=0.0 if retry else None,
                    why="answer does not match output.schema: asking again" if retry else None,
                    message=invalid.message[:300] if invalid else None,
                    cost_usd=result.cost_usd,
                )
                self._breaker_after_answer(result, invalid, final=not retry)
                if not retry:
                    return spend.charge(result)
                schema_failures += 1
                self.outcome.retries += 1
                continue
            self._settle(reservation, None)
            pacer.release(succeeded=False)
            pacer.observe(error.rate_limits)
            self.outcome.last_answer_at = anyio.current_time()
            latency = self.outcome.last_answer_at - started
            if isinstance(error, RateLimited):
                self.outcome.rate_limited += 1
                pacer.rate_limited(error.retry_after, sent_at=started)
            delay = None if isinstance(error, JobFatalError) else self.policy.delay(attempt, error)
            self.log.attempt(
                request.key,
                attempt,
                status=error.status,
                latency_s=latency,
                outcome=error.kind,
                in_flight=self.counters.in_flight,
                wait_s=delay,
                why=self._why(error, attempt, delay),
                message=error.message[:300],
            )
            if isinstance(error, JobFatalError):
                raise error
            if (stop := self.breaker.answered_with(error)) is not None:
                self._fail_job(stop)
            if delay is None:
                if (stop := self.breaker.row_failed(error)) is not None:
                    self._fail_job(stop)
                tried = f" after {attempt} attempts" if attempt > 1 else ""
                failed = RowResult(
                    request.index,
                    request.key,
                    request.request_hash,
                    attempt,
                    latency,
                    error=error.describe() + tried,
                )
                return spend.charge(failed)
            self.outcome.retries += 1
            await anyio.sleep(delay)

    def _breaker_after_answer(
        self, result: RowResult, invalid: SchemaViolation | None, *, final: bool
    ) -> None:
        """Tell the breaker what an HTTP 200 came to: a success, or a schema mismatch."""
        if invalid is None:
            if result.error is None:
                self.breaker.succeeded()
            return
        stop = self.breaker.answered_with(invalid)
        if stop is None and final:
            stop = self.breaker.row_failed(invalid)
        if stop is not None:
            self._fail_job(stop)

    def _why(self, error: ProviderError, attempt: int, delay: float | None) -> str:
        if isinstance(error, JobFatalError):
            return "job-fatal: stop sending"
        if delay is None:
            if attempt >= self.policy.max_attempts and isinstance(error, RetryableError):
                return f"gave up after {attempt} attempts"
            return "not retryable: recorded as the row's error"
        if isinstance(error, RateLimited):
            hint = f"{error.retry_after:g}s as the server asked" if error.retry_after else "1s"
            return f"rate limited: whole pool paused {hint}"
        if error.retry_after is not None:
            return f"server asked to retry after {error.retry_after:g}s"
        return "exponential backoff with jitter"

    def _check_schema(self, result: RowResult) -> SchemaViolation | None:
        """Parse the answer into `result.parsed`; a mismatch becomes the row's error."""
        if self.schema is None or result.completion is None or result.error is not None:
            return None
        try:
            result.parsed = self.schema.parse(result.completion.response)
        except SchemaViolation as exc:
            result.error = exc.describe()
            return exc
        return None

    def _settle(self, reservation: tuple[float, float] | None, result: RowResult | None) -> None:
        if self.budget is None or reservation is None:
            return
        usage = result.completion.usage if result and result.completion else None
        self.budget.settle(reservation, usage, result.cost_usd if result else None)

    def _success(
        self, request: ChatRequest, completion: Completion, attempts: int, latency: float
    ) -> RowResult:
        cost = attempt_cost(completion, self.price)
        error = None
        if completion.finish_reason == "content_filter":
            error = "content_filtered: the provider's content filter stopped the answer"
        return RowResult(
            request.index,
            request.key,
            request.request_hash,
            attempts,
            latency,
            completion=completion,
            error=error,
            cost_usd=cost,
        )

    async def _record_periodically(self, record: RecordBatch) -> None:
        while True:
            with anyio.move_on_after(FLUSH_INTERVAL_S):
                await self._flush_wanted.wait()
            self._flush_wanted = anyio.Event()
            await self._flush(record)

    async def _flush(self, record: RecordBatch) -> None:
        batch, self._pending = self._pending, []
        if batch:
            with anyio.CancelScope(shield=True):
                await record(batch)
            self.outcome.recorded += len(batch)
