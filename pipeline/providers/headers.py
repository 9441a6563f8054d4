"""Parsing what providers say about rate limits: headers and retry hints."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

from pipeline.types import RateLimitInfo

_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
MAX_RETRY_AFTER_S = 3600.0


def parse_duration(value: str) -> float | None:
    """Go-style durations as OpenAI sends them: `6m0s`, `1.5s`, `20ms`; bare numbers are s."""
    value = value.strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _GO_DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def parse_reset_time(value: str, now: float | None = None) -> float | None:
    """Anthropic's RFC 3339 reset timestamps, as seconds from now."""
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return parse_duration(value)
    now = time.time() if now is None else now
    return max(0.0, moment.timestamp() - now)


def parse_retry_after(
    headers: Mapping[str, str], body: Any = None, now: float | None = None
) -> float | None:
    """Seconds to wait, from `retry-after-ms`, `retry-after` (seconds or HTTP date), or a
    ModelsLab-style `retry_after` in the JSON body."""
    if raw := headers.get("retry-after-ms"):
        try:
            return _bounded(float(raw) / 1000)
        except ValueError:
            pass
    if raw := headers.get("retry-after"):
        try:
            return _bounded(float(raw))
        except ValueError:
            try:
                moment = parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                moment = None
            if moment is not None:
                now = time.time() if now is None else now
                return _bounded(moment.timestamp() - now)
    if isinstance(body, dict) and isinstance(body.get("retry_after"), int | float):
        return _bounded(float(body["retry_after"]))
    return None


def parse_rate_limits(headers: Mapping[str, str], now: float | None = None) -> RateLimitInfo | None:
    """Read `x-ratelimit-*` (OpenAI, xAI, Groq) or `anthropic-ratelimit-*` headers."""
    if "x-ratelimit-limit-requests" in headers or "x-ratelimit-limit-tokens" in headers:
        return RateLimitInfo(
            limit_requests=_number(headers.get("x-ratelimit-limit-requests")),
            limit_tokens=_number(headers.get("x-ratelimit-limit-tokens")),
            remaining_requests=_number(headers.get("x-ratelimit-remaining-requests")),
            remaining_tokens=_number(headers.get("x-ratelimit-remaining-tokens")),
            reset_requests_s=_maybe(parse_duration, headers.get("x-ratelimit-reset-requests")),
            reset_tokens_s=_maybe(parse_duration, headers.get("x-ratelimit-reset-tokens")),
        )
    prefix = "anthropic-ratelimit-"
    if f"{prefix}requests-limit" in headers or f"{prefix}tokens-limit" in headers:

        def reset(name: str) -> float | None:
            raw = headers.get(f"{prefix}{name}-reset")
            return parse_reset_time(raw, now) if raw else None

        return RateLimitInfo(
            limit_requests=_number(headers.get(f"{prefix}requests-limit")),
            limit_tokens=_number(headers.get(f"{prefix}tokens-limit")),
            remaining_requests=_number(headers.get(f"{prefix}requests-remaining")),
            remaining_tokens=_number(headers.get(f"{prefix}tokens-remaining")),
            reset_requests_s=reset("requests"),
            reset_tokens_s=reset("tokens"),
        )
    return None


def _bounded(seconds: float) -> float:
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def _number(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        return float(raw)
    except ValueError:
        return None


def _maybe(parse: Any, raw: str | None) -> float | None:
    return parse(raw) if raw else None
