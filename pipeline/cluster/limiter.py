"""One rate limit for a whole cluster: the policy's owner, and the pacer workers lease from.

`ClusterLimiter` runs as a single Ray actor. It owns the cluster's one `PacingPolicy`
(`pacing.py`), the same policy one process's `Pacer` owns: the same shares of each
second, the server's window edges, the fall back to even spacing on a 429, the pause,
the back-off and the growth of the concurrency window. Workers do not ask per request:
`LeasedPacer` leases a few turns the policy booked (at most its share of the window,
and no more than `SLICE_S` ahead) and hands them to its requests one by one, so the
actor sees tens of calls a second however fast the cluster sends. With each lease a
worker hands over what its answers said since the last one (`Answer`s: successes,
rate-limit headers, 429s), which the policy learns from exactly as a local pacer does
from its own, plus tokens used beyond what was booked and its running totals for the
driver's progress display.

Times crossing processes are wall-clock (`time.time()`): monotonic clocks are not
comparable across machines, and cluster nodes keep their clocks in sync.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from pipeline.cluster.budget import AllowanceBudget, Allowances
from pipeline.counters import RunCounters
from pipeline.errors import ProviderError, RateLimited
from pipeline.pacing import PacingPolicy, recent_rate
from pipeline.ratelimit import PacerBase, Slots
from pipeline.types import ChatRequest, Completion, RateLimitInfo

SLICE_S = 0.2  # a lease books no further ahead than this (beyond its first turn)
MAX_LEASE = 256  # turns per lease, whatever the rate
UNPACED_LEASE = 64  # turns per lease when no limit is known (they all start at once)
# Turns are booked from this far ahead of the lease call, so the worker has them before
# they start and sends each on its own timer, as a local pacer does: sent on arrival, a
# share's requests would start as late as the call took, by more for some than others.
LEAD_S = 0.05
STALE_S = 0.5  # a grant this late is dropped rather than sent in a burst with newer ones
MAX_ANSWERS = 1024  # answers one report carries at most (the latest)


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


@dataclass(frozen=True, slots=True)
class Answer:
    """What one answer tells the pacing policy (times on the wall clock)."""

    sent_at: float
    answered_at: float
    succeeded: bool
    rate_limits: RateLimitInfo | None = None
    rate_limited: bool = False  # a 429
    retry_after: float | None = None


@dataclass
class WorkerReport(RunningTotals):
    """What one worker says with each call: news since its last call, and running totals."""

    worker: str
    cap: int = 0  # the requests this worker may have in flight (0: not said)
    waiting: int = 0  # its requests holding a slot and waiting for a turn (0: not said)
    answers: list[Answer] = field(default_factory=list)  # in the order they came
    token_debt: float = 0.0  # tokens spent beyond the estimates booked with the leases
    stop: str | None = None  # a job-level failure this worker hit: every worker stops
    spent_usd: float = 0.0  # what the worker's budget counted (for a finished worker's hold)
    spent_tokens: float = 0.0
    done: bool = False


@dataclass(frozen=True)
class Lease:
    starts: tuple[float, ...]  # wall clock, in order
    tokens_each: float
    window: int  # this worker's share of the cluster's concurrency window
    paused_until: float = 0.0
    ask_again_at: float | None = None  # no turn could be booked yet: ask again then
    stop: str | None = None

    def grants(self) -> list[float]:
        return list(self.starts)


@dataclass
class ClusterProgress(RunningTotals):
    leases: int = 0
    requests_per_s: float = 0.0
    stop: str | None = None


class ClusterLimiter:
    """The cluster's one pacing policy. Plain Python: Ray wraps it as an actor."""

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        *,
        concurrency: int,
        initial_concurrency: int | None = None,
        clock: Callable[[], float] = time.time,
        budget: Allowances | None = None,
        lead_s: float = LEAD_S,
    ) -> None:
        self.lead_s = lead_s
        self.policy = PacingPolicy(
            requests_per_minute,
            tokens_per_minute,
            max_concurrency=concurrency,
            initial_concurrency=initial_concurrency,
        )
        self.clock = clock
        self.stop_reason: str | None = None
        self.reports: dict[str, WorkerReport] = {}
        self.leases = 0
        self.budget = budget or Allowances(None, None)

    # -- the one call workers make --------------------------------------------------------

    def lease(self, report: WorkerReport, tokens_each: float, wanted: int = MAX_LEASE) -> Lease:
        """Take the worker's report, then book its next few turns.

        One for each of its requests waiting for a turn, as a local pacer books a turn
        for each request that holds a slot (a turn booked for a request still without
        one would go out late); never more than its share of the window, and none more
        than `SLICE_S` ahead of the first: the worker asks again as they run out."""
        self.report(report)
        self.leases += 1
        now = self.clock() + self.lead_s
        policy = self.policy
        window = self._share(report.cap)
        if self.stop_reason is not None:
            return Lease((), tokens_each, window, policy.paused_until, stop=self.stop_reason)
        most = min(wanted, report.waiting or window, window)
        most = min(most, MAX_LEASE if policy.paces else UNPACED_LEASE)
        starts: list[float] = []
        while len(starts) < most:
            turn = policy.take_turns(now, tokens_each, most - len(starts))
            if not turn.booked:
                if not starts:
                    return Lease((), tokens_each, window, policy.paused_until, turn.at)
                break
            policy.started(turn.at, turn.count)
            starts.extend([turn.at] * turn.count)
            if turn.at > starts[0] + SLICE_S:
                break
        return Lease(tuple(starts), tokens_each, window, policy.paused_until)

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
        policy = self.policy
        self.reports[report.worker] = report
        if report.done:
            self.budget.finish(report.worker, report.spent_usd, report.spent_tokens)
        policy.spend_more_tokens(self.clock(), report.token_debt)
        for answer in report.answers:
            # In the order a local pacer learns from one answer (`PacerBase.end_turn`).
            if answer.succeeded:
                policy.succeeded(answer.answered_at)
            if answer.rate_limits is not None:
                policy.observe(answer.rate_limits, answer.answered_at, answer.sent_at)
            if answer.rate_limited:
                policy.rate_limited(answer.retry_after, answer.answered_at, answer.sent_at)
        report.answers = []  # learned from: the kept report is for the totals
        if report.stop and self.stop_reason is None:
            self.stop_reason = report.stop

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
        total.requests_per_s = self.policy.recent_rate(self.clock()) or 0.0
        return total

    def state(self) -> dict[str, float | int | None]:
        policy = self.policy
        return {
            "requests_per_s": policy.requests.rate,
            "tokens_per_s": policy.tokens.rate,
            "window": policy.window.size,
            "paused_until": policy.paused_until,
        }

    # -- internals ------------------------------------------------------------------------

    def _share(self, cap: int) -> int:
        """A worker's share of the window: no more than it may have in flight."""
        active = sum(1 for r in self.reports.values() if not r.done) or 1
        share = max(1, math.ceil(self.policy.window.size / active))
        return min(share, cap) if cap else share


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


