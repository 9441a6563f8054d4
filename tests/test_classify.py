"""The error table: every provider failure lands in the class that decides what happens."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from pipeline import errors
from pipeline.config import resolve_provider
from pipeline.http import HttpClient, HttpResponse
from pipeline.providers.openai import OpenAIChat
from pipeline.spec import ModelSpec

KEY = "sk-classify-secret-9876"


@pytest.fixture
def adapter(monkeypatch: pytest.MonkeyPatch) -> OpenAIChat:
    monkeypatch.setenv("CLASSIFY_KEY", KEY)
    settings = resolve_provider(
        ModelSpec(provider="openai", model="m", base_url="http://x/v1", api_key_env="CLASSIFY_KEY")
    )
    return OpenAIChat(settings, HttpClient(1, 10))


def outcome(
    adapter: OpenAIChat, status: int, body: Any, headers: dict[str, str] | None = None
) -> Any:
    response = HttpResponse(status, CIMultiDict(headers or {}), orjson.dumps(body))
    try:
        return adapter.parse(response)
    except errors.ProviderError as exc:
        return exc


def openai_error(code: str | None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": "m", "type": kind, "param": None, "code": code}}


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (429, openai_error("rate_limit_exceeded", "tokens"), errors.RateLimited),
        (429, openai_error("insufficient_quota", "insufficient_quota"), errors.QuotaExceeded),
        (
            429,
            {"status": "error", "message": "Rate limit exceeded.", "retry_after": 30},
            errors.RateLimited,
        ),
        (408, openai_error(None), errors.ServerError),
        (409, openai_error(None), errors.ServerError),
        (500, openai_error(None, "server_error"), errors.ServerError),
        (503, {"status": "error", "message": "busy"}, errors.ServerError),
        (
            529,
            {"type": "error", "error": {"type": "overloaded_error", "message": "o"}},
            errors.ServerError,
        ),
        (400, openai_error("invalid_request"), errors.BadRequest),
        (422, openai_error(None), errors.BadRequest),
        (400, openai_error("context_length_exceeded"), errors.ContextLengthExceeded),
        (400, openai_error("content_filter"), errors.ContentFiltered),
        (401, openai_error("invalid_api_key"), errors.AuthenticationError),
        (403, openai_error(None), errors.AuthenticationError),
        (
            400,
            {
                "code": "Client specified an invalid argument",
                "error": "Incorrect API key provided: sk***76.",
            },
            errors.AuthenticationError,
        ),
        (
            400,
            {
                "code": "Client specified an invalid argument",
                "error": "This model's maximum prompt length is 131072",
            },
            errors.BadRequest,
        ),
        (404, openai_error("model_not_found"), errors.ModelNotFound),
        (402, {"status": "error", "message": "Insufficient credits"}, errors.QuotaExceeded),
        (200, {"status": "error", "message": "Server busy"}, errors.ServerError),
        (200, {"id": "x", "object": "chat.completion"}, errors.MalformedResponse),
    ],
)
def test_classification(adapter: OpenAIChat, status: int, body: Any, expected: type) -> None:
    assert type(outcome(adapter, status, body)) is expected


def test_families_decide_what_happens() -> None:
    assert issubclass(errors.RateLimited, errors.RetryableError)
    assert issubclass(errors.ContextLengthExceeded, errors.RowError)
    assert issubclass(errors.QuotaExceeded, errors.JobFatalError)


def test_truncated_body_is_retryable(adapter: OpenAIChat) -> None:
    response = HttpResponse(200, CIMultiDict(), b'{"id": "x", "choices": [{"mess')
    with pytest.raises(errors.MalformedResponse):
        adapter.parse(response)


def test_retry_hints_travel_with_the_error(adapter: OpenAIChat) -> None:
    from_header = outcome(
        adapter, 429, openai_error("rate_limit_exceeded"), {"retry-after-ms": "250"}
    )
    from_body = outcome(adapter, 429, {"status": "error", "message": "slow down", "retry_after": 7})
    assert from_header.retry_after == 0.25
    assert from_body.retry_after == 7.0


def test_key_echoed_in_an_error_body_is_redacted(adapter: OpenAIChat) -> None:
    error = outcome(adapter, 500, {"error": {"message": f"bad request body key={KEY}"}})
    assert KEY not in error.describe()
    assert "***" in error.describe()


def test_success_with_think_tags_and_usage(adapter: OpenAIChat) -> None:
    body = {
        "model": "m",
        "choices": [
            {
                "message": {"role": "assistant", "content": "<think>hmm</think>\nYes."},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 2,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 3},
        },
    }
    completion = outcome(adapter, 200, body)
    assert completion.response == "Yes."
    assert completion.reasoning == "hmm"
    assert completion.usage.cached_tokens == 4
    assert completion.usage.output_tokens == 5, "xAI-style usage bills reasoning on top"
