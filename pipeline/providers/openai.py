"""OpenAI Chat Completions, as spoken by OpenAI, xAI, ModelsLab, OpenRouter, vLLM, Ollama."""

from __future__ import annotations

import re
from typing import Any

import orjson

from pipeline import errors
from pipeline.config import ProviderSettings
from pipeline.http import HttpClient, HttpResponse
from pipeline.providers.base import Provider, register
from pipeline.providers.headers import parse_rate_limits, parse_retry_after
from pipeline.types import ChatRequest, Completion, Usage

QUOTA_CODES = frozenset(
    {
        "insufficient_quota",
        "billing_hard_limit_reached",
        "billing_not_active",
        "enforced_spend_limit_reached",
    }
)
CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})
_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)
_MAX_MESSAGE = 500


@register("openai")
class OpenAIChat(Provider):
    def __init__(self, settings: ProviderSettings, client: HttpClient) -> None:
        super().__init__(settings, client)
        if not settings.base_url:
            raise errors.SpecError(f"provider '{settings.name}' needs model.base_url")
        self.url = settings.base_url.rstrip("/") + "/chat/completions"
        auth = settings.preset.auth
        key = settings.api_key
        self.headers = {"content-type": "application/json", **settings.preset.headers}
        if key and "bearer" in auth:
            self.headers["authorization"] = f"Bearer {key}"
        if key and "x_api_key" in auth:
            self.headers["x-api-key"] = key
        self.body_base: dict[str, Any] = dict(settings.params)
        for name in settings.preset.model_keys:
            self.body_base[name] = settings.model
        if key and "body_key" in auth:
            self.body_base["key"] = key

    async def complete(self, request: ChatRequest) -> Completion:
        body = orjson.dumps({**self.body_base, "messages": request.messages})
        return self.parse(await self.client.post(self.url, body, self.headers))

    def parse(self, response: HttpResponse) -> Completion:
        status = response.status
        try:
            payload = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            payload = None
        if status >= 400:
            error = self.classify(status, payload, response.headers)
            error.rate_limits = parse_rate_limits(response.headers)
            raise error
        if not isinstance(payload, dict):
            raise errors.MalformedResponse("response body is not a JSON object", status=status)
        choices = payload.get("choices")
        if not isinstance(choices, list) or not choices:
            if _error_fields(payload) != (None, None, ""):
                raise self.classify(status, payload, response.headers)
            raise errors.MalformedResponse("response has no choices", status=status)
        return _completion(payload, choices[0], parse_rate_limits(response.headers))

    def classify(self, status: int, payload: Any, headers: Any) -> errors.ProviderError:
        """Map status and body error code to the error class; message text is only shown."""
        code, kind, message = _error_fields(payload)
        message = self.redact(message)[:_MAX_MESSAGE] or f"HTTP {status}"
        codes = {code, kind}
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


def _error_fields(payload: Any) -> tuple[str | None, str | None, str]:
    """(code, type, message) from OpenAI, xAI-flat or ModelsLab error bodies."""
    if not isinstance(payload, dict):
        return None, None, ""
    error = payload.get("error")
    if isinstance(error, dict):
        return _str(error.get("code")), _str(error.get("type")), str(error.get("message") or "")
    if isinstance(error, str):  # xAI: {"code": "...", "error": "..."}
        return _str(payload.get("code")), None, error
    if payload.get("status") == "error":  # ModelsLab
        return None, None, str(payload.get("message") or "status: error")
    return None, None, ""


def _is_xai_rejected_key(status: int, payload: Any) -> bool:
    # xAI rejects a key with HTTP 400 and only prose to say so; this documented shape is
    # the one place a message is read, and only to pick the class, here at the boundary.
    return (
        status == 400
        and isinstance(payload, dict)
        and isinstance(payload.get("error"), str)
        and payload["error"].startswith("Incorrect API key")
    )


def _str(value: Any) -> str | None:
    return str(value) if value is not None else None


def _completion(payload: dict[str, Any], choice: Any, rate_limits: Any) -> Completion:
    if not isinstance(choice, dict):
        raise errors.MalformedResponse("choices[0] is not an object")
    message = choice.get("message") or {}
    content = message.get("content") or ""
    reasoning = _reasoning(message)
    if reasoning is None and (think := _THINK.match(content)):
        reasoning = think.group(1).strip()
        content = content[think.end() :]
    return Completion(
        response=content,
        reasoning=reasoning,
        usage=_usage(payload.get("usage")),
        finish_reason=choice.get("finish_reason"),
        model=payload.get("model"),
        rate_limits=rate_limits,
    )


def _reasoning(message: dict[str, Any]) -> str | None:
    for field in ("reasoning_content", "reasoning"):
        value = message.get(field)
        if isinstance(value, str) and value:
            return value
    details = message.get("reasoning_details")
    if isinstance(details, list):
        texts = [
            d.get("text") or d.get("summary")
            for d in details
            if isinstance(d, dict) and isinstance(d.get("text") or d.get("summary"), str)
        ]
        if texts:
            return "\n".join(texts)
    return None


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    prompt = int(raw.get("prompt_tokens") or 0)
    completion = int(raw.get("completion_tokens") or 0)
    cached = prompt_details.get("cached_tokens") or raw.get("prompt_cache_hit_tokens") or 0
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
        cached_tokens=int(cached),
        total_tokens=int(raw.get("total_tokens") or prompt + completion),
    )
