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
from dataclasses import dataclass

import anyio

from pipeline.types import RateLimitInfo

HEADROOM = 0.99  # pace 1% under a known limit: arrival jitter must not tip a window over
BACKOFF_FACTOR = 0.7
RECOVERY_PER_S = 0.02  # additive increase: +2% of the rate per second without a 429
LOW_REMAINING_FRACTION = 0.02
MAX_HEADER_PAUSE_S = 60.0


class Gate:
    """One paced dimension (requests or tokens), in units per second."""

    def __init__(self, per_minute: float | None) -> None:
        self.declared = per_minute / 60.0 if per_minute else None
        self.learned: float | None = None
        self.adaptive: float | None = None
        self._next_free = 0.0

    @property
    def rate(self) -> float | None:
        known = [r for r in (self.declared, self.learned) if r is not None]
        limit = min(known) * HEADROOM if known else None
        if self.adaptive is not None:
            return self.adaptive if limit is None else min(limit, self.adaptive)
        return limit

    @property
    def next_free(self) -> float:
        return self._next_free

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


class Pacer:
    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        *,
        max_concurrency: int,
        initial_concurrency: int | None = None,
    ) -> None:
        self.requests = Gate(requests_per_minute)
        self.tokens = Gate(tokens_per_minute)
        self.max_concurrency = max_concurrency
        window = initial_concurrency or max_concurrency
        self._slots = anyio.CapacityLimiter(window)
        self._slow_start = window < max_concurrency
        self._paused_until = 0.0
        self._window_grown_at = 0.0
        self._rate_grown_at = 0.0
        self._sent_times: list[float] = []
        self.prompt_scale = 1.0

    # -- before and after each attempt ------------------------------------------------

    async def acquire(self, tokens: float) -> None:
        """Wait for a free slot in the window, then for this request's turn."""
        await self._slots.acquire()
        try:
            while True:
                now = anyio.current_time()
                start = max(now, self._paused_until, self.requests.next_free, self.tokens.next_free)
                self.requests.commit(start, 1)
                self.tokens.commit(start, tokens)
                if start > now:
                    await anyio.sleep(start - now)
                # A 429 elsewhere may have paused the pool while this one slept.
                if anyio.current_time() >= self._paused_until:
                    break
            self._note_sent(anyio.current_time())
        except BaseException:
            self._slots.release()
            raise

    def release(self, *, succeeded: bool) -> None:
        """Give the slot back; successes open the window wider, as TCP does."""
        self._slots.release()
        if succeeded:
            self._grow()

    # -- what the server said ----------------------------------------------------------

    def observe(self, info: RateLimitInfo | None) -> None:
        """Learn limits from headers, and slow down before the budget runs out."""
        if info is None:
            return
        if info.limit_requests:
            self.requests.learned = info.limit_requests / 60.0
        if info.limit_tokens:
            self.tokens.learned = info.limit_tokens / 60.0
        for remaining, limit, reset in (
            (info.remaining_requests, info.limit_requests, info.reset_requests_s),
            (info.remaining_tokens, info.limit_tokens, info.reset_tokens_s),
        ):
            nearly_spent = (
                remaining is not None
                and limit
                and reset
                and remaining <= max(1.0, limit * LOW_REMAINING_FRACTION)
            )
            if nearly_spent:
                self.pause(min(float(reset), MAX_HEADER_PAUSE_S))  # type: ignore[arg-type]

    def rate_limited(self, retry_after: float | None) -> None:
        """A 429: hold the whole pool as long as asked, and back off where no limit is known."""
        self.pause(retry_after if retry_after is not None else 1.0)
        window = max(1, math.floor(self._slots.total_tokens * BACKOFF_FACTOR))
        self._slots.total_tokens = window
        self._slow_start = False
        if self.requests.declared is None and self.requests.learned is None:
            observed = self._recent_rate()
            current = self.requests.adaptive or observed
            if current:
                self.requests.adaptive = max(0.1, current * BACKOFF_FACTOR)
        self._window_grown_at = self._rate_grown_at = anyio.current_time()

    def pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, anyio.current_time() + seconds)

    def learn_prompt_scale(self, estimated: int, actual: int) -> None:
        """Correct the offline prompt estimate from the usage that came back."""
        if estimated > 0 and actual > 0:
            self.prompt_scale += 0.1 * (actual / estimated - self.prompt_scale)

    def state(self) -> PacerState:
        paused = max(0.0, self._paused_until - anyio.current_time())
        return PacerState(
            self.requests.rate, self.tokens.rate, int(self._slots.total_tokens), paused
        )

    # -- internals ----------------------------------------------------------------------

    def _grow(self) -> None:
        now = anyio.current_time()
        window = int(self._slots.total_tokens)
        if window < self.max_concurrency and (
            self._slow_start or now - self._window_grown_at >= 1.0
        ):
            self._slots.total_tokens = window + 1
            self._window_grown_at = now
        adaptive = self.requests.adaptive
        if adaptive is not None and (elapsed := now - self._rate_grown_at) >= 1.0:
            self.requests.adaptive = adaptive * (1 + RECOVERY_PER_S * elapsed)
            self._rate_grown_at = now

    def _note_sent(self, now: float) -> None:
        times = self._sent_times
        times.append(now)
        if len(times) > 4096:
            del times[:2048]

    def _recent_rate(self) -> float | None:
        now = anyio.current_time()
        recent = [t for t in self._sent_times if now - t <= 2.0]
        if len(recent) < 2:
            return None
        return len(recent) / max(now - recent[0], 0.05)
