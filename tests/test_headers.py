"""Rate-limit headers and retry hints in every format providers send."""

from __future__ import annotations

import pytest

from pipeline.providers.headers import (
    parse_duration,
    parse_rate_limits,
    parse_reset_time,
    parse_retry_after,
)

NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("1s", 1.0),
        ("20ms", 0.02),
        ("1.5s", 1.5),
        ("6m0s", 360.0),
        ("2m59.56s", 179.56),
        ("1h2m3s", 3723.0),
        ("7.66s", 7.66),
        ("12", 12.0),
        ("", None),
        ("soon", None),
        ("5x", None),
    ],
)
def test_go_durations(raw: str, seconds: float | None) -> None:
    result = parse_duration(raw)
    assert result == pytest.approx(seconds) if seconds is not None else result is None


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5


def test_retry_after_seconds_and_http_date() -> None:
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    date = "Tue, 14 Nov 2023 22:13:40 GMT"  # NOW + 20 s
    assert parse_retry_after({"retry-after": date}, now=NOW) == pytest.approx(20.0)


def test_retry_after_in_a_modelslab_body() -> None:
    assert parse_retry_after({}, {"status": "error", "retry_after": 30}) == 30.0


def test_no_hint_means_none() -> None:
    assert parse_retry_after({}, {"error": {"message": "x"}}) is None


def test_openai_rate_limit_headers() -> None:
    info = parse_rate_limits(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-limit-tokens": "150000",
            "x-ratelimit-remaining-requests": "59",
            "x-ratelimit-remaining-tokens": "149984",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    assert info is not None
    assert (info.limit_requests, info.limit_tokens) == (60, 150000)
    assert (info.remaining_requests, info.remaining_tokens) == (59, 149984)
    assert (info.reset_requests_s, info.reset_tokens_s) == (1.0, 360.0)


def test_anthropic_rate_limit_headers_with_rfc3339_resets() -> None:
    info = parse_rate_limits(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2023-11-14T22:13:25Z",
            "anthropic-ratelimit-tokens-limit": "40000",
            "anthropic-ratelimit-tokens-remaining": "39000",
            "anthropic-ratelimit-tokens-reset": "2023-11-14T22:13:21.5+00:00",
        },
        now=NOW,
    )
    assert info is not None
    assert info.limit_requests == 50 and info.remaining_tokens == 39000
    assert info.reset_requests_s == pytest.approx(5.0)
    assert info.reset_tokens_s == pytest.approx(1.5)


def test_reset_time_in_the_past_is_zero() -> None:
    assert parse_reset_time("2000-01-01T00:00:00Z", now=NOW) == 0.0


def test_no_rate_limit_headers() -> None:
    assert parse_rate_limits({"content-type": "application/json"}) is None


def test_litellm_router_retry_after() -> None:
    assert parse_retry_after({"llm_provider-retry-after": "60"}) == 60.0


def test_litellm_per_key_limiter_headers_with_a_scope_in_the_name() -> None:
    info = parse_rate_limits(
        {
            "x-ratelimit-model_per_key-limit-requests": "100",
            "x-ratelimit-model_per_key-remaining-requests": "37",
            "x-ratelimit-model_per_key-limit-tokens": "50000",
            "x-ratelimit-model_per_key-remaining-tokens": "1200",
        }
    )
    assert info is not None
    assert (info.limit_requests, info.remaining_requests) == (100, 37)
    assert (info.limit_tokens, info.remaining_tokens) == (50_000, 1200)
    assert info.reset_requests_s is None


def test_the_smallest_scoped_limit_binds() -> None:
    info = parse_rate_limits(
        {
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "9990",
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-api_key-limit-requests": "500",
            "x-ratelimit-api_key-remaining-requests": "12",
        }
    )
    assert info is not None
    assert (info.limit_requests, info.remaining_requests, info.reset_requests_s) == (500, 12, None)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-limit-requests": "nan", "x-ratelimit-remaining-requests": "-3"},
        {"x-ratelimit-limit-requests": "inf", "x-ratelimit-reset-requests": "soon"},
        {"anthropic-ratelimit-requests-limit": "x", "anthropic-ratelimit-requests-reset": "9999-"},
    ],
)
def test_nonsense_values_are_ignored(headers: dict[str, str]) -> None:
    info = parse_rate_limits(headers)
    assert info is None or (info.limit_requests is None and info.remaining_requests is None)


@pytest.mark.parametrize("raw", ["nan", "inf", "Sun, 99 Foo", "-5"])
def test_nonsense_retry_after_never_raises(raw: str) -> None:
    seconds = parse_retry_after({"retry-after": raw})
    assert seconds is None or 0.0 <= seconds <= 3600.0
