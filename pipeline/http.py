"""The one shared HTTP client of a run.

httpx's API over an aiohttp transport: httpx's own connection pool costs 10-30x the
CPU of aiohttp at the tens to hundreds of requests a rate-limited job keeps in
flight (see docs/BENCHMARKS.md), and a batch job is CPU-bound on the client side
when the provider is fast.
"""

from __future__ import annotations

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

CONNECT_TIMEOUT_S = 10.0


class _Transport(AiohttpTransport):
    """Maps every aiohttp failure onto httpx's tree, so adapters catch one family."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except aiohttp.ClientError as exc:
            raise httpx.TransportError(f"{type(exc).__name__}: {exc}") from exc


def make_client(concurrency: int, timeout_s: float) -> httpx.AsyncClient:
    """A keep-alive pool sized to the number of requests in flight."""
    limits = httpx.Limits(
        max_connections=concurrency,
        max_keepalive_connections=concurrency,
        keepalive_expiry=30.0,
    )
    timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
    return httpx.AsyncClient(
        transport=_Transport(limits=limits),
        timeout=timeout,
        follow_redirects=False,
    )
