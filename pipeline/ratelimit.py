"""Pacing one process: the turns an attempt waits for, and the pacers that give them.

An attempt needs two calls from a pacer (`Turns`): a turn before it is sent, and an
account of the answer after. `Pacer` gives them in one process: it owns the run's
`PacingPolicy` (`pacing.py`: limits, shares, window edges, back-off, growth) on the
event loop's clock, keeps requests in flight within the policy's concurrency window,
and sleeps until the turn the policy booked; nothing polls. A cluster worker's
`LeasedPacer` (`cluster/limiter.py`) gives the same calls with turns leased from the
one policy the cluster's limiter owns.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import anyio

from pipeline.errors import ProviderError, RateLimited
from pipeline.pacing import Gate, PacingPolicy, ServerWindows
from pipeline.types import ChatRequest, Completion, RateLimitInfo


class Turns(Protocol):
    """What an attempt and the scheduler need from a pacer, local or leased."""

    @property
    def max_concurrency(self) -> int:
        """The hard cap on this pacer's requests in flight."""
        ...

    @property
    def in_flight(self) -> int: ...

    async def take_turn(self, request: ChatRequest) -> float:
        """Wait for a slot and this request's paced turn; returns the start time (loop clock)."""
        ...

    def end_turn(
        self, request: ChatRequest, sent_at: float, answer: Completion | ProviderError | None
    ) -> None:
        """Give the slot back and learn from the answer (None: the attempt never finished)."""
        ...

    def recent_rate(self) -> float:
        """Requests sent per second lately."""
        ...

    def pause_left(self) -> tuple[float, str]:
        """Seconds the whole pool stays paused, and why (0 when it is not paused)."""
        ...

    def learned_per_minute(self) -> dict[str, float]:
        """Limits per minute learned from the server's headers: `requests`, `tokens`."""
        ...


@dataclass
class PacerState:
    requests_per_s: float | None
    tokens_per_s: float | None
    window: int
    paused_s: float


class Slots:
    """Requests in flight, at most `size()` at once, granted in the order asked."""

    def __init__(self, size: Callable[[], int]) -> None:
        self.size = size
        self.in_flight = 0
        self._waiters: deque[anyio.Event] = deque()

    async def take(self) -> None:
        if self.in_flight < self.size() and not self._waiters:
            self.in_flight += 1
            return
        granted = anyio.Event()
        self._waiters.append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self.give()
            else:
                self._waiters.remove(granted)
            raise

    def give(self) -> None:
        self.in_flight -= 1
        self.wake()

    def wake(self) -> None:
        """Hand free slots to the waiters (after a slot came back or the size grew)."""
        while self._waiters and self.in_flight < self.size():
            self.in_flight += 1
            self._waiters.popleft().set()


class PacerBase(ABC):
    """`Turns` built on a pacer's primitives (`acquire`, `release`, `observe`,
    `rate_limited`, `learn_prompt_scale`), so a pacer that paces differently (a
    cluster worker's, paced by leases) offers the attempt the same two calls."""

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
        return 0.0, ""

    def learned_per_minute(self) -> dict[str, float]:
        return {}


class Pacer(PacerBase):
    """One process's pacer, shared by every worker of the pool."""

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
        self.policy = PacingPolicy(
            requests_per_minute,
            tokens_per_minute,
            max_concurrency=max_concurrency,
            initial_concurrency=initial_concurrency,
        )
        self._slots = Slots(lambda: self.policy.window.size)
        self.prompt_scale = 1.0

    @property
    def requests(self) -> Gate:
        return self.policy.requests

    @property
    def tokens(self) -> Gate:
        return self.policy.tokens

    @property
    def server_windows(self) -> ServerWindows:
        return self.policy.server_windows

    @property
    def window(self) -> int:
        return self.policy.window.size

    @property
    def max_concurrency(self) -> int:
        return self.policy.window.cap

    @property
    def in_flight(self) -> int:
        return self._slots.in_flight

    # -- the pacing primitives -----------------------------------------------------------

    async def acquire(self, tokens: float) -> None:
        """Wait for a free slot in the window, then for this request's turn."""
        await self._slots.take()
        try:
            await self._take_turn(tokens)
        except BaseException:
            self._slots.give()
            raise

    async def _take_turn(self, tokens: float) -> None:
        """Have the policy book this request's start, then sleep until it."""
        policy = self.policy
        while True:
            now = self._clock()
            turn = policy.take_turn(now, tokens)
            if turn.at > now:
                await anyio.sleep(turn.at - now)
            # A 429 elsewhere may have paused the pool while this one slept.
            if turn.booked and self._clock() >= policy.paused_until:
                policy.started(self._clock())
                return

    def release(self, *, succeeded: bool) -> None:
        """Give the slot back; successes open the window wider, as TCP does."""
        if succeeded:
            self.policy.succeeded(self._clock())
        self._slots.give()

    # -- what the server said ----------------------------------------------------------

    def observe(self, info: RateLimitInfo | None, sent_at: float | None = None) -> None:
        """What the server's headers say (see `PacingPolicy.observe`; `sent_at`: when the
        request was sent, loop clock)."""
        if info is None:
            return
        self.policy.observe(info, self._clock(), sent_at)
        self._slots.wake()  # a learned rate opens a probing window

    def rate_limited(self, retry_after: float | None, sent_at: float | None = None) -> None:
        """A 429 (see `PacingPolicy.rate_limited`)."""
        self.policy.rate_limited(retry_after, self._clock(), sent_at)

    def pause(self, seconds: float, why: str = "") -> None:
        self.policy.pause(self._clock() + seconds, why)

    def pause_left(self) -> tuple[float, str]:
        """Seconds the whole pool stays paused, and why (0 when it is not paused)."""
        policy = self.policy
        return max(0.0, policy.paused_until - self._clock()), policy.pause_why

    def learned_per_minute(self) -> dict[str, float]:
        return self.policy.learned_per_minute()

    def learn_prompt_scale(self, estimated: int, actual: int) -> None:
        """Correct the offline prompt estimate from the usage that came back."""
        if estimated > 0 and actual > 0:
            self.prompt_scale += 0.1 * (actual / estimated - self.prompt_scale)

    def state(self) -> PacerState:
        policy = self.policy
        paused = max(0.0, policy.paused_until - self._clock())
        return PacerState(policy.requests.rate, policy.tokens.rate, policy.window.size, paused)

    def recent_rate(self) -> float:
        """Requests sent per second over the last two seconds."""
        return self.policy.recent_rate(self._clock()) or 0.0


class SharedPacers:
    """One pacer per provider account and model for runs that send at the same time
    from one event loop (the steps of a job streaming rows to each other): the
    provider's limits hold for all of them together, not for each. A run that finds
    its pacer here also keeps what an earlier run learned (limits, concurrency)."""

    def __init__(self) -> None:
        self._pacers: dict[tuple[object, ...], Pacer] = {}

    def pacer_for(self, key: tuple[object, ...], make: Callable[[], Pacer]) -> Pacer:
        if key not in self._pacers:
            self._pacers[key] = make()
        return self._pacers[key]
