"""The pacing policy: how fast a run may ask the provider, on its owner's clock.

Before each attempt a start time is booked for one request and its token estimate
(`PacingPolicy.take_turn`); the owner (one process's `Pacer`, or the cluster's
limiter actor for all its workers) has the request sent then.

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
for requests in flight, under the job's hard cap (`ConcurrencyWindow`).

Nothing here reads a clock, sleeps or awaits: every method is given the time.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.types import RateLimitInfo

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

    @property
    def share_units(self) -> float | None:
        """The units a share holds, when shares are sent."""
        return self._share()

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


def recent_rate(starts: Iterable[float], now: float) -> float | None:
    """Starts per second over the two seconds before `now` (None: fewer than two)."""
    recent = [t for t in starts if 0.0 <= now - t <= 2.0]
    if len(recent) < 2:
        return None
    return (len(recent) - 1) / max(max(recent) - min(recent), 0.05)


class ConcurrencyWindow:
    """How many requests may be in flight: grown as TCP grows its window, under a cap.

    Slow start (one more for each success) while probing a server whose limits are
    unknown, then one more a second of successes, none while the pool is paused; a 429
    leaves `BACKOFF_FACTOR` of it.
    """

    def __init__(self, cap: int, initial: int) -> None:
        self.cap = cap
        self.size = min(initial, cap)
        self.slow_start = self.size < cap
        self.grown_at = 0.0

    def grow(self, now: float, paused_until: float) -> None:
        """One success at `now`: time spent paused at the server's request is not
        evidence of spare capacity."""
        if self.size >= self.cap:
            return
        if self.slow_start or now - max(self.grown_at, paused_until) >= 1.0:
            self.size += 1
            self.grown_at = now

    def open(self) -> None:
        """A rate paces the pool now: the window need not probe further."""
        self.size = self.cap
        self.slow_start = False

    def back_off(self, now: float) -> None:
        self.size = max(1, math.floor(self.size * BACKOFF_FACTOR))
        self.slow_start = False
        self.grown_at = now


@dataclass(frozen=True, slots=True)
class Turn:
    """A request's start time, or (`booked` False) when to ask again for one."""

    at: float
    booked: bool
    count: int = 1  # requests booked at `at` (`PacingPolicy.take_turns`)


@dataclass
class _Unpaced:
    """What went out while no limit was known (see `PacingPolicy._learn`)."""

    since: float | None = None
    last: float = 0.0
    requests: float = 0.0
    tokens: float = 0.0

    def add(self, now: float, tokens: float, count: int = 1) -> None:
        if self.since is None:
            self.since = now
        self.last = now
        self.requests += count
        self.tokens += tokens * count


