"""Any body, any shape, any content type: a classified result or error, never a crash.

Both adapters are fed generated JSON (hypothesis), plain and streamed, plus the
shapes gateways were seen to send. Whatever comes back is either a `Completion` or a
`ProviderError`; nothing else escapes, and the API key never shows in a message.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from pipeline import errors
from pipeline.config import resolve_provider
from pipeline.http import HttpClient, HttpResponse
from pipeline.providers.anthropic import AnthropicMessages
from pipeline.providers.base import Provider
from pipeline.providers.openai import OpenAIChat
from pipeline.spec import ModelSpec
from pipeline.types import ChatRequest, Completion

KEY = "sk-any-body-secret-4242"
REQUEST = ChatRequest(0, "r0", [{"role": "user", "content": "hi"}], "h", 5, 10)


class CannedStream:
    """One canned answer, as `HttpClient.stream` hands it over (a narrow unit edge)."""

    def __init__(self, status: int, headers: dict[str, str], content: bytes) -> None:
        self.status = status
        self.headers = CIMultiDict(headers)
        self._content = content

    async def read(self) -> bytes:
        return self._content

    async def lines(self) -> AsyncIterator[bytes]:
        for line in self._content.splitlines(keepends=True):
            yield line


class CannedClient(HttpClient):
    def __init__(self) -> None:
        super().__init__(1, 10)
        self.answer = CannedStream(200, {}, b"")

    async def post(self, url: str, body: bytes, headers: Any) -> HttpResponse:
        a = self.answer
        return HttpResponse(a.status, a.headers, a._content)

    @asynccontextmanager
    async def stream(self, url: str, body: bytes, headers: Any) -> AsyncIterator[Any]:
        yield self.answer


def make(kind: str, *, stream: bool) -> tuple[Provider, CannedClient]:
    protocol = {"openai": "openai", "anthropic": "anthropic"}[kind]
    spec = ModelSpec(
        provider=protocol,
        model="m",
        base_url="http://127.0.0.1:9/v1",
        api_key_env="ANY_BODY_KEY",
        stream=stream,
    )
    client = CannedClient()
    settings_ = resolve_provider(spec)
    provider: Provider = (
        OpenAIChat(settings_, client) if kind == "openai" else AnthropicMessages(settings_, client)
    )
    return provider, client


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANY_BODY_KEY", KEY)


def answer(provider: Provider, client: CannedClient, stream: CannedStream) -> Any:
    client.answer = stream

    async def call() -> Any:
        try:
            return await provider.complete(REQUEST)
        except errors.ProviderError as exc:
            return exc

    return anyio.run(call)


def check(outcome: Any) -> None:
    assert isinstance(outcome, Completion | errors.ProviderError), repr(outcome)
    if isinstance(outcome, errors.ProviderError):
        assert KEY not in outcome.describe()
    else:
        assert outcome.usage is None or outcome.usage.prompt_tokens >= 0


# -- generated JSON --------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
words = st.sampled_from(
    [
        "choices", "message", "content", "usage", "prompt_tokens", "completion_tokens",
        "total_tokens", "tool_calls", "function", "name", "arguments", "delta",
        "finish_reason", "error", "type", "text", "input", "input_tokens", "output_tokens",
        "stop_reason", "index", "status", "code", "cost", "reasoning_content", "model",
        "message_start", "content_block_start", "content_block_delta", "content_block",
        "message_stop", "message_delta", "text_delta", "partial_json", "input_json_delta",
    ]
)  # fmt: skip
# Bodies built from the protocol's own words reach deep into the parsers.
protocol_like = st.recursive(
    scalars | words,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(words, inner, max_size=5),
    max_leaves=25,
)
# The standard library writes what orjson will not (64-bit overflows, NaN): servers do too.
bodies = (json_values | protocol_like).map(lambda v: json.dumps(v).encode())
raw_bytes = st.binary(max_size=200)
content_types = st.sampled_from(
    ["application/json", "text/html; charset=utf-8", "text/event-stream", "text/plain", ""]
)
statuses = st.sampled_from([200, 200, 200, 201, 204, 400, 401, 404, 408, 429, 500, 502, 529])
common = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def events(values: list[bytes]) -> bytes:
    return b"".join(b"data: " + v + b"\n\n" for v in values)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@common
@given(status=statuses, content_type=content_types, body=bodies | raw_bytes)
def test_any_plain_body_is_a_completion_or_a_provider_error(
    kind: str, status: int, content_type: str, body: bytes
) -> None:
    provider, client = make(kind, stream=False)
    check(answer(provider, client, CannedStream(status, {"content-type": content_type}, body)))


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@common
@given(
    status=statuses,
    content_type=content_types,
    chunks=st.lists(bodies | raw_bytes, max_size=6),
    done=st.booleans(),
)
def test_any_stream_is_a_completion_or_a_provider_error(
    kind: str, status: int, content_type: str, chunks: list[bytes], done: bool
) -> None:
    provider, client = make(kind, stream=True)
    content = events([*chunks, b"[DONE]"] if done else chunks)
    check(answer(provider, client, CannedStream(status, {"content-type": content_type}, content)))


# -- the shapes gateways were seen to send -----------------------------------------------

OK_USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def openai_body(message: Any, usage: Any = OK_USAGE) -> bytes:
    body = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)


JSON = {"content-type": "application/json"}
HTML = {"content-type": "text/html"}


@pytest.mark.parametrize(
    ("content", "headers", "expected"),
    [
        # usage that cannot be read is unknown, the answer is kept
        (
            openai_body({"content": "hi"}, {"prompt_tokens": "n/a"}),
            JSON,
            Completion,
        ),
        (orjson.dumps({"choices": []}), JSON, errors.MalformedResponse),
        (openai_body(None), JSON, errors.MalformedResponse),
        (openai_body({"content": None}, usage=None), JSON, errors.MalformedResponse),
        (b"<html><body>Bad gateway</body></html>", HTML, errors.MalformedResponse),
        (b"", JSON, errors.MalformedResponse),
        # an error object sent with HTTP 200, classified as its own status says
        (
            orjson.dumps({"error": {"message": f"No connected db. key={KEY}", "code": "400"}}),
            JSON,
            errors.BadRequest,
        ),
        (
            orjson.dumps({"error": {"message": "slow down", "type": "rate_limit_error"}}),
            JSON,
            errors.RateLimited,
        ),
        (
            orjson.dumps({"error": {"message": "bad key", "code": 401}}),
            JSON,
            errors.AuthenticationError,
        ),
        (orjson.dumps({"status": "error", "message": "busy"}), JSON, errors.ServerError),
    ],
    ids=[
        "usage-n/a",
        "empty-choices",
        "null-message",
        "nothing-at-all",
        "html-200",
        "empty-body",
        "error-400-in-200",
        "rate-limit-in-200",
        "auth-in-200",
        "modelslab-status-error-200",
    ],
)  # fmt: skip
def test_openai_gateway_shapes(content: bytes, headers: dict[str, str], expected: type) -> None:
    provider, client = make("openai", stream=False)
    outcome = answer(provider, client, CannedStream(200, headers, content))
    assert isinstance(outcome, expected), outcome
    check(outcome)
    if isinstance(outcome, Completion):
        assert outcome.response == "hi" and outcome.usage is None


def test_malformed_answers_carry_a_short_redacted_snippet() -> None:
    provider, client = make("openai", stream=False)
    page = f"<html>{KEY} proxy error {'x' * 500}</html>".encode()
    outcome = answer(provider, client, CannedStream(200, {"content-type": "text/html"}, page))
    assert isinstance(outcome, errors.MalformedResponse)
    assert "text/html" in outcome.message and "proxy error" in outcome.message
    assert KEY not in outcome.message and len(outcome.message) < 300


def test_missing_usage_is_null_not_zero() -> None:
    provider, client = make("openai", stream=False)
    outcome = answer(
        provider, client, CannedStream(200, JSON, openai_body({"content": "hi"}, None))
    )
    assert isinstance(outcome, Completion) and outcome.usage is None


def test_anthropic_null_content_is_malformed() -> None:
    provider, client = make("anthropic", stream=False)
    body = orjson.dumps({"type": "message", "content": None, "usage": {"input_tokens": 1}})
    outcome = answer(provider, client, CannedStream(200, JSON, body))
    assert isinstance(outcome, errors.MalformedResponse)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_a_plain_json_answer_to_a_stream_request_is_read_as_the_answer(kind: str) -> None:
    provider, client = make(kind, stream=True)
    if kind == "openai":
        body = openai_body({"role": "assistant", "content": "plain"})
    else:
        body = orjson.dumps(
            {
                "type": "message",
                "content": [{"type": "text", "text": "plain"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 3, "output_tokens": 1},
            }
        )
    outcome = answer(provider, client, CannedStream(200, JSON, body))
    assert isinstance(outcome, Completion) and outcome.response == "plain"


def test_a_stream_with_only_an_empty_delta_and_no_usage_is_malformed() -> None:
    provider, client = make("openai", stream=True)
    chunk = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    content = events([orjson.dumps(chunk), b"[DONE]"])
    outcome = answer(
        provider, client, CannedStream(200, {"content-type": "text/event-stream"}, content)
    )
    assert isinstance(outcome, errors.MalformedResponse)


def test_provider_reported_cost_is_read() -> None:
    provider, client = make("openai", stream=False)
    headers = {**JSON, "x-litellm-response-cost": "0.00042"}
    outcome = answer(provider, client, CannedStream(200, headers, openai_body({"content": "hi"})))
    assert isinstance(outcome, Completion) and outcome.reported_cost_usd == pytest.approx(0.00042)
    usage = {**OK_USAGE, "cost": 0.0007}
    outcome = answer(
        provider, client, CannedStream(200, JSON, openai_body({"content": "x"}, usage))
    )
    assert isinstance(outcome, Completion) and outcome.reported_cost_usd == pytest.approx(0.0007)
