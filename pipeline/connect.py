"""The one place an HTTP client is opened and a provider adapter built on it: runs,
batch runs, shard workers, estimates and `models`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from pipeline.config import ProviderSettings
from pipeline.http import HttpClient
from pipeline.providers import Provider, create_provider


@dataclass(frozen=True)
class Connection:
    """A provider adapter and the HTTP client under it (batch APIs share the client)."""

    client: HttpClient
    provider: Provider


@asynccontextmanager
async def open_connection(
    settings: ProviderSettings, *, connections: int, timeout_s: float
) -> AsyncIterator[Connection]:
    """An HTTP client and the provider adapter for `settings` on it, closed on exit: the
    one place a client is opened (runs, batch runs, shard workers, estimates, `models`)."""
    async with HttpClient(connections, timeout_s) as client:
        yield Connection(client, create_provider(settings, client))


@asynccontextmanager
async def open_provider(
    settings: ProviderSettings, *, connections: int, timeout_s: float
) -> AsyncIterator[Provider]:
    """The provider adapter for `settings` on its own HTTP client, closed on exit."""
    async with open_connection(settings, connections=connections, timeout_s=timeout_s) as opened:
        yield opened.provider
