"""Pacing a run at the provider's limit and no faster.

`Pacer` is shared by every worker. Before each attempt a worker books a start time
for one request and its token estimate, then sleeps until that time; nothing polls.
Once a limit is known, bookings keep every one-second interval within one second's
share of the per-minute limit (a sliding log), so each second's share may go at once.
One second is the finest interval the providers document enforcing a per-minute
limit over (OpenAI quantizes 60,000 a minute as 1,000 a second; Anthropic enforces 60
a minute as 1 a second; Azure evaluates over 1 or 10 seconds), so no such server can
tell this from even spacing, while the last second's requests leave at its start
instead of over it. A token bucket would not do: a full minute's bucket emptied in
the first second plus the steady rate is twice the allowed rate.

A share sent at once must reach the server within one of its windows. Where the
server reports `reset` from a one-second window, the resets place its window edges
(`ServerWindows`): no share starts just before an edge, and a booking counts only
until its window ends, so each window is filled from its start. Bookings are made at
most half a second ahead, so they use what the first answers tell. A server that
rejects a share sent at once enforces over a shorter interval: its first 429 turns
the pool to even spacing (the generic cell rate algorithm, 1% under the limit) for
the rest of the run. Under two units a second, a share is one request, and requests
are evenly spaced from the start.

Limits come from the job, from the server's rate-limit headers (learned live,
so a job that sets none still runs near its tier), and from 429s: the pool waits
as long as the server asked, and when no limit is known the rate backs off
multiplicatively and creeps back additively. A concurrency window does the same
for requests in flight, under the job's hard cap.
"""

from __future__ import annotations

import bisect
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
SHARE_S = 1.0  # a known limit's share may go at once within this interval (see above)
MIN_SHARE = 2.0  # below two units a second, a share is one request: space them evenly
# A share starting this close before a window edge may straddle it, so it waits until
# this long after the edge: the edge is seen early by a slow first connection's delay.
EDGE_BEFORE_S = 0.05
EDGE_AFTER_S = 0.08
BOOKING_HORIZON_S = 0.5  # a share's start is booked no earlier than this before it
PHASE_TOLERANCE_S = 0.03  # a reset this close to a bucket's time until full reads as one
WINDOW_REPORTS = 1  # reports that read as a window's before its edges are trusted


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
    """One paced dimension (requests or tokens), in units per second.

    With `share_s` > 0 and a known limit, a sliding log: the units started in any
    interval of `share_s` stay within the limit's share of it, and units booked with
    the end of the server's window that holds them count only until then (an amount
    larger than a whole share holds it for as long as the limit takes to pay for it).
    Otherwise, and always after `space_evenly`, the generic cell rate algorithm at
    `rate`.
    """

    def __init__(self, per_minute: float | None, *, share_s: float = 0.0) -> None:
        self.declared = per_minute / 60.0 if per_minute else None
        self.learned: float | None = None
        self.adaptive: float | None = None
        self.backlog_booked = False
        self.share_s = share_s
        self._next_free = 0.0
        self._held: deque[tuple[float, float]] = deque()  # (until, units), in order
        self._blocked_until = 0.0
        self._held_units = 0.0
        self._last_start = 0.0

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

    def space_evenly(self) -> None:
        """Give up sending a share at once (the server enforces over a shorter interval)."""
        if self.share_s:
            self.share_s = 0.0
            self._next_free = max(self._next_free, self._last_start)

    def earliest(self, at: float, amount: float) -> float:
        """The earliest time from `at` when `amount` units may start."""
        share = self._share()
        if share is None:
            return max(at, self._next_free)
        at = max(at, self._last_start, self._blocked_until)
        excess = self._held_units + min(amount, share) - share * (1 + 1e-9)
        for until, units in self._held:
            if until > at and excess <= 0:
                break
            excess -= units  # expired by `at`, or must expire before this one starts
            at = max(at, until)
        return at

    def book_backlog(self, since: float, amount: float, until: float | None = None) -> None:
        """Count `amount` units already sent since `since` as if they had been paced
        (`until`: when the server's window they all landed in ends, if known)."""
        self.backlog_booked = True
        if self._share() is not None:
            self._hold(since, amount, until)
            return
        rate = self.rate
        if rate is not None:
            self._next_free = max(self._next_free, since + amount / rate)

    def commit(self, start: float, amount: float, until: float | None = None) -> None:
        """Book `amount` units starting at `start`: the next booking waits its turn.

        `until`: when the server's window holding `start` ends, if known; the units
        count until then, not for a whole interval."""
        if self._share() is not None:
            self._hold(start, amount, until)
            return
        rate = self.rate
        if rate is not None:
            self._next_free = max(self._next_free, start) + amount / rate

    @property
    def sends_shares(self) -> bool:
        """Whether a second's share may start at once (see the module's docstring)."""
        return self._share() is not None

    def _share(self) -> float | None:
        limit = self.known_limit
        if not self.share_s or limit is None or self.adaptive is not None:
            return None
        share = limit * self.share_s
        return share if share >= MIN_SHARE else None

    def _hold(self, start: float, amount: float, until: float | None = None) -> None:
        limit = self.known_limit
        assert limit is not None
        self._last_start = start = max(self._last_start, start)
        # Bookings only move forward in time: what has expired by this one is gone.
        held = self._held
        while held and held[0][0] <= start:
            self._held_units -= held.popleft()[1]
        if not held:
            self._held_units = 0.0
        units = min(amount, limit * self.share_s)
        # Kept in order of expiry. More than a whole share also keeps the next start back
        # until the limit has paid for it.
        bisect.insort(self._held, (min(until or math.inf, start + self.share_s), units))
        self._held_units += units
        if amount > units:
            self._blocked_until = max(self._blocked_until, start + amount / limit)


