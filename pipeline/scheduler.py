"""The worker pool: planned rows -> workers -> a result sink -> recorder.

A fixed number of workers (the concurrency cap) share one lazy plan: a worker that
is free pulls the next row, which is rendered only then, so nothing runs ahead of
the pool and memory stays flat. Pulling is a plain `next()` on a generator that
never awaits, which is safe to share on one event loop and costs nothing per row.
Each row's attempts are `attempt.Attempt`s. A finished row goes to the sink the
moment it lands (the sink journals it, so a kill cannot lose it), and
one recorder task has the sink commit in batches, inside shielded scopes: a result
that exists is never lost to cancellation. A heartbeat task copies what the pacer
waits for (a pause and its reason, limits learned from headers) into the counters a
few times per progress interval and asks a sink that shows progress to show it, so
a line comes even while nothing finishes. Everything lives in task groups.

A row that failed while nothing succeeded is held back (`holdback.HeldFailures`)
until a success or the end of the run: when the job stops for a job-level reason,
only failures that are the rows' own are recorded, and the others stay pending with
the rows that were waiting to retry, so the plain rerun after the fix sends them.
Their paid attempts still count in this run's tokens and cost.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from types import FrameType
from typing import Protocol, runtime_checkable

import anyio
from anyio.abc import TaskGroup

from pipeline.attempt import Attempt, AttemptCounts, Attempts
from pipeline.breaker import Breaker, explained
from pipeline.budget import Budget, SpendingLimit
from pipeline.config import Price
from pipeline.counters import RunCounters
from pipeline.decide import Finished, RowTries, Rules
from pipeline.errors import JobFatalError, JobStopped
from pipeline.holdback import HeldFailures
from pipeline.progress import log_interval
from pipeline.providers.base import Provider
from pipeline.ratelimit import Turns
from pipeline.retry import RetryPolicy
from pipeline.runlog import RunLog
from pipeline.structured import OutputSchema
from pipeline.types import ChatRequest, RowResult

FLUSH_INTERVAL_S = 0.5
FLUSH_MAX_ROWS = 2000
# Beats per progress interval, at most a second apart: a line due is at most this late.
BEATS_PER_INTERVAL = 10
MAX_BEAT_S = 1.0

Planned = ChatRequest | RowResult


class ResultSink(Protocol):
    """Where finished rows go: each kept as it lands, committed in batches."""

    def land(self, result: RowResult) -> int:
        """Keep a finished row (durably); returns how many rows now await a commit."""
        ...

    async def commit(self) -> int:
        """Commit every row landed so far; returns how many that was."""
        ...


@runtime_checkable
class ShowsProgress(Protocol):
    """A sink that also draws the progress display (the local executor's)."""

    def show(self, force: bool = False) -> None:
        """Draw the counters now, or when the display's own interval says so."""
        ...


def beat_interval(progress_every_s: float) -> float:
    """Seconds between heartbeats for progress lines `progress_every_s` apart."""
    return min(MAX_BEAT_S, max(progress_every_s, 0.01) / BEATS_PER_INTERVAL)


@dataclass
class Outcome(AttemptCounts):
    """How the pool ended."""

    fatal: JobFatalError | JobStopped | None = None
    interrupted: bool = False
    recorded: int = 0
    left_pending: int = 0  # failed rows not recorded: the job stopped for their error
    abandoned: int = 0  # requests in flight a second Ctrl-C gave up on (sent, not recorded)


# A closed terminal or a dropped ssh session sends SIGHUP: stop as for SIGTERM.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _EarlyStops:
    """Stop signals that came before the pool watched for them. Signals are process-wide,
    so this is too: `catch_stops_early` counts them, the pool's watcher takes them."""

    received = 0


def take_early_stops() -> int:
    """How many stop signals came before the caller watched for them (counted once)."""
    received, _EarlyStops.received = _EarlyStops.received, 0
    return received


@contextmanager
def catch_stops_early() -> Iterator[None]:
    """Around a run started from the command line: a Ctrl-C (SIGTERM, SIGHUP) before the
    pool watches for signals, right after "starting:", is counted instead of killing the
    process; the pool then stops at once as for that signal (exit 130, a summary)."""

    def count(signum: int, frame: FrameType | None) -> None:
        _EarlyStops.received += 1

    previous = {each: signal.getsignal(each) for each in STOP_SIGNALS}
    for each in STOP_SIGNALS:
        signal.signal(each, count)
    _EarlyStops.received = 0
    try:
        yield
    finally:
        _EarlyStops.received = 0
        for each, handler in previous.items():
            signal.signal(each, handler)


class StopHub:
    """One watcher of the stop signals for several pools sending at once in one event
    loop: a signal handler is per process, so the pools cannot each install one. Every
    pool that listens gets each signal (the first stops it gently, the next at once);
    `received` tells the caller not to start another."""

    def __init__(self) -> None:
        self.received = 0
        self._pools: set[Scheduler] = set()

    async def watch(self) -> None:
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            for _ in range(take_early_stops()):
                self._deliver()
            async for _ in signals:
                self._deliver()

    def _deliver(self) -> None:
        self.received += 1
        for pool in list(self._pools):
            pool._on_signal()

    @contextmanager
    def listening(self, pool: Scheduler) -> Iterator[None]:
        self._pools.add(pool)
        try:
            yield
        finally:
            self._pools.discard(pool)


class Scheduler:
    def __init__(
        self,
        provider: Provider,
        pacer: Turns,
        policy: RetryPolicy,
        price: Price | None,
        *,
        concurrency: int,
        budget: SpendingLimit | None = None,
        log: RunLog | None = None,
        schema: OutputSchema | None = None,
        schema_retries: int = 1,
        grace_s: float = 10.0,
        counters: RunCounters | None = None,
        on_stop: Callable[[float], None] | None = None,
        breaker: Breaker | None = None,
        heartbeat_s: float | None = None,
    ) -> None:
        self.pacer = pacer
        self.heartbeat_s = beat_interval(log_interval()) if heartbeat_s is None else heartbeat_s
        self.concurrency = concurrency
        self.grace_s = grace_s
        self.outcome = Outcome()
        self.counters = counters or RunCounters()
        self._on_stop = on_stop  # told the grace period when the first stop begins
        breaker = breaker or Breaker()
        if breaker.settings is None:  # what a stop tells the user to check
            breaker.settings = getattr(provider, "settings", None)
        self._log = log or RunLog(None)
        self.attempts = Attempts(
            provider,
            pacer,
            Rules(policy, price, schema, schema_retries),
            budget or Budget(None, None, price),
            self._log,
            self.outcome,
            self.counters,
            breaker,
            self._fail_job,
        )
        self._held = HeldFailures()
        self._stopping = False
        self._work: TaskGroup | None = None
        self._flush_wanted = anyio.Event()

    async def run(
        self,
        planned: Iterator[Planned],
        sink: ResultSink,
        *,
        handle_signals: bool = False,
        signals: StopHub | None = None,
    ) -> Outcome:
        """Process every planned row; returns when all are recorded or the run stopped.
        Stop signals are watched here (`handle_signals`) or by a hub shared with other
        pools (`signals`)."""
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._record_periodically, sink)
                outer.start_soon(self._beat, sink)
                if handle_signals and signals is None:
                    outer.start_soon(self._watch_signals)
                with signals.listening(self) if signals is not None else nullcontext():
                    async with anyio.create_task_group() as work:
                        self._work = work
                        for _ in range(signals.received if signals is not None else 0):
                            self._on_signal()  # a stop that came while the pool started
                        shared = iter(planned)
                        for _ in range(self.concurrency):
                            work.start_soon(self._worker, shared, sink)
                outer.cancel_scope.cancel()
        finally:
            self._settle_held(sink)
            self._read_pacer()  # what the pacer learned since the last beat, for the summary
            await self._flush(sink)
        return self.outcome

    def stop(self) -> None:
        """Stop taking new rows; requests in flight may finish within the grace period."""
        if self._stopping or self._work is None:
            return
        self.outcome.interrupted = True
        if self._on_stop is not None and self.counters.in_flight:
            self._on_stop(self.grace_s)  # with nothing in flight there is nothing to wait for
        self._stop_taking_rows()

    def _stop_taking_rows(self) -> None:
        # Requests already sent are paid for: let them land (and be recorded) for a while.
        self._stopping = True
        if self._work is not None:
            self._work.cancel_scope.deadline = anyio.current_time() + self.grace_s
        self._end_if_idle()

    def _end_if_idle(self) -> None:
        """Once stopping, end the pool as soon as no request awaits an answer: workers
        left only wait for a turn or a retry, which a stop never sends."""
        if self._stopping and self.counters.in_flight == 0 and self._work is not None:
            self._work.cancel_scope.cancel()

    def stop_now(self) -> None:
        self._stopping = True
        self.outcome.interrupted = True
        self.outcome.abandoned = self.counters.in_flight
        if self._work is not None:
            self._work.cancel_scope.cancel()

    async def _watch_signals(self) -> None:
        hub = StopHub()  # a pool alone: the hub has one listener
        with hub.listening(self):
            await hub.watch()

    def _on_signal(self) -> None:
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
                    finished = await self._process(item)
                except (JobFatalError, JobStopped) as exc:
                    self._fail_job(exc)
                    return
                if finished is None:
                    self._end_if_idle()
                    return
                self._finished(finished, sink)
            else:
                self._land(item, sink)
            self._end_if_idle()

    def _land(self, result: RowResult, sink: ResultSink) -> None:
        if sink.land(result) >= FLUSH_MAX_ROWS:
            self._flush_wanted.set()

    def _finished(self, finished: Finished, sink: ResultSink) -> None:
        """Record a finished row, or hold a failed one back (see the module docstring)."""
        result = finished.result
        if self.outcome.fatal is not None:
            # The job is stopping: the stop, not a late success, settles what is held.
            if result.ok:
                self._land(result, sink)
            else:
                self._hold(finished, sink)
            self._settle_held(sink)
        elif result.ok:
            self._land(result, sink)
            for failed in self._held.release():
                self._land(failed.result, sink)
        else:
            self._hold(finished, sink)

    def _hold(self, failed: Finished, sink: ResultSink) -> None:
        for now in self._held.hold(failed):
            self._land(now.result, sink)

    def _settle_held(self, sink: ResultSink) -> None:
        kept, pending = self._held.settle(self.outcome.fatal)
        for failed in kept:
            self._land(failed.result, sink)
        for failed in pending:
            self._left_pending(failed.tries)

    def _left_pending(self, tries: RowTries) -> None:
        """A row the run leaves without a result: its paid attempts still count."""
        spend = tries.spend
        if spend.paid:
            self.counters.paid_unfinished(spend.usage, spend.cost_usd)
        self.outcome.left_pending += 1

    def fail(self, error: JobStopped) -> None:
        """Stop the job for a reason found outside the workers (a failed write)."""
        self._fail_job(error)

    def _fail_job(self, error: JobFatalError | JobStopped) -> None:
        if self.outcome.fatal is None:
            self.outcome.fatal = explained(error, self.attempts.breaker.settings)
        self._stop_taking_rows()

    async def _process(self, request: ChatRequest) -> Finished | None:
        """The row's final result, or None when the run stopped before it finished."""
        tries = RowTries()
        finished: Finished | None = None
        try:
            while finished is None:
                tried_before = tries.attempts
                try:
                    decision = await Attempt(self.attempts, request, tries).make(self._wanted)
                finally:
                    # A retry counts once it is sent: a stop may cancel one already decided.
                    if tried_before and tries.attempts > tried_before:
                        self.counters.retry_sent()
                if decision is None:
                    return None
                if isinstance(decision, Finished):
                    finished = decision
                elif self._stopping:
                    return None  # a stop sends no retry: the row stays unfinished, not waited on
                elif (wait := decision.when - anyio.current_time()) > 0:
                    await anyio.sleep(wait)
            return finished
        finally:
            if finished is None and tries.spend.paid:
                # Stopped between attempts: pending, but what it paid for counts.
                self.counters.paid_unfinished(tries.spend.usage, tries.spend.cost_usd)

    async def _beat(self, sink: ResultSink) -> None:
        """While the run is alive: read what it waits for, and let the display show it."""
        show = sink.show if isinstance(sink, ShowsProgress) else None
        while True:
            await anyio.sleep(self.heartbeat_s)
            self._read_pacer()
            if show is not None:
                show()

    def _read_pacer(self) -> None:
        counters = self.counters
        counters.paused_s, counters.pause_why = self.pacer.pause_left()
        learned = self.pacer.learned_per_minute()
        for dimension, per_minute in learned.items():
            if counters.learned_limits.get(dimension) != per_minute:
                self._log.event(
                    "limit_learned",
                    dimension=dimension,
                    per_minute=per_minute,
                    source="the server's rate-limit headers",
                )
        counters.learned_limits = learned

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
