"""The one shared HTTP client of a run, and the boundary where transport failures
become `TransportError`.

It is aiohttp's client session behind a one-method interface. httpx was measured
first (see docs/BENCHMARKS.md): its request and response models alone cost about
0.65 CPU seconds per 1,000 completions even over an aiohttp transport, more than
the whole budget of this program, while aiohttp's keep-alive pool costs about 0.1.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from pipeline.errors import TransportError

CONNECT_TIMEOUT_S = 10.0
KEEPALIVE_S = 30.0


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: Mapping[str, str]  # case-insensitive
    content: bytes


class HttpStream:
    """An answer being received: status and headers now, the body line by line."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers
        self._response = response

    async def read(self) -> bytes:
        return await self._response.read()

    async def lines(self) -> AsyncIterator[bytes]:
        async for line in self._response.content:
            yield line


class HttpClient:
    """A keep-alive pool sized to the requests in flight; every call has a deadline."""

    def __init__(self, max_connections: int, timeout_s: float) -> None:
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self.max_connections, keepalive_timeout=KEEPALIVE_S, enable_cleanup_closed=True
        )
        timeout = aiohttp.ClientTimeout(
            total=self.timeout_s, sock_connect=min(CONNECT_TIMEOUT_S, self.timeout_s)
        )
        return aiohttp.ClientSession(connector=connector, timeout=timeout)

    async def request(
        self, method: str, url: str, *, body: bytes | None = None, headers: Mapping[str, str]
    ) -> HttpResponse:
        session = self._session or self._start()
        try:
            async with session.request(method, url, data=body, headers=headers) as response:
                content = await response.read()
                return HttpResponse(response.status, response.headers, content)
        except TimeoutError:
            raise TransportError(f"no answer within {self.timeout_s:g}s") from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            detail = str(exc) or type(exc).__name__
            raise TransportError(f"connection failed: {type(exc).__name__}: {detail}") from None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> HttpResponse:
        return await self.request("POST", url, body=body, headers=headers)

    @asynccontextmanager
    async def stream(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> AsyncIterator[HttpStream]:
        """POST and read the answer as it arrives (server-sent events)."""
        session = self._session or self._start()
        try:
            async with session.post(url, data=body, headers=headers) as response:
                yield HttpStream(response)
        except TimeoutError:
            raise TransportError(f"no answer within {self.timeout_s:g}s") from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            detail = str(exc) or type(exc).__name__
            raise TransportError(f"connection failed: {type(exc).__name__}: {detail}") from None

    async def upload(
        self,
        url: str,
        path: Path,
        *,
        fields: Mapping[str, str],
        file_field: str,
        headers: Mapping[str, str],
    ) -> HttpResponse:
        """POST a multipart form with the file at `path`, streamed from disk."""
        session = self._session or self._start()
        with path.open("rb") as handle:
            form = aiohttp.FormData()
            for name, value in fields.items():
                form.add_field(name, value)
            form.add_field(file_field, handle, filename=path.name, content_type="application/jsonl")
            return await self._send(session.post(url, data=form, headers=headers))

    async def post_file(self, url: str, path: Path, headers: Mapping[str, str]) -> HttpResponse:
        """POST the file at `path` as the body, streamed from disk."""
        session = self._session or self._start()
        with path.open("rb") as handle:
            return await self._send(session.post(url, data=handle, headers=headers))

    async def _send(self, pending: Any) -> HttpResponse:
        try:
            async with pending as response:
                content = await response.read()
                return HttpResponse(response.status, response.headers, content)
        except TimeoutError:
            raise TransportError(f"no answer within {self.timeout_s:g}s") from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            detail = str(exc) or type(exc).__name__
            raise TransportError(f"connection failed: {type(exc).__name__}: {detail}") from None

    @asynccontextmanager
    async def get_stream(self, url: str, headers: Mapping[str, str]) -> AsyncIterator[HttpStream]:
        """GET and read the answer as it arrives (a large download, line by line)."""
        session = self._session or self._start()
        try:
            async with session.get(url, headers=headers) as response:
                yield HttpStream(response)
        except TimeoutError:
            raise TransportError(f"no answer within {self.timeout_s:g}s") from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            detail = str(exc) or type(exc).__name__
            raise TransportError(f"connection failed: {type(exc).__name__}: {detail}") from None

    def _start(self) -> aiohttp.ClientSession:
        self._session = self._open()
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
