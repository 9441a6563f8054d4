"""One rate limit for a whole cluster: a schedule owner and the pacer workers lease from.

`ClusterLimiter` runs as a single Ray actor. It owns the requests and tokens schedule
(the same generic cell rate algorithm and `Gate`s as one process, so requests are
evenly spaced across the cluster with no burst), the cluster-wide concurrency window,
the 429 pause and the limits the headers announce. Workers do not ask per request:
`LeasedPacer` leases a slice of start times (about `SLICE_S` of the cluster's rate)
and hands them to its requests one by one, so the actor sees tens of calls a second
however fast the cluster sends. With each lease a worker reports what happened since
the last one: tokens used beyond what was booked, 429s and how long the server asked
to wait, limits learned from headers, and its running totals for the driver's
progress display.

Times crossing processes are wall-clock (`time.time()`): monotonic clocks are not
comparable across machines, and cluster nodes keep their clocks in sync.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from pipeline.cluster.budget import AllowanceBudget, Allowances
from pipeline.counters import RunCounters
from pipeline.ratelimit import BACKOFF_FACTOR, Gate, Pacer, Turns
from pipeline.types import ChatRequest, RateLimitInfo

SLICE_S = 0.2  # a lease covers this much of the cluster's schedule
MAX_LEASE = 256  # grants per lease, whatever the rate
UNPACED_LEASE = 64  # grants per lease when no limit is known (they all start at once)
STALE_S = 0.5  # a grant this late is dropped rather than sent in a burst with newer ones
RECOVERY_PER_S = 0.02


@dataclass(kw_only=True)
class RunningTotals:
    """A worker's running totals, and their sum over the cluster for the driver's display."""

    reused: int = 0
    sent: int = 0
    rows: int = 0
    failed: int = 0
    tokens: int = 0
    cost: float = 0.0
    priced: bool = False
    retries: int = 0
    rate_limited: int = 0
    in_flight: int = 0

    def add(self, other: RunningTotals) -> None:
        self.reused += other.reused
        self.sent += other.sent
        self.rows += other.rows
        self.failed += other.failed
        self.tokens += other.tokens
        self.cost += other.cost
        self.priced = self.priced or other.priced
        self.retries += other.retries
        self.rate_limited += other.rate_limited
        self.in_flight += other.in_flight


@dataclass
class WorkerReport(RunningTotals):
    """What one worker says with each call: deltas since its last call, and running totals."""

    worker: str
    token_debt: float = 0.0  # tokens spent beyond the estimates booked with the leases
    rate_limited_s: float | None = None  # the longest pause a 429 asked for since the last call
    rate_limited_at: float | None = None  # when the oldest of those requests was sent
    pause_s: float | None = None  # headers said the budget is nearly spent: hold this long
    limit_requests: float | None = None  # per minute, from headers
    limit_tokens: float | None = None
    stop: str | None = None  # a job-level failure this worker hit: every worker stops
    spent_usd: float = 0.0  # what the worker's budget counted (for a finished worker's hold)
    spent_tokens: float = 0.0
    done: bool = False


@dataclass(frozen=True)
class Lease:
    start_at: float  # wall clock
    spacing_s: float
    count: int
    tokens_each: float
    window: int  # this worker's share of the cluster's concurrency window
    paused_until: float = 0.0
    stop: str | None = None

    def grants(self) -> list[float]:
        return [self.start_at + i * self.spacing_s for i in range(self.count)]


@dataclass
class ClusterProgress(RunningTotals):
    leases: int = 0
    requests_per_s: float = 0.0
    stop: str | None = None


@dataclass
class _Window:
    """The cluster's concurrency window: shrinks on 429s, grows back a step a second."""

    cap: int
    size: int
    grown_at: float = 0.0


