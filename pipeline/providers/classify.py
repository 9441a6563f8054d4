"""From an HTTP status and an error body to the error class that decides what happens.

Every provider's error shapes are read here: OpenAI `{"error": {...}}`, xAI's flat
`{"code", "error"}`, ModelsLab's `{"status": "error", "message"}` and Anthropic's
`{"type": "error", "error": {"type", "message", "details"}}`. The class is chosen
from the status and the body's codes; message text is only shown to the user.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline import errors
from pipeline.providers.headers import parse_retry_after

QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "billing_hard_limit_reached",
        "billing_not_active",
        "enforced_spend_limit_reached",
        "billing_error",
    }
)
CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})
MAX_MESSAGE = 500


def classify(
    status: int, payload: Any, headers: Any, redact: Callable[[str], str]
) -> errors.ProviderError:
    """Map status and body error codes to the error class."""
    codes, message = _codes_and_message(payload)
    message = redact(message)[:MAX_MESSAGE] or f"HTTP {status}"
    retry_after = parse_retry_after(headers, payload)
    if status == 429:
        if codes & QUOTA_CODES:
            return errors.QuotaExceeded(message, status=status)
        return errors.RateLimited(message, status=status, retry_after=retry_after)
    if status in (401, 403) or _is_xai_rejected_key(status, payload):
        return errors.AuthenticationError(message, status=status)
    if status == 402 or codes & QUOTA_CODES:
        return errors.QuotaExceeded(message, status=status)
    if status == 404:
        return errors.ModelNotFound(message, status=status)
    if status in (408, 409) or status >= 500 or status < 400:
        return errors.ServerError(message, status=status, retry_after=retry_after)
    if codes & CONTEXT_CODES:
        return errors.ContextLengthExceeded(message, status=status)
    if codes & FILTER_CODES:
        return errors.ContentFiltered(message, status=status)
    return errors.BadRequest(message, status=status)


# What an error's type or code means as an HTTP status, for errors sent with HTTP 200.
STATUS_OF_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "invalid_api_key": 401,
    "permission_error": 403,
    "billing_error": 402,
    "not_found_error": 404,
    "model_not_found": 404,
    "rate_limit_error": 429,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "requests": 429,
    "tokens": 429,
    "timeout_error": 408,
    "api_error": 500,
    "server_error": 500,
    "overloaded_error": 529,
}


def classify_error_in_body(
    payload: Any, headers: Any, redact: Callable[[str], str]
) -> errors.ProviderError:
    """An error object sent with HTTP 200, classified as it would be with its own status."""
    status = embedded_status(payload)
    return classify(status or 500, payload, headers, redact)


def embedded_status(payload: Any) -> int | None:
    """The HTTP status an error body names: a numeric code (LiteLLM sends `"code": "429"`),
    a status field, or what its documented type means."""
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    places = [payload]
    if isinstance(error, dict):
        places.insert(0, error)
    for place in places:
        for name in ("status_code", "status", "code"):
            if (status := _http_status(place.get(name))) is not None:
                return status
    codes, _ = _codes_and_message(payload)
    for code in sorted(codes):
        if code in STATUS_OF_TYPE:
            return STATUS_OF_TYPE[code]
    return None


def _http_status(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    return value if isinstance(value, int) and 400 <= value <= 599 else None


def has_error(payload: Any) -> bool:
    """Whether a body (even one sent with HTTP 200) describes an error."""
    return _codes_and_message(payload) != (set(), "")


def _codes_and_message(payload: Any) -> tuple[set[str], str]:
    if not isinstance(payload, dict):
        return set(), ""
    error = payload.get("error")
    if isinstance(error, dict):
        details = error.get("details")
        if not isinstance(details, dict):
            details = {}
        codes = [error.get("code"), error.get("type"), details.get("error_code")]
        return _codes(codes), str(error.get("message") or "")
    if isinstance(error, str):  # xAI: {"code": "...", "error": "..."}
        return _codes([payload.get("code")]), error or "error"
    if payload.get("status") == "error":  # ModelsLab
        return set(), str(payload.get("message") or "status: error")
    return set(), ""


def _codes(values: list[Any]) -> set[str]:
    return {str(v) for v in values if isinstance(v, str | int) and not isinstance(v, bool)}


def _is_xai_rejected_key(status: int, payload: Any) -> bool:
    # xAI rejects a key with HTTP 400 and only prose to say so; this documented shape is
    # the one place a message is read, and only to pick the class, here at the boundary.
    return (
        status == 400
        and isinstance(payload, dict)
        and isinstance(payload.get("error"), str)
        and payload["error"].startswith("Incorrect API key")
    )