class ServerWindows:
    """Where the server's one-second enforcement windows end, from the resets it reports.

    A server reporting from such a window says how long the window had left when the
    request arrived, so send time plus reset is the window's end, early by the trip to
    the server (which the next send makes again); the latest of a window's reports is
    the closest. A bucket's time until full is not an edge: it is what is missing over
    the refill rate, and reports that read that way are left out.
    """

    def __init__(self) -> None:
        self.end: float | None = None
        self.reports = 0

    @property
    def confirmed(self) -> bool:
        return self.reports >= WINDOW_REPORTS

    def observe(
        self, sent_at: float, reset_s: float | None, remaining: float | None, limit: float | None
    ) -> None:
        if reset_s is None or not 0 < reset_s < SHARE_S or remaining is None or not limit:
            return
        time_to_full = max(0.0, limit - remaining) / (limit / 60.0)
        if abs(reset_s - time_to_full) < PHASE_TOLERANCE_S:
            return  # reads as a bucket refilling: no edge in it
        self.reports += 1
        end = sent_at + reset_s
        if self.end is None:
            self.end = end
        elif end - self.end >= SHARE_S / 2:  # a later window: keep the best phase seen
            self.end = max(end, self.end + round((end - self.end) / SHARE_S) * SHARE_S)
        else:
            self.end = max(self.end, end)

    def window_end(self, start: float) -> float | None:
        """When the server's window that a request sent at `start` lands in ends (a
        little after the edge, as it is seen early), if the edges are known."""
        edge = self._first_edge_after(start)
        return None if edge is None else edge + EDGE_AFTER_S

    def clear_of_edges(self, start: float) -> float:
        """`start`, or just after the next edge when `start` is too close before it."""
        edge = self._first_edge_after(start - EDGE_AFTER_S)
        if edge is not None and edge - EDGE_BEFORE_S <= start < edge + EDGE_AFTER_S:
            return edge + EDGE_AFTER_S
        return start

    def _first_edge_after(self, time: float) -> float | None:
        if not self.confirmed or self.end is None:
            return None
        return self.end + (math.floor((time - self.end) / SHARE_S) + 1) * SHARE_S


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
            self.observe(answer.rate_limits, sent_at)
            if answer.usage is not None:
                self.learn_prompt_scale(request.prompt_estimate, answer.usage.prompt_tokens)
        elif answer is not None:
            self.observe(answer.rate_limits, sent_at)
            if isinstance(answer, RateLimited):
                self.rate_limited(answer.retry_after, sent_at=sent_at)

    @abstractmethod
    async def acquire(self, tokens: float) -> None: ...

    @abstractmethod
    def release(self, *, succeeded: bool) -> None: ...

    @abstractmethod
    def observe(self, info: RateLimitInfo | None, sent_at: float | None = None) -> None: ...

    @abstractmethod
    def rate_limited(self, retry_after: float | None, sent_at: float | None = None) -> None: ...

    @abstractmethod
    def learn_prompt_scale(self, estimated: int, actual: int) -> None: ...

    # What the run's heartbeat shows; a pacer that cannot tell says nothing.
    def pause_left(self) -> tuple[float, str]:
        """Seconds the whole pool stays paused, and why (0 when it is not paused)."""
        return 0.0, ""

    def learned_per_minute(self) -> dict[str, float]:
        """Limits per minute learned from the server's headers: `requests`, `tokens`."""
        return {}


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
        self.requests = Gate(requests_per_minute, share_s=SHARE_S)
        self.tokens = Gate(tokens_per_minute, share_s=SHARE_S)
        self.server_windows = ServerWindows()
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
        self._pause_why = ""
        self._window_grown_at = 0.0
        self._rate_grown_at = 0.0
        self._backed_off_at = -math.inf
        self._rate_step = 0.0
        # Send times, only to estimate the recent rate.
        self._sent_times: deque[float] = deque(maxlen=4096)
        self.prompt_scale = 1.0
        # Sent while no limit was known, booked once one is learned (see `_learn`).
        self._unpaced_since: float | None = None
        self._unpaced_last = 0.0
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
            self._unpaced_last = self._clock()
            self._unpaced_requests += 1
            self._unpaced_tokens += tokens
            return  # nothing to pace against (yet): no reservation needed
        try:
            await self._take_turn(tokens)
            self._sent_times.append(self._clock())
        except BaseException:
            self._give_slot()
            raise

    async def _take_turn(self, tokens: float) -> None:
        """Book this request's start, then sleep until it."""
        while True:
            now = self._clock()
            start = self._earliest(max(now, self._paused_until), tokens)
            if start - now > BOOKING_HORIZON_S and self._sends_shares:
                # Booked nearer the time, when the server's window edges may be known.
                await anyio.sleep(start - now - BOOKING_HORIZON_S)
                continue
            window_end = self.server_windows.window_end(start)
            self.requests.commit(start, 1, window_end)
            self.tokens.commit(start, tokens, window_end)
            if start > now:
                await anyio.sleep(start - now)
            # A 429 elsewhere may have paused the pool while this one slept.
            if self._clock() >= self._paused_until:
                return

    def _earliest(self, at: float, tokens: float) -> float:
        """The earliest time from `at` both gates let this request start."""
        while True:
            start = self._clear_of_edges(
                self.tokens.earliest(self.requests.earliest(at, 1), tokens)
            )
            if start == at:
                return start
            at = start

    @property
    def _sends_shares(self) -> bool:
        return self.requests.sends_shares or self.tokens.sends_shares

    def _clear_of_edges(self, start: float) -> float:
        return self.server_windows.clear_of_edges(start) if self._sends_shares else start

    def release(self, *, succeeded: bool) -> None:
        """Give the slot back; successes open the window wider, as TCP does."""
        if succeeded:
            self._grow()
        self._give_slot()

    # -- what the server said ----------------------------------------------------------

    def observe(self, info: RateLimitInfo | None, sent_at: float | None = None) -> None:
        """Learn limits from headers; wait when the server's bucket lacks this request's units.

        `remaining` and `reset` describe a bucket refilling up to the limit: OpenAI's
        reset is the time until the limit "resets to its initial state", Anthropic's
        when it is "fully replenished". So the next request waits only until its own
        units have refilled, never until the bucket is full. Servers that report from a
        short enforcement window (remaining near 0, reset in milliseconds) then cost
        nothing, as they should: that is their steady state. Their resets also tell
        where the windows end (`sent_at`: when the request was sent, loop clock).
        """
        if info is None:
            return
        if sent_at is not None and info.reset_to_the_ms:
            if info.reset_requests_s is not None:
                self.server_windows.observe(
                    sent_at, info.reset_requests_s, info.remaining_requests, info.limit_requests
                )
            else:
                self.server_windows.observe(
                    sent_at, info.reset_tokens_s, info.remaining_tokens, info.limit_tokens
                )
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
                self.pause(
                    min(wait, MAX_HEADER_PAUSE_S), "the server's headers say its budget is spent"
                )

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
            window_end = self.server_windows.window_end(self._unpaced_since)
            if window_end is not None and window_end - EDGE_AFTER_S <= self._unpaced_last:
                window_end = None  # they went out over more than one window
            gate.book_backlog(self._unpaced_since, unpaced, window_end)

    def rate_limited(self, retry_after: float | None, sent_at: float | None = None) -> None:
        """A 429: hold the whole pool as long as asked, and back off where no limit is known.

        Requests sent before the last back-off were part of the same overload: they extend
        the pause but do not shrink the window and rate again.
        """
        if retry_after is None:
            self.pause(1.0, "the server answered 429 (no retry-after)")
        else:
            self.pause(retry_after, f"the server asked (retry-after {retry_after:g})")
        self.requests.space_evenly()
        self.tokens.space_evenly()
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

    def pause(self, seconds: float, why: str = "") -> None:
        until = self._clock() + seconds
        if until > self._paused_until:
            self._paused_until, self._pause_why = until, why

    def pause_left(self) -> tuple[float, str]:
        return max(0.0, self._paused_until - self._clock()), self._pause_why

    def learned_per_minute(self) -> dict[str, float]:
        learned = {"requests": self.requests.learned, "tokens": self.tokens.learned}
        return {name: per_s * 60 for name, per_s in learned.items() if per_s is not None}

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