class PacingPolicy:
    """The whole pacing policy of one run, on its owner's clock.

    Every method that needs the time is given it (`now`, `sent_at`), and nothing here
    sleeps, awaits or knows about processes: the local `Pacer` owns one and sleeps
    until the turns it books, the cluster's limiter actor owns one and hands the turns
    it books to its workers as leases. So a cluster paces as one process does: the
    same shares, window edges, 429 fallback, back-off and growth.
    """

    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        *,
        max_concurrency: int,
        initial_concurrency: int | None = None,
    ) -> None:
        self.requests = Gate(requests_per_minute, share_s=SHARE_S)
        self.tokens = Gate(tokens_per_minute, share_s=SHARE_S)
        self.server_windows = ServerWindows()
        initial = initial_concurrency or max_concurrency
        if requests_per_minute is None and tokens_per_minute is None:
            # Nothing says how fast the server may be asked: probe with a few requests
            # first; the first answer's headers (or slow start) open the window.
            initial = min(initial, PROBE_WINDOW)
        self.window = ConcurrencyWindow(max_concurrency, initial)
        self.paused_until = 0.0
        self.pause_why = ""  # what the pool is paused for, for the operator
        self._backed_off_at = -math.inf
        self._rate_grown_at = 0.0
        self._rate_step = 0.0
        self._started: deque[float] = deque(maxlen=4096)  # only for the recent rate
        self._unpaced = _Unpaced()
        self._last_tokens = 1.0

    # -- turns ----------------------------------------------------------------------------

    @property
    def paces(self) -> bool:
        """Whether turns are booked: a rate is known, or the server has paused the pool."""
        return bool(self.requests.rate or self.tokens.rate or self.paused_until)

    @property
    def sends_shares(self) -> bool:
        return self.requests.sends_shares or self.tokens.sends_shares

    def take_turn(self, now: float, tokens: float) -> Turn:
        """Book the start of a request of `tokens` asked for at `now`.

        Unbooked when the start is more than `BOOKING_HORIZON_S` ahead and shares are
        sent: it is booked nearer the time, when the server's window edges may be known.
        """
        return self.take_turns(now, tokens, 1)

    def take_turns(self, now: float, tokens: float, most: int) -> Turn:
        """Book up to `most` requests of `tokens` each at the start `take_turn` would give
        the first: as many as there is room for at that start (`Turn.count`), so booking
        them together is booking them one by one, in one step. Evenly spaced requests
        get one each."""
        self._last_tokens = max(1.0, tokens)
        if not self.paces:
            self._unpaced.add(now, tokens, most)
            return Turn(now, booked=True, count=most)  # nothing to pace against (yet)
        start = self.next_start(now, tokens)
        if start - now > BOOKING_HORIZON_S and self.sends_shares:
            return Turn(start - BOOKING_HORIZON_S, booked=False, count=0)
        count = self._room_at(start, tokens, most)
        window_end = self.server_windows.window_end(start)
        self.requests.commit(start, count, window_end)
        self.tokens.commit(start, count * tokens, window_end)
        return Turn(start, booked=True, count=count)

    def next_start(self, now: float, tokens: float) -> float:
        """The earliest time from `now` both gates, the pause and the window edges let a
        request of `tokens` start (nothing booked)."""
        at = max(now, self.paused_until)
        while True:
            start = self._clear_of_edges(
                self.tokens.earliest(self.requests.earliest(at, 1), tokens)
            )
            if start == at:
                return start
            at = start

    def started(self, at: float, count: int = 1) -> None:
        """`count` requests started at `at` (for the recent rate)."""
        self._started.extend([at] * count)

    def spend_more_tokens(self, now: float, tokens: float) -> None:
        """Tokens used beyond what the turns booked: later turns wait for them."""
        if tokens > 0 and self.tokens.rate:
            self.tokens.commit(now, tokens)

    def recent_rate(self, now: float) -> float | None:
        """Requests started per second over the two seconds before `now`."""
        return recent_rate(self._started, now)

    # -- what the server said -----------------------------------------------------------

    def observe(self, info: RateLimitInfo, now: float, sent_at: float | None = None) -> None:
        """Learn limits from headers; wait when the server's bucket lacks this request's units.

        `remaining` and `reset` describe a bucket refilling up to the limit: OpenAI's
        reset is the time until the limit "resets to its initial state", Anthropic's
        when it is "fully replenished". So the next request waits only until its own
        units have refilled, never until the bucket is full. Servers that report from a
        short enforcement window (remaining near 0, reset in milliseconds) then cost
        nothing, as they should: that is their steady state. Their resets also tell
        where the windows end (`sent_at`: when the request was sent; `now`: when its
        answer came).
        """
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
            self._learn(self.requests, info.limit_requests, self._unpaced.requests)
        if info.limit_tokens:
            self._learn(self.tokens, info.limit_tokens, self._unpaced.tokens)
        for remaining, limit, reset, needed in (
            (info.remaining_requests, info.limit_requests, info.reset_requests_s, 1.0),
            (info.remaining_tokens, info.limit_tokens, info.reset_tokens_s, self._last_tokens),
        ):
            wait = refill_wait(remaining, limit, reset, needed)
            if wait > 0:
                self.pause(
                    now + min(wait, MAX_HEADER_PAUSE_S),
                    "the server's headers say its budget is spent",
                )

    def _learn(self, gate: Gate, per_minute: float, unpaced: float) -> None:
        first = gate.rate is None and not gate.backlog_booked
        gate.learned = per_minute / 60.0
        if first and self.window.slow_start:
            self.window.open()
        since = self._unpaced.since
        if first and unpaced and since is not None:
            # What went out before any limit was known counts against the same window:
            # book it (once), so a fixed-window limiter is not overrun at the end of the
            # first one.
            window_end = self.server_windows.window_end(since)
            if window_end is not None and window_end - EDGE_AFTER_S <= self._unpaced.last:
                window_end = None  # they went out over more than one window
            gate.book_backlog(since, unpaced, window_end)

    def rate_limited(
        self, retry_after: float | None, now: float, sent_at: float | None = None
    ) -> None:
        """A 429: hold the whole pool as long as asked, and back off where no limit is known.

        Requests sent before the last back-off were part of the same overload: they extend
        the pause but do not shrink the window and rate again.
        """
        if retry_after is None:
            self.pause(now + 1.0, "the server answered 429 (no retry-after)")
        else:
            self.pause(now + retry_after, f"the server asked (retry-after {retry_after:g})")
        self.requests.space_evenly()
        self.tokens.space_evenly()
        if sent_at is not None and sent_at < self._backed_off_at:
            return
        self._backed_off_at = now
        self.window.back_off(now)
        if self.requests.declared is None and self.requests.learned is None:
            current = self.requests.adaptive or self.recent_rate(now)
            if current:
                self.requests.adaptive = max(0.1, current * BACKOFF_FACTOR)
                self._rate_step = self.requests.adaptive * RECOVERY_PER_S
        self._rate_grown_at = now

    def pause(self, until: float, why: str = "") -> None:
        if until > self.paused_until:
            self.paused_until, self.pause_why = until, why

    def learned_per_minute(self) -> dict[str, float]:
        """Limits per minute learned from the server's headers: `requests`, `tokens`."""
        learned = {"requests": self.requests.learned, "tokens": self.tokens.learned}
        return {name: per_s * 60 for name, per_s in learned.items() if per_s is not None}

    def succeeded(self, now: float) -> None:
        """A success at `now`: the window opens wider, a backed-off rate creeps back."""
        self.window.grow(now, self.paused_until)
        adaptive = self.requests.adaptive
        elapsed = now - max(self._rate_grown_at, self.paused_until)
        if adaptive is not None and elapsed >= 1.0:
            # Additive increase: a fixed step a second, a few seconds' worth at most.
            self.requests.adaptive = adaptive + self._rate_step * min(elapsed, 3.0)
            self._rate_grown_at = now

    # -- internals ------------------------------------------------------------------------

    def _room_at(self, start: float, tokens: float, most: int) -> int:
        """How many of `most` requests of `tokens` may start at `start`, where `next_start`
        found room for one: within what is left of each gate's share there."""
        gates = (self.requests, self.tokens)
        if most <= 1 or any(g.rate is not None and g.share_units is None for g in gates):
            return 1  # evenly spaced: one request a start
        for gate, each in ((self.requests, 1.0), (self.tokens, tokens)):
            share = gate.share_units
            if share is not None:
                most = min(most, max(1, math.floor(share * (1 + 1e-9) / max(each, 1e-9))))

        def fits(count: int) -> bool:
            return (
                self.requests.earliest(start, count) <= start
                and self.tokens.earliest(start, count * tokens) <= start
            )

        low, high = 1, most  # fits(low) holds; find the largest that does
        while low < high:
            middle = (low + high + 1) // 2
            if fits(middle):
                low = middle
            else:
                high = middle - 1
        return low

    def _clear_of_edges(self, start: float) -> float:
        return self.server_windows.clear_of_edges(start) if self.sends_shares else start
