"""Pacing a run at the provider's limit and no faster.

`Pacer` is shared by every worker. Before each attempt a worker reserves a start
time for one request and its token estimate, then sleeps until that time; nothing
polls. Reservations follow the generic cell rate algorithm (virtual scheduling):
request n+1 may start `cost / rate` after request n, so requests are evenly spaced
with no burst at all. A burst would be fatal against servers that enforce a
per-minute limit per second (OpenAI quantizes that way): a full bucket emptied
in the first second plus the steady rate is twice the allowed rate.

Limits come from the job, from the server's rate-limit headers (learned live,
so a job that sets none still runs near its tier), and from 429s: the pool waits
as long as the server asked, and when no limit is known the rate backs off
multiplicatively and creeps back additively. A concurrency window does the same
for requests in flight, under the job's hard cap.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from pipeline.errors import ProviderError, RateLimited
from pipeline.types import ChatRequest, Completion, RateLimitInfo

HEADROOM = 0.99  # pace 1% under a known limit: arrival jitter must not tip a window over
BACKOFF_FACTOR = 0.7
RECOVERY_PER_S = 0.02  # additive increase: +2% of the backed-off rate per second
MAX_HEADER_PAUSE_S = 60.0
PROBE_WINDOW = 16  # requests in flight before the first answer, when no limit is declared


def refill_wait(
    remaining: float | None, limit: float | None, reset_s: float | None, needed: float
) -> float:
    """Seconds until a bucket with `remaining` of `limit` units, full again in `reset_s`,
    holds `needed` units (0 when it already does or the headers do not say)."""
    if remaining is None or remaining >= needed or not limit or not reset_s:
        return 0.0
    missing = limit - remaining
    if missing <= 0:
        return 0.0
    refill_per_s = missing / reset_s
    return (needed - remaining) / refill_per_s


class Gate:
    """One paced dimension (requests or tokens), in units per second."""

    def __init__(self, per_minute: float | None) -> None:
        self.declared = per_minute / 60.0 if per_minute else None
        self.learned: float | None = None
        self.adaptive: float | None = None
        self.backlog_booked = False
        self._next_free = 0.0

    @property
    def known_limit(self) -> float | None:
        declared, learned = self.declared, self.learned
        if declared is None or learned is None:
            return declared if learned is None else learned
        return min(declared, learned)

    @property
    def rate(self) -> float | None:
        limit = self.known_limit
        if limit is not None:
            limit *= HEADROOM
        if self.adaptive is not None:
            return self.adaptive if limit is None else min(limit, self.adaptive)
        return limit

    @property
    def next_free(self) -> float:
        return self._next_free

    def book_backlog(self, since: float, amount: float) -> None:
        """Count `amount` units already sent since `since` as if they had been paced."""
        self.backlog_booked = True
        rate = self.rate
        if rate is not None:
            self._next_free = max(self._next_free, since + amount / rate)

    def commit(self, start: float, amount: float) -> None:
        """Book `amount` units starting at `start`: the next booking waits its turn."""
        rate = self.rate
        if rate is not None:
            self._next_free = max(self._next_free, start) + amount / rate


@dataclass
class PacerState:
    requests_per_s: float | None
    tokens_per_s: float | None
    window: int
    paused_s: float


class Turns(ABC):
    """What an attempt needs from a pacer: a turn before it, and an account of it after.

    Built on the pacing primitives a pacer has (`acquire`, `release`, `observe`,
    `rate_limited`, `learn_prompt_scale`, `prompt_scale`), so a pacer that paces
    differently (a cluster worker's, paced by leases) offers the attempt the same two
    calls.
    """

    prompt_scale: float
    _clock: Callable[[], float]  # the event loop's clock

    async def take_turn(self, request: ChatRequest) -> float:
        """Wait for a slot and this request's paced turn; returns the start time (loop clock)."""
        await self.acquire(request.prompt_estimate * self.prompt_scale + request.reply_budget)
        return self._clock()

    def end_turn(
        self, request: ChatRequest, sent_at: float, answer: Completion | ProviderError | None
    ) -> None:
        """Give the slot back and learn from the answer (None: the attempt never finished)."""
        self.release(succeeded=isinstance(answer, Completion))
        if isinstance(answer, Completion):
            self.observe(answer.rate_limits)
            if answer.usage is not None:
                self.learn_prompt_scale(request.prompt_estimate, answer.usage.prompt_tokens)
        elif answer is not None:
            self.observe(answer.rate_limits)
            if isinstance(answer, RateLimited):
                self.rate_limited(answer.retry_after, sent_at=sent_at)

    @abstractmethod
    async def acquire(self, tokens: float) -> None: ...

    @abstractmethod
    def release(self, *, succeeded: bool) -> None: ...

    @abstractmethod
    def observe(self, info: RateLimitInfo | None) -> None: ...

    @abstractmethod
    def rate_limited(self, retry_after: float | None, sent_at: float | None = None) -> None: ...

    @abstractmethod
    def learn_prompt_scale(self, estimated: int, actual: int) -> None: ...


class Pacer(Turns):
    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        *,
        max_concurrency: int,
        initial_concurrency: int | None = None,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        # Every time the pacer reads, and every time it sleeps until, is on this clock:
        # the event loop's, so that a test's virtual loop clock drives all of it.
        self._clock = clock
        self.requests = Gate(requests_per_minute)
        self.tokens = Gate(tokens_per_minute)
        self.max_concurrency = max_concurrency
        self.window = initial_concurrency or max_concurrency
        if requests_per_minute is None and tokens_per_minute is None:
            # Nothing says how fast the server may be asked: probe with a few requests
            # first; the first answer's headers (or slow start) open the window.
            self.window = min(self.window, PROBE_WINDOW)
        self.in_flight = 0
        self._slot_waiters: deque[anyio.Event] = deque()
        self._slow_start = self.window < max_concurrency
        self._paused_until = 0.0
        self._window_grown_at = 0.0
        self._rate_grown_at = 0.0
        self._backed_off_at = -math.inf
        self._rate_step = 0.0
        # Send times, only to estimate the recent rate.
        self._sent_times: deque[float] = deque(maxlen=4096)
        self.prompt_scale = 1.0
        # Sent while no limit was known, booked once one is learned (see `_learn`).
        self._unpaced_since: float | None = None
        self._unpaced_requests = 0.0
        self._unpaced_tokens = 0.0
        self._last_tokens = 1.0

    # -- the pacing primitives -----------------------------------------------------------

    async def acquire(self, tokens: float) -> None:
        """Wait for a free slot in the window, then for this request's turn."""
        await self._take_slot()
        self._last_tokens = max(1.0, tokens)
        if self.requests.rate is None and self.tokens.rate is None and not self._paused_until:
            self._sent_times.append(self._clock())
            if self._unpaced_since is None:
                self._unpaced_since = self._clock()
            self._unpaced_requests += 1
            self._unpaced_tokens += tokens
            return  # nothing to pace against (yet): no reservation needed
        try:
            while True:
                now = self._clock()
                start = max(now, self._paused_until, self.requests.next_free, self.tokens.next_free)
                self.requests.commit(start, 1)
                self.tokens.commit(start, tokens)
                if start > now:
                    await anyio.sleep(start - now)
                # A 429 elsewhere may have paused the pool while this one slept.
                if self._clock() >= self._paused_until:
                    break
            self._sent_times.append(self._clock())
        except BaseException:
            self._give_slot()
            raise

    def release(self, *, succeeded: bool) -> None:
        """Give the slot back; successes open the window wider, as TCP does."""
        if succeeded:
            self._grow()
        self._give_slot()

    # -- what the server said ----------------------------------------------------------

    def observe(self, info: RateLimitInfo | None) -> None:
        """Learn limits from headers; wait when the server's bucket lacks this request's units.

        `remaining` and `reset` describe a bucket refilling up to the limit: OpenAI's
        reset is the time until the limit "resets to its initial state", Anthropic's
        when it is "fully replenished". So the next request waits only until its own
        units have refilled, never until the bucket is full. Servers that report from a
        short enforcement window (remaining near 0, reset in milliseconds) then cost
        nothing, as they should: that is their steady state.
        """
        if info is None:
            return
        if info.limit_requests:
            self._learn(self.requests, info.limit_requests, self._unpaced_requests)
        if info.limit_tokens:
            self._learn(self.tokens, info.limit_tokens, self._unpaced_tokens)
        for remaining, limit, reset, needed in (
            (info.remaining_requests, info.limit_requests, info.reset_requests_s, 1.0),
            (info.remaining_tokens, info.limit_tokens, info.reset_tokens_s, self._last_tokens),
        ):
            wait = refill_wait(remaining, limit, reset, needed)
            if wait > 0:
                self.pause(min(wait, MAX_HEADER_PAUSE_S))

    def _learn(self, gate: Gate, per_minute: float, unpaced: float) -> None:
        first = gate.rate is None and not gate.backlog_booked
        gate.learned = per_minute / 60.0
        if first and self._slow_start:
            # The rate is known now and paces the pool: the window need not probe further.
            self.window = self.max_concurrency
            self._slow_start = False
            self._wake_waiters()
        if first and unpaced and self._unpaced_since is not None:
            # What went out before any limit was known counts against the same window:
            # book it (once), so a fixed-window limiter is not overrun at the end of the
            # first one.
            gate.book_backlog(self._unpaced_since, unpaced)

    def rate_limited(self, retry_after: float | None, sent_at: float | None = None) -> None:
        """A 429: hold the whole pool as long as asked, and back off where no limit is known.

        Requests sent before the last back-off were part of the same overload: they extend
        the pause but do not shrink the window and rate again.
        """
        self.pause(retry_after if retry_after is not None else 1.0)
        if sent_at is not None and sent_at < self._backed_off_at:
            return
        now = self._clock()
        self._backed_off_at = now
        self.window = max(1, math.floor(self.window * BACKOFF_FACTOR))
        self._slow_start = False
        if self.requests.declared is None and self.requests.learned is None:
            current = self.requests.adaptive or self._recent_rate()
            if current:
                self.requests.adaptive = max(0.1, current * BACKOFF_FACTOR)
                self._rate_step = self.requests.adaptive * RECOVERY_PER_S
        self._window_grown_at = self._rate_grown_at = now

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, self._clock() + seconds)

    def learn_prompt_scale(self, estimated: int, actual: int) -> None:
        """Correct the offline prompt estimate from the usage that came back."""
        if estimated > 0 and actual > 0:
            self.prompt_scale += 0.1 * (actual / estimated - self.prompt_scale)

    def state(self) -> PacerState:
        paused = max(0.0, self._paused_until - self._clock())
        return PacerState(self.requests.rate, self.tokens.rate, self.window, paused)

    # -- internals ----------------------------------------------------------------------

    async def _take_slot(self) -> None:
        if self.in_flight < self.window and not self._slot_waiters:
            self.in_flight += 1
            return
        granted = anyio.Event()
        self._slot_waiters.append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self._give_slot()
            else:
                self._slot_waiters.remove(granted)
            raise

    def _give_slot(self) -> None:
        self.in_flight -= 1
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        while self._slot_waiters and self.in_flight < self.window:
            self.in_flight += 1
            self._slot_waiters.popleft().set()

    def _grow(self) -> None:
        if self.window >= self.max_concurrency and self.requests.adaptive is None:
            return
        now = self._clock()
        # Time spent paused at the server's request is not evidence of spare capacity.
        if self.window < self.max_concurrency and (
            self._slow_start or now - max(self._window_grown_at, self._paused_until) >= 1.0
        ):
            self.window += 1
            self._window_grown_at = now
        adaptive = self.requests.adaptive
        elapsed = now - max(self._rate_grown_at, self._paused_until)
        if adaptive is not None and elapsed >= 1.0:
            # Additive increase: a fixed step a second, a few seconds' worth at most.
            self.requests.adaptive = adaptive + self._rate_step * min(elapsed, 3.0)
            self._rate_grown_at = now

    def recent_rate(self) -> float:
        """Requests sent per second over the last two seconds."""
        return self._recent_rate() or 0.0

    def _recent_rate(self) -> float | None:
        now = self._clock()
        recent = [t for t in self._sent_times if now - t <= 2.0]
        if len(recent) < 2:
            return None
        return (len(recent) - 1) / max(recent[-1] - recent[0], 0.05)