class ClusterLimiter:
    """The cluster's one schedule. Plain Python: Ray wraps it as an actor."""

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        *,
        concurrency: int,
        initial_concurrency: int | None = None,
        clock: Callable[[], float] = time.time,
        budget: Allowances | None = None,
    ) -> None:
        self.requests = Gate(requests_per_minute)
        self.tokens = Gate(tokens_per_minute)
        self.clock = clock
        self.window = _Window(concurrency, initial_concurrency or concurrency)
        self.paused_until = 0.0
        self.backed_off_at = -math.inf
        self.stop_reason: str | None = None
        self.reports: dict[str, WorkerReport] = {}
        self.leases = 0
        self._granted: deque[tuple[float, int]] = deque(maxlen=4096)
        self.budget = budget or Allowances(None, None)

    # -- the one call workers make --------------------------------------------------------

    def lease(self, report: WorkerReport, tokens_each: float, wanted: int = MAX_LEASE) -> Lease:
        """Take the worker's report, then book its next slice of start times."""
        self.report(report)
        now = self.clock()
        self.leases += 1
        window = self._share()
        if self.stop_reason is not None:
            return Lease(now, 0.0, 0, tokens_each, window, self.paused_until, self.stop_reason)
        spacing = self._spacing(tokens_each)
        start = max(now, self.paused_until, self.requests.next_free, self.tokens.next_free)
        if spacing == 0.0:
            count = min(wanted, UNPACED_LEASE)
        else:
            count = max(1, min(wanted, MAX_LEASE, math.floor(SLICE_S / spacing)))
        self.requests.commit(start, count)
        self.tokens.commit(start, count * tokens_each)
        self._granted.append((start, count))
        return Lease(start, spacing, count, tokens_each, window, self.paused_until)

    def allow(
        self, report: WorkerReport, needed: tuple[float, float], wanted: tuple[float, float]
    ) -> tuple[float, float]:
        """More of the job's budget for a worker: at least what its next attempt `needed`
        if the budget has it, up to what it `wanted` (see `budget.Allowances`)."""
        self.report(report)
        active = sum(1 for r in self.reports.values() if not r.done) or 1
        return self.budget.allow(report.worker, needed, wanted, active)

    def report(self, report: WorkerReport) -> None:
        """A worker's news, without a lease (progress, or a worker that has finished)."""
        now = self.clock()
        self.reports[report.worker] = report
        if report.done:
            self.budget.finish(report.worker, report.spent_usd, report.spent_tokens)
        if report.token_debt and self.tokens.rate:
            self.tokens.commit(now, report.token_debt)
        if report.limit_requests:
            self.requests.learned = report.limit_requests / 60.0
        if report.limit_tokens:
            self.tokens.learned = report.limit_tokens / 60.0
        if report.pause_s:
            self._pause(now + report.pause_s)
        if report.rate_limited_s is not None:
            self._rate_limited(now, report.rate_limited_s, report.rate_limited_at)
        if report.stop and self.stop_reason is None:
            self.stop_reason = report.stop
        self._grow(now)

    def stop(self, reason: str) -> None:
        """Stop the whole cluster taking new rows (a job-level failure, or the driver's ^C)."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def progress(self) -> ClusterProgress:
        """The sum over every worker, for the driver's bar and summary."""
        total = ClusterProgress(leases=self.leases, stop=self.stop_reason)
        for report in self.reports.values():
            total.add(report)
            if report.done:
                total.in_flight -= report.in_flight  # a finished worker has none left
        total.requests_per_s = self._recent_rate(self.clock()) or 0.0
        return total

    def state(self) -> dict[str, float | int | None]:
        return {
            "requests_per_s": self.requests.rate,
            "tokens_per_s": self.tokens.rate,
            "window": self.window.size,
            "paused_until": self.paused_until,
        }

    # -- internals ------------------------------------------------------------------------

    def _spacing(self, tokens_each: float) -> float:
        spacing = 0.0
        if self.requests.rate:
            spacing = 1.0 / self.requests.rate
        if self.tokens.rate and tokens_each > 0:
            spacing = max(spacing, tokens_each / self.tokens.rate)
        return spacing

    def _share(self) -> int:
        active = sum(1 for r in self.reports.values() if not r.done) or 1
        return max(1, math.ceil(self.window.size / active))

    def _pause(self, until: float) -> None:
        self.paused_until = max(self.paused_until, until)
        # Nothing booked from now on starts before the pause ends.
        self.requests.commit(self.paused_until, 0)
        self.tokens.commit(self.paused_until, 0)

    def _rate_limited(self, now: float, retry_after_s: float, sent_at: float | None) -> None:
        self._pause(now + retry_after_s)
        if sent_at is not None and sent_at < self.backed_off_at:
            return  # part of the overload already answered: extend the pause only
        self.backed_off_at = now
        self.window.size = max(1, math.floor(self.window.size * BACKOFF_FACTOR))
        self.window.grown_at = now
        if self.requests.declared is None and self.requests.learned is None:
            current = self.requests.adaptive or self._recent_rate(now)
            if current:
                self.requests.adaptive = max(0.1, current * BACKOFF_FACTOR)

    def _grow(self, now: float) -> None:
        since = now - max(self.window.grown_at, self.paused_until)
        if since < 1.0:
            return
        if self.window.size < self.window.cap:
            self.window.size += max(1, self.window.cap // 64)
            self.window.size = min(self.window.size, self.window.cap)
        if self.requests.adaptive is not None:
            self.requests.adaptive *= 1 + RECOVERY_PER_S * min(since, 3.0)
        self.window.grown_at = now

    def _recent_rate(self, now: float) -> float | None:
        recent = [(t, n) for t, n in self._granted if now - 2.0 <= t <= now]
        if not recent:
            return None
        return sum(n for _, n in recent) / 2.0


LeaseCall = Callable[[WorkerReport, float], Awaitable[Lease]]
ReportCall = Callable[[WorkerReport], Awaitable[None]]
AllowCall = Callable[
    [WorkerReport, tuple[float, float], tuple[float, float]], Awaitable[tuple[float, float]]
]


@dataclass
class _Totals:
    """What the scheduler's counters do not hold: the plan's reuse, retries and 429s."""

    reused: int = 0
    retries: int = 0
    rate_limited: int = 0


class LeasedPacer(Turns):
    """A worker's pacer: the scheduler's `Pacer` interface, paced by leases.

    A local `Pacer` without rates keeps this worker's requests in flight within its
    share of the cluster's window and holds them during a pause this worker saw
    first; the start times come from the cluster's schedule.
    """

    def __init__(
        self,
        worker: str,
        lease: LeaseCall,
        *,
        max_concurrency: int,
        on_stop: Callable[[], None] | None = None,
        budget: AllowanceBudget | None = None,
        allow: AllowCall | None = None,
    ) -> None:
        self.worker = worker
        self.budget = budget
        self._allow = allow
        self._topping_up = anyio.Lock()
        self._clock = anyio.current_time
        self._lease = lease
        self.prompt_scale = 1.0
        self._on_stop = on_stop
        self.local = Pacer(
            None,
            None,
            max_concurrency=max_concurrency,
            initial_concurrency=min(max_concurrency, 16),
        )
        self._grants: deque[float] = deque()
        self._tokens_each = 0.0
        self._refilling: anyio.Event | None = None
        self._debt = 0.0
        self._rate_limited_s: float | None = None
        self._rate_limited_at: float | None = None
        self._pause_s: float | None = None
        self._limits: tuple[float | None, float | None] = (None, None)
        self.paused_until = 0.0
        self.stop_reason: str | None = None
        self.totals = _Totals()
        self.counters = RunCounters()  # the scheduler's, shared
        self.dropped = 0
        self.leases = 0

    # -- the scheduler's pacer interface -----------------------------------------------

    async def take_turn(self, request: ChatRequest) -> float:
        """A paced turn, and room in this worker's allowance for the attempt's spend."""
        started = await super().take_turn(request)
        budget = self.budget
        if budget is not None and budget.active and self._allow is not None:
            async with self._topping_up:  # one top-up at a time; the next may not need one
                needed, wanted = budget.wanted(request)
                if needed != (0.0, 0.0):
                    budget.grow(*await self._allow(self.report(), needed, wanted))
                # Reserved now, with no await since the check: no other attempt can take
                # the room first and stop the job while the cluster still has budget.
                budget.hold(request)
        return started

    @property
    def in_flight(self) -> int:
        return self.local.in_flight

    def recent_rate(self) -> float:
        return self.local.recent_rate()

    async def acquire(self, tokens: float) -> None:
        await self.local.acquire(tokens)
        try:
            start = await self._grant(tokens)
            while True:
                wait = max(start, self.paused_until) - time.time()
                if wait <= 0:
                    break
                await anyio.sleep(wait)
                start = 0.0  # a pause learned meanwhile is waited out too
        except BaseException:
            self.local.release(succeeded=False)
            raise

    def release(self, *, succeeded: bool) -> None:
        self.local.release(succeeded=succeeded)

    def observe(self, info: RateLimitInfo | None, sent_at: float | None = None) -> None:
        if info is None:
            return
        before = self.local.state().paused_s
        self.local.observe(info)
        # The limits are the cluster's to pace against; locally only the pause counts.
        self.local.requests.learned = self.local.tokens.learned = None
        if info.limit_requests or info.limit_tokens:
            self._limits = (info.limit_requests, info.limit_tokens)
        paused = self.local.state().paused_s
        if paused > before:
            self._pause_s = max(self._pause_s or 0.0, paused)

    def rate_limited(self, retry_after: float | None, sent_at: float | None = None) -> None:
        self.local.rate_limited(retry_after, sent_at)
        asked = retry_after if retry_after is not None else 1.0
        self._rate_limited_s = max(self._rate_limited_s or 0.0, asked)
        sent = time.time() - (anyio.current_time() - sent_at) if sent_at is not None else None
        if sent is not None:
            self._rate_limited_at = min(self._rate_limited_at or sent, sent)
        self.paused_until = max(self.paused_until, time.time() + asked)
        # Grants booked before the 429 are void: the next acquire tells the cluster first.
        self._grants.clear()

    def learn_prompt_scale(self, estimated: int, actual: int) -> None:
        self.local.learn_prompt_scale(estimated, actual)
        self.prompt_scale = self.local.prompt_scale

    # -- reports --------------------------------------------------------------------------

    def report(self, *, done: bool = False) -> WorkerReport:
        """The news since the last call, and this worker's running totals."""
        t, c = self.totals, self.counters
        report = WorkerReport(
            self.worker,
            token_debt=self._debt,
            rate_limited_s=self._rate_limited_s,
            rate_limited_at=self._rate_limited_at,
            pause_s=self._pause_s,
            limit_requests=self._limits[0],
            limit_tokens=self._limits[1],
            stop=self.stop_reason,
            reused=t.reused,
            sent=c.requests_sent,
            rows=c.rows_finished,
            failed=c.rows_failed,
            tokens=c.tokens,
            cost=c.cost_usd,
            priced=c.priced,
            retries=t.retries,
            rate_limited=t.rate_limited,
            in_flight=c.in_flight,
            spent_usd=self.budget.spent_usd if self.budget else 0.0,
            spent_tokens=self.budget.spent_tokens if self.budget else 0.0,
            done=done,
        )
        self._debt = 0.0
        self._rate_limited_s = self._rate_limited_at = self._pause_s = None
        return report

    # -- internals ------------------------------------------------------------------------

    async def _grant(self, tokens: float) -> float:
        while True:
            if self.stop_reason is not None:
                # Another worker hit a job-level failure (or the driver was interrupted).
                if self._on_stop is not None:
                    self._on_stop()
                return 0.0
            now = time.time()
            while self._grants and self._grants[0] < now - STALE_S:
                self._grants.popleft()
                self.dropped += 1
            if self._grants:
                start = self._grants.popleft()
                self._debt += tokens - self._tokens_each
                if len(self._grants) < 2 and self._refilling is None:
                    await self._refill(tokens)  # overlaps this request's wait for its turn
                return start
            if self._refilling is None:
                await self._refill(tokens)
            else:
                await self._refilling.wait()

    async def _refill(self, tokens: float) -> None:
        self._refilling = refilled = anyio.Event()
        try:
            lease = await self._lease(self.report(), tokens)
        finally:
            self._refilling = None
            refilled.set()
        self.leases += 1
        self._tokens_each = lease.tokens_each
        self.paused_until = max(self.paused_until, lease.paused_until)
        self.local.max_concurrency = lease.window
        self.local.window = min(self.local.window, lease.window)
        if lease.stop is not None and self.stop_reason is None:
            self.stop_reason = lease.stop
        self._grants.extend(lease.grants())
