"""Anthropic Messages (`POST {base}/v1/messages`), as Anthropic and ModelsLab serve it.

The system prompt travels outside the messages, `max_tokens` is required, text
blocks become `response`, `thinking` blocks become `reasoning` (redacted thinking
is noted, not decoded), `tool_use` blocks become tool calls, and usage maps onto
the same columns as every other protocol. A schema is asked for as a forced tool
call, which is how this API returns structured output.
"""

from __future__ import annotations

from typing import Any

import orjson

from pipeline import errors
from pipeline.config import ProviderSettings
from pipeline.http import HttpClient, HttpResponse
from pipeline.providers import sse, tools
from pipeline.providers.base import Provider, register
from pipeline.providers.classify import classify, has_error
from pipeline.providers.headers import parse_rate_limits
from pipeline.structured import SCHEMA_NAME
from pipeline.types import ChatRequest, Completion, Message, Usage

API_VERSION = "2023-06-01"
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
REDACTED = "[redacted thinking]"


def messages_url(base_url: str) -> str:
    base = base_url.rstrip("/")
    return base + ("/messages" if base.endswith("/v1") else "/v1/messages")


@register("anthropic")
class AnthropicMessages(Provider):
    def __init__(self, settings: ProviderSettings, client: HttpClient) -> None:
        super().__init__(settings, client)
        if not settings.base_url:
            raise errors.SpecError(f"provider '{settings.name}' needs model.base_url")
        self.url = messages_url(settings.base_url)
        key = settings.api_key
        self.headers = {
            "content-type": "application/json",
            "anthropic-version": API_VERSION,
            **settings.preset.headers,
        }
        if key and "x_api_key" in settings.preset.auth:
            self.headers["x-api-key"] = key
        if key and "bearer" in settings.preset.auth:
            self.headers["authorization"] = f"Bearer {key}"
        params = dict(settings.params)
        params.pop("max_completion_tokens", None)
        self.body_base: dict[str, Any] = {
            "model": settings.model,
            "max_tokens": settings.params.get("max_tokens")
            or settings.params.get("max_completion_tokens")
            or settings.preset.default_max_tokens,
            **{k: v for k, v in params.items() if k != "max_tokens"},
        }
        if settings.tools:
            self.body_base["tools"] = tools.to_anthropic(settings.tools)
        if (choice := tools.choice_to_anthropic(settings.tool_choice)) is not None:
            self.body_base["tool_choice"] = choice
        self.schema_via_tool = settings.schema is not None
        if settings.schema is not None:
            schema_tool = {
                "name": SCHEMA_NAME,
                "description": "Record the answer for this row.",
                "input_schema": settings.schema.schema,
            }
            self.body_base["tools"] = [*self.body_base.get("tools", []), schema_tool]
            self.body_base["tool_choice"] = {"type": "tool", "name": SCHEMA_NAME}
        if settings.stream:
            self.body_base["stream"] = True

    def body(self, messages: list[Message]) -> dict[str, Any]:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        body = {**self.body_base, "messages": turns}
        if system:
            body["system"] = system
        return body

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        return self.body(request.messages)

    def parse_body(self, status: int, body: Any) -> Completion:
        return self.parse(HttpResponse(status, {}, orjson.dumps(body)))

    async def list_models(self) -> list[str]:
        url = self.url.removesuffix("/messages") + "/models"
        payload = await self._get_json(url, self.headers)
        return [str(m.get("id")) for m in payload.get("data") or [] if isinstance(m, dict)]

    async def count_tokens(self, messages: list[Message]) -> int | None:
        if not self.settings.preset.count_tokens:
            return None
        body = self.body(messages)
        request = {k: body[k] for k in ("model", "messages", "system", "tools") if k in body}
        payload = await self._post_json(self.url + "/count_tokens", request, self.headers)
        return int(payload["input_tokens"])

    async def complete(self, request: ChatRequest) -> Completion:
        body = orjson.dumps(self.body(request.messages))
        if self.settings.stream:
            return await self._stream(body)
        return self.parse(await self.client.post(self.url, body, self.headers))

    def parse(self, response: HttpResponse) -> Completion:
        try:
            payload = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            payload = None
        if response.status >= 400 or (isinstance(payload, dict) and has_error(payload)):
            raise self._error(response.status, payload, response.headers)
        if not isinstance(payload, dict) or not isinstance(payload.get("content"), list):
            raise errors.MalformedResponse("response has no content blocks", status=response.status)
        return self._completion(payload, parse_rate_limits(response.headers))

    def _error(self, status: int, payload: Any, headers: Any) -> errors.ProviderError:
        error = classify(status, payload, headers, self.redact)
        error.rate_limits = parse_rate_limits(headers)
        return error

    def _completion(self, payload: dict[str, Any], rate_limits: Any) -> Completion:
        text: list[str] = []
        thinking: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in payload["content"]:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text":
                text.append(block.get("text") or "")
            elif kind == "thinking":
                thinking.append(block.get("thinking") or "")
            elif kind == "redacted_thinking":
                thinking.append(REDACTED)
            elif kind == "tool_use":
                calls.append(
                    tools.normalized_call(block["name"], block.get("input"), block.get("id"))
                )
        response = "".join(text)
        if self.schema_via_tool:
            answer = next((c for c in calls if c["name"] == SCHEMA_NAME), None)
            if answer is not None:
                calls.remove(answer)
                response = orjson.dumps(answer["arguments"]).decode()
        stop: str | None = payload.get("stop_reason")
        return Completion(
            response=response,
            reasoning="\n".join(thinking) if thinking else None,
            usage=_usage(payload.get("usage")),
            finish_reason=STOP_REASONS.get(stop or "", stop)
            if not self.schema_via_tool
            else "stop",
            model=payload.get("model"),
            rate_limits=rate_limits,
            tool_calls=calls or None,
        )

    async def _stream(self, body: bytes) -> Completion:
        async with self.client.stream(self.url, body, self.headers) as response:
            if response.status >= 400:
                content = await response.read()
                return self.parse(HttpResponse(response.status, response.headers, content))
            message: dict[str, Any] | None = None
            blocks: dict[int, dict[str, Any]] = {}
            partial_json: dict[int, list[str]] = {}
            finished = False
            async for name, data in sse.events(response.lines()):
                event = _loads(data)
                kind = event.get("type", name)
                if kind == "error":
                    raise self._error(529 if _overloaded(event) else 500, event, response.headers)
                if kind == "message_start":
                    message = dict(event["message"])
                elif kind == "content_block_start":
                    blocks[event["index"]] = dict(event["content_block"])
                elif kind == "content_block_delta":
                    _apply_delta(
                        blocks[event["index"]], event["delta"], partial_json, event["index"]
                    )
                elif kind == "message_delta" and message is not None:
                    message.update(event.get("delta") or {})
                    message["usage"] = {
                        **(message.get("usage") or {}),
                        **(event.get("usage") or {}),
                    }
                elif kind == "message_stop":
                    finished = True
            if message is None or not finished:
                # A half answer must never be stored as a success: this is retried.
                raise errors.MalformedResponse("the stream was cut off before the answer finished")
            for index, parts in partial_json.items():
                blocks[index]["input"] = _loads("".join(parts)) if "".join(parts) else {}
            message["content"] = [blocks[i] for i in sorted(blocks)]
            return self._completion(message, parse_rate_limits(response.headers))


