"""Parsing what providers say about rate limits: headers and retry hints."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
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
        number = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, number) if math.isfinite(number) else None
    parts = _GO_DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def parse_reset_time(value: str, now: float | None = None) -> float | None:
    """Anthropic's RFC 3339 reset timestamps, as seconds from now."""
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()
    except (ValueError, OverflowError, OSError):
        return parse_duration(value)
    now = time.time() if now is None else now
    return max(0.0, moment - now)


RETRY_AFTER_HEADERS = ("retry-after", "llm_provider-retry-after")
_OPENAI_STYLE = re.compile(
    r"x-ratelimit-(?:(?P<scope>[a-z0-9_.:-]+?)-)?(?P<field>limit|remaining|reset)-"
    r"(?P<dimension>requests|tokens)"
)
_FIELDS = {"limit": 0, "remaining": 1, "reset": 2}


def parse_retry_after(
    headers: Mapping[str, str], body: Any = None, now: float | None = None
) -> float | None:
    """Seconds to wait, from `retry-after-ms`, `retry-after` (seconds or HTTP date), a
    LiteLLM router's `llm_provider-retry-after`, or a ModelsLab-style `retry_after` in
    the JSON body."""
    if raw := headers.get("retry-after-ms"):
        try:
            return _bounded(float(raw) / 1000)
        except ValueError:
            pass
    for name in RETRY_AFTER_HEADERS:
        if (raw := headers.get(name)) and (seconds := _seconds_or_date(raw, now)) is not None:
            return seconds
    if isinstance(body, dict):
        hint = body.get("retry_after")
        if isinstance(hint, int | float) and not isinstance(hint, bool) and math.isfinite(hint):
            return _bounded(float(hint))
    return None


def _seconds_or_date(raw: str, now: float | None) -> float | None:
    try:
        seconds = float(raw)
    except ValueError:
        try:
            moment = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        now = time.time() if now is None else now
        try:
            return _bounded(moment.timestamp() - now)
        except (OverflowError, OSError):
            return None
    return _bounded(seconds) if math.isfinite(seconds) else None


def parse_rate_limits(headers: Mapping[str, str], now: float | None = None) -> RateLimitInfo | None:
    """Read `x-ratelimit-*` (OpenAI, xAI, Groq, LiteLLM) or `anthropic-ratelimit-*` headers.

    LiteLLM's per-key limiter puts a scope in the name
    (`x-ratelimit-model_per_key-remaining-requests`) and sends no reset; where several
    scopes are reported, the one with the smallest limit binds.
    """
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
            reset_to_the_ms=False,
        )
    # (dimension, scope) -> [limit, remaining, reset]
    found: dict[tuple[str, str], list[float | None]] = {}
    for name, raw in headers.items():
        name = name.lower()
        if not name.startswith("x-ratelimit-") or not (match := _OPENAI_STYLE.fullmatch(name)):
            continue
        field = match["field"]
        value = _maybe(parse_duration, raw) if field == "reset" else _number(raw)
        key = (match["dimension"], match["scope"] or "")
        found.setdefault(key, [None, None, None])[_FIELDS[field]] = value
    if not found:
        return None
    requests = _binding(v for (d, _), v in found.items() if d == "requests")
    tokens = _binding(v for (d, _), v in found.items() if d == "tokens")
    if requests[0] is None and tokens[0] is None and requests[1] is None and tokens[1] is None:
        return None
    return RateLimitInfo(
        limit_requests=requests[0],
        limit_tokens=tokens[0],
        remaining_requests=requests[1],
        remaining_tokens=tokens[1],
        reset_requests_s=requests[2],
        reset_tokens_s=tokens[2],
    )


def _binding(scopes: Iterable[list[float | None]]) -> list[float | None]:
    """The scope that runs out first: the smallest limit, else the smallest remaining."""

    def tightness(values: list[float | None]) -> tuple[float, float]:
        limit, remaining = values[0], values[1]
        return (
            limit if limit is not None else math.inf,
            remaining if remaining is not None else math.inf,
        )

    return min(scopes, key=tightness, default=[None, None, None])


def _bounded(seconds: float) -> float:
    return min(max(0.0, seconds), MAX_RETRY_AFTER_S)


def _number(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _maybe(parse: Any, raw: str | None) -> float | None:
    return parse(raw) if raw else None


COST_HEADERS = ("x-litellm-response-cost",)


def response_cost(headers: Mapping[str, str]) -> float | None:
    """What a gateway says the call cost, in US dollars (LiteLLM's response-cost header)."""
    for name in COST_HEADERS:
        if (raw := headers.get(name)) is not None:
            value = _number(raw)
            if value is not None:
                return value
    return None
