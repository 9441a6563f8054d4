"""The two batch wire protocols: OpenAI-style Files + Batches (OpenAI, xAI, the
simulator) and Anthropic Message Batches.

Each turns a request body into one line of the request file, uploads and creates
a batch, reads its state into a `BatchState`, finds an orphan batch by metadata
where the API has metadata, and streams the results back as `(custom_id, status,
body)` triples: status 200 with the answer body, or the error status with the
error body, or `expired` / `canceled` for requests that never ran.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline import errors
from pipeline.config import ProviderSettings
from pipeline.http import HttpClient, HttpResponse
from pipeline.providers.anthropic import API_VERSION, messages_url
from pipeline.providers.classify import classify

CHAT_ENDPOINT = "/v1/chat/completions"
LIST_PAGE = 100
# Anthropic reports errored results by type only; these are the statuses they stand for.
ANTHROPIC_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
EXPIRED, CANCELED = "expired", "canceled"


@dataclass
class BatchState:
    """A batch as the provider last described it, in terms common to both APIs."""

    batch_id: str
    status: str  # the provider's own word
    ended: bool
    total: int = 0
    done: int = 0
    failed: int = 0
    rejected: bool = False  # failed validation: nothing ran
    errors: list[dict[str, Any]] = field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    results_url: str | None = None
    metadata: dict[str, Any] | None = None
    created_at: float | None = None


@dataclass(frozen=True)
class ResultLine:
    custom_id: str
    status: int | str  # HTTP status of the answer, or EXPIRED / CANCELED
    body: Any


class BatchApi(ABC):
    """One provider's batch endpoints."""

    max_requests: int
    max_bytes: int
    has_metadata: bool
    uploads_file: bool
    file_head = b""
    file_tail = b""
    separator = b"\n"

    def __init__(self, settings: ProviderSettings, client: HttpClient, headers: dict[str, str]):
        if not settings.base_url:
            raise errors.SpecError(f"provider '{settings.name}' needs model.base_url")
        self.settings = settings
        self.client = client
        # The adapter's auth headers, without its JSON content type (uploads are multipart).
        self.headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        self.json_headers = {**self.headers, "content-type": "application/json"}

    @abstractmethod
    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        """One request as it goes into the request file."""

    async def upload(self, path: Path) -> str | None:
        """Upload the request file; its file id (None where the API takes no files)."""
        return None

    @abstractmethod
    async def create(self, path: Path, file_id: str | None, metadata: dict[str, str]) -> BatchState:
        """Create the batch."""

    @abstractmethod
    async def retrieve(self, batch_id: str) -> BatchState: ...

    @abstractmethod
    async def cancel(self, batch_id: str) -> BatchState: ...

    async def find(self, metadata: dict[str, str], since: float) -> BatchState | None:
        """A batch created since `since` whose metadata includes these pairs."""
        return None

    @abstractmethod
    def results(self, state: BatchState) -> AsyncIterator[ResultLine]:
        """Every result line of an ended batch, in any order."""

    def _check(self, response: HttpResponse) -> Any:
        try:
            payload = orjson.loads(response.content) if response.content else None
        except orjson.JSONDecodeError:
            payload = None
        if response.status >= 400 or not isinstance(payload, dict):
            raise classify(response.status, payload, response.headers, self._redact)
        return payload

    def _redact(self, text: str) -> str:
        key = self.settings.api_key
        return text.replace(key, "***") if key else text

    async def _lines(self, url: str) -> AsyncIterator[bytes]:
        async with self.client.get_stream(url, self.headers) as stream:
            if stream.status >= 400:
                self._check(HttpResponse(stream.status, stream.headers, await stream.read()))
            async for line in stream.lines():
                if line.strip():
                    yield line


class OpenAIBatches(BatchApi):
    """`/files` + `/batches` under the preset's base URL (OpenAI, xAI, the simulator)."""

    max_requests = 50_000
    max_bytes = 200 * 1024**2
    has_metadata = True
    uploads_file = True

    def __init__(self, settings: ProviderSettings, client: HttpClient, headers: dict[str, str]):
        super().__init__(settings, client, headers)
        self.base = (settings.base_url or "").rstrip("/")

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        item = {"custom_id": custom_id, "method": "POST", "url": CHAT_ENDPOINT, "body": body}
        return orjson.dumps(item)

    async def upload(self, path: Path) -> str | None:
        response = await self.client.upload(
            f"{self.base}/files",
            path,
            fields={"purpose": "batch"},
            file_field="file",
            headers=self.headers,
        )
        return str(self._check(response)["id"])

    async def create(self, path: Path, file_id: str | None, metadata: dict[str, str]) -> BatchState:
        body = {
            "input_file_id": file_id,
            "endpoint": CHAT_ENDPOINT,
            "completion_window": "24h",
            "metadata": metadata,
        }
        response = await self.client.post(
            f"{self.base}/batches", orjson.dumps(body), self.json_headers
        )
        return self._state(self._check(response))

    async def retrieve(self, batch_id: str) -> BatchState:
        response = await self.client.request(
            "GET", f"{self.base}/batches/{batch_id}", headers=self.headers
        )
        return self._state(self._check(response))

    async def cancel(self, batch_id: str) -> BatchState:
        response = await self.client.post(
            f"{self.base}/batches/{batch_id}/cancel", b"", self.json_headers
        )
        return self._state(self._check(response))

    async def find(self, metadata: dict[str, str], since: float) -> BatchState | None:
        after: str | None = None
        while True:
            query = f"?limit={LIST_PAGE}" + (f"&after={after}" if after else "")
            response = await self.client.request(
                "GET", f"{self.base}/batches{query}", headers=self.headers
            )
            page = self._check(response)
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            for raw in data:
                found = raw.get("metadata") or {}
                if all(found.get(k) == v for k, v in metadata.items()):
                    return self._state(raw)
            # Newest first: once a page reaches batches older than the chunk, stop.
            oldest = min((float(b.get("created_at") or 0) for b in data), default=0.0)
            if not page.get("has_more") or not data or oldest < since:
                return None
            after = str(data[-1].get("id"))

    @staticmethod
    def _state(raw: dict[str, Any]) -> BatchState:
        status = str(raw.get("status"))
        counts = raw.get("request_counts") or {}
        errors_block = raw.get("errors") or {}
        line_errors = errors_block.get("data") if isinstance(errors_block, dict) else None
        return BatchState(
            batch_id=str(raw.get("id")),
            status=status,
            ended=status in ("completed", "expired", "cancelled", "failed"),
            total=int(counts.get("total") or 0),
            done=int(counts.get("completed") or 0),
            failed=int(counts.get("failed") or 0),
            rejected=status == "failed",
            errors=[e for e in line_errors or [] if isinstance(e, dict)],
            output_file_id=raw.get("output_file_id"),
            error_file_id=raw.get("error_file_id"),
            metadata=raw.get("metadata"),
            created_at=raw.get("created_at"),
        )

    async def results(self, state: BatchState) -> AsyncIterator[ResultLine]:
        for file_id in (state.output_file_id, state.error_file_id):
            if not file_id:
                continue
            async for line in self._lines(f"{self.base}/files/{file_id}/content"):
                yield _openai_result(orjson.loads(line))