def _apply_delta(
    block: dict[str, Any], delta: dict[str, Any], partial_json: dict[int, list[str]], index: int
) -> None:
    kind = delta.get("type")
    if kind == "text_delta":
        block["text"] = block.get("text", "") + delta.get("text", "")
    elif kind == "thinking_delta":
        block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
    elif kind == "input_json_delta":
        partial_json.setdefault(index, []).append(delta.get("partial_json", ""))
    elif kind == "signature_delta":
        block["signature"] = block.get("signature", "") + delta.get("signature", "")


def _overloaded(event: dict[str, Any]) -> bool:
    error = event.get("error")
    return isinstance(error, dict) and error.get("type") == "overloaded_error"


def _loads(data: str) -> Any:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise errors.MalformedResponse("a stream event is not valid JSON") from None
    if not isinstance(value, dict):
        raise errors.MalformedResponse("a stream event is not a JSON object")
    return value


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    cached = int(raw.get("cache_read_input_tokens") or 0)
    created = int(raw.get("cache_creation_input_tokens") or 0)
    # Anthropic's input_tokens leaves out cached tokens; prompt_tokens counts them all.
    prompt = int(raw.get("input_tokens") or 0) + cached + created
    output = int(raw.get("output_tokens") or 0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=output,
        reasoning_tokens=0,
        cached_tokens=cached,
        total_tokens=prompt + output,
    )
