"""What every wire-protocol adapter is, and the registry that finds one by name.

An adapter turns a `ChatRequest` into one HTTP call and the answer into a
`Completion`, raising the most specific `ProviderError` on failure. Built-in
adapters register through `register` exactly as a plug-in would; the rest of the
package never names a concrete provider.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from pipeline.config import ProviderSettings
from pipeline.errors import SpecError
from pipeline.http import HttpClient
from pipeline.types import ChatRequest, Completion


class Provider(ABC):
    """One model endpoint speaking one wire protocol."""

    def __init__(self, settings: ProviderSettings, client: HttpClient) -> None:
        self.settings = settings
        self.client = client

    @abstractmethod
    async def complete(self, request: ChatRequest) -> Completion:
        """Send one request; return its completion or raise a `ProviderError`."""

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
