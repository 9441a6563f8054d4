"""Pacing: requests and tokens per minute, spread smoothly, plus a pool-wide pause.

Every worker awaits `Pacer.acquire` before each attempt; nothing polls. The leaky
buckets (aiolimiter) hold at most about a second's share, so a job never opens
with a minute's worth of requests in its first second.
"""

from __future__ import annotations

import anyio
from aiolimiter import AsyncLimiter


def _bucket(per_minute: float) -> AsyncLimiter:
    # A one-second bucket; for rates under one a second, a bucket of exactly one unit.
    period = max(1.0, 60.0 / per_minute)
    return AsyncLimiter(per_minute * period / 60.0, period)


class Pacer:
    """Shared by every worker of a run."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None) -> None:
        self._requests = _bucket(requests_per_minute) if requests_per_minute else None
        self._tokens = _bucket(tokens_per_minute) if tokens_per_minute else None
        self._paused_until = 0.0

    async def acquire(self, tokens: int) -> None:
        """Wait until one more request of about `tokens` tokens may be sent."""
        await self._wait_out_pause()
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens is not None:
            # A request larger than the bucket still goes, taking the whole bucket.
            await self._tokens.acquire(min(float(tokens), self._tokens.max_rate))

    def pause(self, seconds: float) -> None:
        """Hold every worker for `seconds` (a server asked the whole client to wait)."""
        self._paused_until = max(self._paused_until, anyio.current_time() + seconds)

    async def _wait_out_pause(self) -> None:
        # A timed wait, not a poll: a pause extended meanwhile just means one more wait.
        while (remaining := self._paused_until - anyio.current_time()) > 0:  # noqa: ASYNC110
            await anyio.sleep(remaining)