def _openai_result(item: dict[str, Any]) -> ResultLine:
    custom_id = str(item.get("custom_id"))
    response = item.get("response")
    if isinstance(response, dict) and response.get("status_code") is not None:
        return ResultLine(custom_id, int(response["status_code"]), response.get("body"))
    error = item.get("error") or {}
    code = str(error.get("code") or "") if isinstance(error, dict) else ""
    if code == "batch_expired":
        return ResultLine(custom_id, EXPIRED, error)
    if code == "batch_cancelled":
        return ResultLine(custom_id, CANCELED, error)
    return ResultLine(custom_id, 500, {"error": error or {"message": "no response"}})


class AnthropicBatches(BatchApi):
    """`POST /v1/messages/batches` with every request in the JSON body."""

    max_requests = 100_000
    max_bytes = 256 * 1024**2
    has_metadata = False
    uploads_file = False
    file_head = b'{"requests":['
    file_tail = b"]}"
    separator = b","

    def __init__(self, settings: ProviderSettings, client: HttpClient, headers: dict[str, str]):
        super().__init__(settings, client, headers)
        self.headers.setdefault("anthropic-version", API_VERSION)
        self.json_headers.setdefault("anthropic-version", API_VERSION)
        self.base = messages_url(settings.base_url or "") + "/batches"

    def line(self, custom_id: str, body: dict[str, Any]) -> bytes:
        return orjson.dumps({"custom_id": custom_id, "params": body})

    async def create(self, path: Path, file_id: str | None, metadata: dict[str, str]) -> BatchState:
        # The body was written to disk as it was planned; it is streamed from there.
        response = await self.client.post_file(self.base, path, self.json_headers)
        return self._state(self._check(response))

    async def retrieve(self, batch_id: str) -> BatchState:
        response = await self.client.request("GET", f"{self.base}/{batch_id}", headers=self.headers)
        return self._state(self._check(response))

    async def cancel(self, batch_id: str) -> BatchState:
        response = await self.client.post(f"{self.base}/{batch_id}/cancel", b"", self.json_headers)
        return self._state(self._check(response))

    @staticmethod
    def _state(raw: dict[str, Any]) -> BatchState:
        counts = raw.get("request_counts") or {}
        failed = sum(int(counts.get(k) or 0) for k in ("errored", "canceled", "expired"))
        done = int(counts.get("succeeded") or 0)
        return BatchState(
            batch_id=str(raw.get("id")),
            status=str(raw.get("processing_status")),
            ended=raw.get("processing_status") == "ended",
            total=done + failed + int(counts.get("processing") or 0),
            done=done,
            failed=failed,
            results_url=raw.get("results_url"),
        )

    async def results(self, state: BatchState) -> AsyncIterator[ResultLine]:
        url = state.results_url or f"{self.base}/{state.batch_id}/results"
        async for line in self._lines(url):
            item = orjson.loads(line)
            result = item.get("result") or {}
            kind = result.get("type")
            custom_id = str(item.get("custom_id"))
            if kind == "succeeded":
                yield ResultLine(custom_id, 200, result.get("message"))
            elif kind in (EXPIRED, CANCELED):
                yield ResultLine(custom_id, kind, result)
            else:
                body = result.get("error") or {}
                inner = body.get("error") if isinstance(body, dict) else None
                error_type = inner.get("type") if isinstance(inner, dict) else None
                yield ResultLine(custom_id, ANTHROPIC_ERROR_STATUS.get(str(error_type), 500), body)


def make_api(settings: ProviderSettings, client: HttpClient, headers: dict[str, str]) -> BatchApi:
    kind = settings.preset.batch_api
    if kind == "openai":
        return OpenAIBatches(settings, client, headers)
    if kind == "anthropic":
        return AnthropicBatches(settings, client, headers)
    raise errors.SpecError(f"model.batch: provider '{settings.name}' has no batch API")
