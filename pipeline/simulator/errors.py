"""Error bodies in each provider's wire shape."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
from aiohttp import web

from .behaviour import mask_key

_req_ids = itertools.count(1)

# status -> (openai type, openai code, message)
_OPENAI_STATUS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", "invalid_request", "Invalid request (simulated)."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided: sk***im."),
    403: (
        "permission_error",
        "unsupported_country_region_territory",
        "You are not allowed to access this resource (simulated).",
    ),
    404: ("invalid_request_error", "model_not_found", "The model does not exist (simulated)."),
    408: ("server_error", "timeout", "Request timed out (simulated)."),
    409: ("invalid_request_error", "conflict", "Conflict (simulated)."),
    422: ("invalid_request_error", "unprocessable_entity", "Unprocessable entity (simulated)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached (simulated)."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    504: ("server_error", None, "Gateway timeout."),
    529: ("overloaded_error", None, "Overloaded"),
}

_ANTHROPIC_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

QUOTA_MESSAGE = (
    "You exceeded your current quota, please check your plan and billing details. "
    "For more information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)
CREDITS_MESSAGE = "Insufficient credits. Please top up your account to continue."


class Reject(Exception):
    """Short-circuit a request with a ready response."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


def json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    body = orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


def openai_error(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def openai_status_error(status: int) -> dict[str, Any]:
    """Body for a triggered/faulted status on the OpenAI-compatible endpoints."""
    if status == 402:
        return modelslab_error(CREDITS_MESSAGE)
    if status in _OPENAI_STATUS:
        type_, code, msg = _OPENAI_STATUS[status]
        return openai_error(msg, type_, code, "model" if status == 404 else None)
    if status >= 500:
        return openai_error(f"Server error {status} (simulated).", "server_error")
    return openai_error(f"Error {status} (simulated).", "invalid_request_error", "simulated")


def modelslab_error(message: str, **extra: Any) -> dict[str, Any]:
    return {"status": "error", "message": message, **extra}


def request_id() -> str:
    return f"req_sim{next(_req_ids):018x}"


def anthropic_error(
    status: int, message: str, type_: str | None = None, **extra: Any
) -> dict[str, Any]:
    default = "api_error" if status >= 500 else "invalid_request_error"
    err: dict[str, Any] = {
        "type": type_ or _ANTHROPIC_TYPE.get(status, default),
        "message": message,
    }
    err.update(extra)
    return {"type": "error", "error": err, "request_id": request_id()}


def anthropic_status_error(status: int) -> dict[str, Any]:
    if status == 402:
        return anthropic_error(402, CREDITS_MESSAGE)
    if status == 529:
        return anthropic_error(529, "Overloaded")
    msg = _OPENAI_STATUS.get(status, ("", None, f"Error {status} (simulated)."))[2]
    return anthropic_error(status, msg)


def auth_error(style: str, given: str | None) -> tuple[int, dict[str, Any]]:
    """(status, body) for a wrong or missing key in the configured provider style."""
    shown = mask_key(given) if given else None
    if style == "xai":
        msg = (
            f"Incorrect API key provided: {shown}. "
            "You can obtain an API key from https://console.x.ai."
            if shown
            else "No API key provided. You can obtain an API key from https://console.x.ai."
        )
        return 400, {"code": "Client specified an invalid argument", "error": msg}
    if style == "modelslab":
        return 401, modelslab_error("Invalid API key")
    if style == "litellm":
        return 400, openai_error("Authentication Error, No connected db.", "auth_error", "400")
    msg = (
        f"Incorrect API key provided: {shown}."
        if shown
        else "You didn't provide an API key. You need to provide your API key in an "
        "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
    )
    return 401, openai_error(msg, "invalid_request_error", "invalid_api_key")


def context_error_openai(tokens: int, limit: int = 131072) -> dict[str, Any]:
    return openai_error(
        f"This model's maximum context length is {limit} tokens. However, your messages "
        f"resulted in {max(tokens, limit + 1)} tokens. Please reduce the length of the "
        "messages.",
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )


def context_error_anthropic(tokens: int, limit: int = 200000) -> dict[str, Any]:
    return anthropic_error(
        400, f"prompt is too long: {max(tokens, limit + 1)} tokens > {limit} maximum"
    )
