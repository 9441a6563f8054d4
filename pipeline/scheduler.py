"""The worker pool: planned rows -> workers -> a result sink -> recorder.

A fixed number of workers (the concurrency cap) share one lazy plan: a worker that
is free pulls the next row, which is rendered only then, so nothing runs ahead of
the pool and memory stays flat. Pulling is a plain `next()` on a generator that
never awaits, which is safe to share on one event loop and costs nothing per row.
Each row's attempts are `attempt.Attempt`s. A finished row goes to the sink the
moment it lands (the runner's sink journals it, so a kill cannot lose it), and
one recorder task has the sink commit in batches, inside shielded scopes: a result
that exists is never lost to cancellation. Everything lives in task groups.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import anyio
from anyio.abc import TaskGroup

from pipeline.attempt import Attempt, AttemptCounts, Attempts, RowTries
from pipeline.breaker import Breaker
from pipeline.budget import Budget
from pipeline.config import Price
from pipeline.counters import RunCounters
from pipeline.errors import JobFatalError, JobStopped
from pipeline.providers.base import Provider
from pipeline.ratelimit import Turns
from pipeline.retry import RetryPolicy
from pipeline.runlog import RunLog
from pipeline.structured import OutputSchema
from pipeline.types import ChatRequest, RowResult

FLUSH_INTERVAL_S = 0.5
FLUSH_MAX_ROWS = 2000

Planned = ChatRequest | RowResult


class ResultSink(Protocol):
    """Where finished rows go: each kept as it lands, committed in batches."""

    def land(self, result: RowResult) -> int:
        """Keep a finished row (durably); returns how many rows now await a commit."""
        ...

    async def commit(self) -> int:
        """Commit every row landed so far; returns how many that was."""
        ...


@dataclass
class Outcome(AttemptCounts):
    """How the pool ended."""

    fatal: JobFatalError | JobStopped | None = None
    interrupted: bool = False
    recorded: int = 0


class Scheduler:
    def __init__(
        self,
        provider: Provider,
        pacer: Turns,
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
        self.pacer = pacer
        self.concurrency = concurrency
        self.grace_s = grace_s
        self.outcome = Outcome()
        self.counters = counters or RunCounters()
        self._on_stop = on_stop  # told the grace period when the first stop begins
        self.attempts = Attempts(
            provider,
            pacer,
            policy,
            price,
            budget or Budget(None, None, price),
            log or RunLog(None),
            self.outcome,
            self.counters,
            breaker or Breaker(),
            self._fail_job,
            schema,
            schema_retries,
        )
        self._stopping = False
        self._work: TaskGroup | None = None
        self._flush_wanted = anyio.Event()

    async def run(
        self, planned: Iterator[Planned], sink: ResultSink, *, handle_signals: bool = False
    ) -> Outcome:
        """Process every planned row; returns when all are recorded or the run stopped."""
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._record_periodically, sink)
                if handle_signals:
                    outer.start_soon(self._watch_signals)
                async with anyio.create_task_group() as work:
                    self._work = work
                    shared = iter(planned)
                    for _ in range(self.concurrency):
                        work.start_soon(self._worker, shared, sink)
                outer.cancel_scope.cancel()
        finally:
            await self._flush(sink)
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
        # A closed terminal or a dropped ssh session sends SIGHUP: stop as for SIGTERM.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for _ in signals:
                if self._stopping:
                    self.stop_now()
                else:
                    self.stop()

    async def _worker(self, planned: Iterator[Planned], sink: ResultSink) -> None:
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
            if sink.land(item) >= FLUSH_MAX_ROWS:
                self._flush_wanted.set()

    def fail(self, error: JobStopped) -> None:
        """Stop the job for a reason found outside the workers (a failed write)."""
        self._fail_job(error)

    def _fail_job(self, error: JobFatalError | JobStopped) -> None:
        if self.outcome.fatal is None:
            self.outcome.fatal = error
        self._stop_taking_rows()

    async def _process(self, request: ChatRequest) -> RowResult | None:
        """The row's final result, or None when the run stopped before it was sent."""
        tries = RowTries()
        while True:
            verdict = await Attempt(self.attempts, request, tries).make(self._wanted)
            if verdict is None or verdict.result is not None:
                return None if verdict is None else verdict.result
            if verdict.retry_in:
                await anyio.sleep(verdict.retry_in)

    def _wanted(self) -> bool:
        return not self._stopping

    async def _record_periodically(self, sink: ResultSink) -> None:
        while True:
            with anyio.move_on_after(FLUSH_INTERVAL_S):
                await self._flush_wanted.wait()
            self._flush_wanted = anyio.Event()
            await self._flush(sink)

    async def _flush(self, sink: ResultSink) -> None:
        with anyio.CancelScope(shield=True):
            self.outcome.recorded += await sink.commit()