class LeasedPacer(PacerBase):
    """A worker's pacer: the attempt's `Turns`, with turns leased from the cluster's policy.

    Requests in flight stay within this worker's share of the cluster's window. What
    the answers say goes to the limiter with the next call; a pause they ask for (a 429,
    or headers saying the budget is spent) also holds this worker at once, and voids the
    turns it holds that start within the pause, as a local pacer books those again.
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
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.worker = worker
        self._wall = wall_clock  # the limiter's clock: every time crossing to it
        self.budget = budget
        self._allow = allow
        self._topping_up = anyio.Lock()
        self._clock = anyio.current_time
        self._lease = lease
        self.prompt_scale = 1.0
        self._on_stop = on_stop
        self._cap = max_concurrency
        self._window = max_concurrency  # this worker's share, as the last lease said
        self._slots = Slots(lambda: min(self._cap, self._window))
        # Only for the pauses the answers ask for: the limits are the cluster's to learn.
        self._pauses = PacingPolicy(None, None, max_concurrency=max_concurrency)
        self._grants: deque[float] = deque()
        self._tokens_each = 0.0
        self._refilling: anyio.Event | None = None
        self._waiting = 0  # requests holding a slot, waiting for a turn
        self._ask_again_at = 0.0  # the limiter booked nothing: no use asking before this
        self._debt = 0.0
        self._answers: deque[Answer] = deque(maxlen=MAX_ANSWERS)
        self._sent: deque[float] = deque(maxlen=4096)  # only for the recent rate
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
    def max_concurrency(self) -> int:
        return self._cap

    @property
    def in_flight(self) -> int:
        return self._slots.in_flight

    def recent_rate(self) -> float:
        """Requests this worker sent per second over the last two seconds."""
        return recent_rate(self._sent, self._clock()) or 0.0

    async def acquire(self, tokens: float) -> None:
        await self._slots.take()
        try:
            start = await self._grant(tokens)
            while True:
                wait = max(start, self.paused_until) - self._wall()
                if wait <= 0:
                    break
                await anyio.sleep(wait)
                start = 0.0  # a pause learned meanwhile is waited out too
        except BaseException:
            self._slots.give()
            raise
        self._sent.append(self._clock())

    def release(self, *, succeeded: bool) -> None:
        self._slots.give()

    def end_turn(
        self,
        request: ChatRequest,
        sent_at: float,
        answer: Completion | ProviderError | None,
    ) -> None:
        """Give the slot back, keep what the answer says for the limiter, and hold this
        worker at once for a pause it asks for (one reading of the clock for both)."""
        self._slots.give()
        if answer is None:
            return
        now = self._wall()
        rejected = isinstance(answer, RateLimited)
        retry_after = answer.retry_after if isinstance(answer, RateLimited) else None
        self._answers.append(
            Answer(
                sent_at=now - (self._clock() - sent_at),
                answered_at=now,
                succeeded=isinstance(answer, Completion),
                rate_limits=answer.rate_limits,
                rate_limited=rejected,
                retry_after=retry_after,
            )
        )
        if isinstance(answer, Completion) and answer.usage is not None:
            self.learn_prompt_scale(request.prompt_estimate, answer.usage.prompt_tokens)
        self._pause_for(now, answer.rate_limits, rejected, retry_after)

    def observe(self, info: RateLimitInfo | None, sent_at: float | None = None) -> None:
        self._pause_for(self._wall(), info, rejected=False, retry_after=None)

    def rate_limited(self, retry_after: float | None, sent_at: float | None = None) -> None:
        self._pause_for(self._wall(), None, rejected=True, retry_after=retry_after)

    def learn_prompt_scale(self, estimated: int, actual: int) -> None:
        """Correct the offline prompt estimate from the usage that came back."""
        if estimated > 0 and actual > 0:
            self.prompt_scale += 0.1 * (actual / estimated - self.prompt_scale)

    # -- reports --------------------------------------------------------------------------

    def report(self, *, done: bool = False) -> WorkerReport:
        """The news since the last call, and this worker's running totals."""
        t, c = self.totals, self.counters
        report = WorkerReport(
            self.worker,
            cap=self._cap,
            waiting=self._waiting,
            answers=list(self._answers),
            token_debt=self._debt,
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
        self._answers.clear()
        return report

    # -- internals ------------------------------------------------------------------------

    def _pause_for(
        self,
        now: float,
        info: RateLimitInfo | None,
        rejected: bool,
        retry_after: float | None,
    ) -> None:
        """The pause an answer asks for (the limiter's policy hears of it with the next
        call and pauses the cluster; this worker need not wait for that)."""
        pauses = self._pauses
        if info is not None:
            pauses.observe(info, now)
        if rejected:
            pauses.rate_limited(retry_after, now)
        until = pauses.paused_until
        if until > self.paused_until:
            self.paused_until = until
            # Turns booked before the pause: a local pacer books those again after it.
            while self._grants and self._grants[0] < until:
                self._grants.popleft()

    async def _grant(self, tokens: float) -> float:
        self._waiting += 1
        try:
            return await self._next_grant(tokens)
        finally:
            self._waiting -= 1

    async def _next_grant(self, tokens: float) -> float:
        while True:
            if self.stop_reason is not None:
                # Another worker hit a job-level failure (or the driver was interrupted).
                if self._on_stop is not None:
                    self._on_stop()
                return 0.0
            now = self._wall()
            while self._grants and self._grants[0] < now - STALE_S:
                self._grants.popleft()
                self.dropped += 1
            if self._grants:
                self._debt += tokens - self._tokens_each
                return self._grants.popleft()
            if self._refilling is not None:
                await self._refilling.wait()
            elif now < self._ask_again_at:
                # The policy books no turn this far ahead: ask when it will.
                await anyio.sleep(self._ask_again_at - now)
            else:
                await self._refill(tokens)

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
        self._window = lease.window
        self._slots.wake()
        if lease.stop is not None and self.stop_reason is None:
            self.stop_reason = lease.stop
        self._grants.extend(lease.starts)
        self._ask_again_at = lease.ask_again_at or 0.0
