"""What every wire-protocol adapter is, and the registry that finds one by name.

An adapter turns a `ChatRequest` into one HTTP call and the answer into a
`Completion`, raising the most specific `ProviderError` on failure. Built-in
adapters register through `register` exactly as a plug-in would; the rest of the
package never names a concrete provider.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson

from pipeline.config import ProviderSettings
from pipeline.errors import SpecError
from pipeline.http import HttpClient, HttpResponse
from pipeline.providers import sse
from pipeline.providers.classify import classify, classify_error_in_body, has_error
from pipeline.providers.headers import parse_rate_limits
from pipeline.providers.shapes import malformed
from pipeline.types import ChatRequest, Completion, Message


class Provider(ABC):
    """One model endpoint speaking one wire protocol."""

    url: str
    headers: dict[str, str]

    def __init__(self, settings: ProviderSettings, client: HttpClient) -> None:
        self.settings = settings
        self.client = client

    @abstractmethod
    def parse(self, response: HttpResponse) -> Completion:
        """One whole answer (status, headers, body) as a completion, or its error."""

    @abstractmethod
    async def _assemble(
        self, lines: AsyncIterator[bytes], headers: Mapping[str, str]
    ) -> Completion:
        """The events of a streamed answer joined into the completion a plain call gives."""

    async def _stream(self, body: bytes) -> Completion:
        async with self.client.stream(self.url, body, self.headers) as response:
            if response.status >= 400 or not sse.is_event_stream(response.headers):
                # An error, or a server that answered with the plain body: read it as one.
                content = await response.read()
                if response.status < 400 and sse.looks_like_events(content):
                    return await self._assemble(sse.lines_of(content), response.headers)
                return self.parse(HttpResponse(response.status, response.headers, content))
            return await self._assemble(response.lines(), response.headers)

    def _answer_object(self, payload: Any, response: HttpResponse) -> dict[str, Any]:
        """A successful answer's body as a JSON object, or the error a gateway put in it."""
        if not isinstance(payload, dict):
            raise malformed(
                "response body is not a JSON object",
                response.content,
                self.redact,
                status=response.status,
                headers=response.headers,
            )
        if has_error(payload):
            error = classify_error_in_body(payload, response.headers, self.redact)
            error.rate_limits = parse_rate_limits(response.headers)
            raise error
        return payload

    @abstractmethod
    async def complete(self, request: ChatRequest) -> Completion:
        """Send one request; return its completion or raise a `ProviderError`."""

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        """The JSON body `complete` would send for this request (batch APIs send it later)."""
        raise SpecError(f"provider '{self.settings.name}' cannot build request bodies")

    def parse_body(self, status: int, body: Any) -> Completion:
        """The completion in an answer body received elsewhere (a batch result line), or
        the classified `ProviderError` it describes."""
        raise SpecError(f"provider '{self.settings.name}' cannot parse answer bodies")

    async def count_tokens(self, messages: list[Message]) -> int | None:
        """The provider's own prompt token count, where it has an endpoint for it."""
        return None

    async def list_models(self) -> list[str]:
        """The model ids the endpoint serves."""
        raise SpecError(f"provider '{self.settings.name}' cannot list its models")

    async def _get_json(self, url: str, headers: dict[str, str]) -> Any:
        response = await self.client.request("GET", url, headers=headers)
        return self._json_or_raise(response)

    async def _post_json(self, url: str, body: Any, headers: dict[str, str]) -> Any:
        response = await self.client.post(url, orjson.dumps(body), headers)
        return self._json_or_raise(response)

    def _json_or_raise(self, response: HttpResponse) -> Any:
        try:
            payload = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            payload = None
        if response.status >= 400 or payload is None:
            raise classify(response.status, payload, response.headers, self.redact)
        return payload

    def redact(self, text: str) -> str:
        """Remove the API key from text that may echo the request."""
        key = self.settings.api_key
        return text.replace(key, "***") if key else text


ProviderFactory = Callable[[ProviderSettings, HttpClient], Provider]
_REGISTRY: dict[str, ProviderFactory] = {}


def register(protocol: str) -> Callable[[ProviderFactory], ProviderFactory]:
    def add(factory: ProviderFactory) -> ProviderFactory:
        _REGISTRY[protocol] = factory
        return factory

    return add


def create_provider(settings: ProviderSettings, client: HttpClient) -> Provider:
    protocol = settings.preset.protocol
    factory = _REGISTRY.get(protocol)
    if factory is None:
        known = ", ".join(sorted(_REGISTRY))
        raise SpecError(f"provider '{settings.name}': unknown protocol '{protocol}' ({known})")
    return factory(settings, client)
