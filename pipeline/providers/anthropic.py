"""Anthropic Messages (`POST {base}/v1/messages`), as Anthropic and ModelsLab serve it.

The system prompt travels outside the messages, `max_tokens` is required, text
blocks become `response`, `thinking` blocks become `reasoning` (redacted thinking
is noted, not decoded), `tool_use` blocks become tool calls, and usage maps onto
the same columns as every other protocol. A schema is asked for as a forced tool
call, which is how this API returns structured output.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson

from pipeline import errors
from pipeline.config import ProviderSettings
from pipeline.http import HttpClient, HttpResponse
from pipeline.providers import sse, tools
from pipeline.providers.base import Provider, register
from pipeline.providers.classify import (
    classify,
    embedded_status,
    has_error,
)
from pipeline.providers.headers import parse_rate_limits, response_cost
from pipeline.providers.shapes import AnthropicBody, malformed, read
from pipeline.structured import SCHEMA_NAME
from pipeline.types import PAUSED_TURN, REFUSAL, ChatRequest, Completion, Message

API_VERSION = "2023-06-01"
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": REFUSAL,
    "pause_turn": PAUSED_TURN,
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
        turns: list[dict[str, Any]] = [m for m in messages if m["role"] != "system"]
        body: dict[str, Any] = {**self.body_base, "messages": turns}
        if system:
            body["system"] = system
        if self.settings.prompt_cache:
            _mark_prefix_cacheable(body)
        return body

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        return self.body(request.messages)

    def parse_body(self, status: int, body: Any) -> Completion:
        return self.parse(HttpResponse(status, {}, orjson.dumps(body)))

    async def list_models(self) -> list[str]:
        url = self.url.removesuffix("/messages") + "/models"
        payload = await self._get_json(url, self.headers)
        data = payload.get("data") if isinstance(payload, dict) else None
        return [str(m.get("id")) for m in data or [] if isinstance(m, dict)]

    async def count_tokens(self, messages: list[Message]) -> int | None:
        if not self.settings.preset.count_tokens:
            return None
        body = self.body(messages)
        request = {k: body[k] for k in ("model", "messages", "system", "tools") if k in body}
        payload = await self._post_json(self.url + "/count_tokens", request, self.headers)
        count = payload.get("input_tokens") if isinstance(payload, dict) else None
        if isinstance(count, bool) or not isinstance(count, int):
            raise malformed("count_tokens answer has no input_tokens", str(payload), self.redact)
        return count

    async def complete(self, request: ChatRequest) -> Completion:
        body = orjson.dumps(self.body(request.messages))
        if self.settings.stream:
            return await self._stream(body)
        return self.parse(await self.client.post(self.url, body, self.headers))

    def parse(self, response: HttpResponse) -> Completion:
        status, headers = response.status, response.headers
        try:
            payload = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            payload = None
        if status >= 400:
            raise self._error(status, payload, headers)
        payload = self._answer_object(payload, response)
        if not isinstance(payload.get("content"), list):
            raise malformed("response has no content blocks", response.content, self.redact)
        body = read(AnthropicBody, payload, response.content, self.redact)
        return self._completion(body, headers, response.content)

    def _error(self, status: int, payload: Any, headers: Any) -> errors.ProviderError:
        error = classify(status, payload, headers, self.redact)
        error.rate_limits = parse_rate_limits(headers)
        return error

    def _completion(
        self, body: AnthropicBody, headers: Mapping[str, str], content: bytes | str
    ) -> Completion:
        text: list[str] = []
        thinking: list[str] = []
        calls: list[dict[str, Any]] = []
        for block in body.content:
            if block.type == "text":
                text.append(block.text or "")
            elif block.type == "thinking":
                thinking.append(block.thinking or "")
            elif block.type == "redacted_thinking":
                thinking.append(REDACTED)
            elif block.type == "tool_use":
                calls.append(tools.normalized_call(block.name or "", block.input, block.id))
        # As the vendor's SDK joins them (`get_final_text`): no separator.
        response = "".join(text)
        finish = _finish_reason(body.stop_reason)
        if self.schema_via_tool:
            answer = next((c for c in calls if c["name"] == SCHEMA_NAME), None)
            if answer is not None:
                calls.remove(answer)
                response = _arguments_text(answer["arguments"])
                # The forced call is the answer: it stopped as asked, unless cut short.
                finish = "stop" if finish == "tool_calls" else finish
        usage = body.usage.to_usage() if body.usage is not None else None
        if not response and not calls and usage is None:
            raise malformed(
                "answer has no content, no tool call and no usage", content, self.redact
            )
        return Completion(
            response=response,
            reasoning="\n".join(thinking) if thinking else None,
            usage=usage,
            finish_reason=finish,
            model=body.model,
            rate_limits=parse_rate_limits(headers),
            tool_calls=calls or None,
            reported_cost_usd=response_cost(headers),
            service_tier=body.usage.service_tier if body.usage is not None else None,
        )

    async def _assemble(
        self, lines: AsyncIterator[bytes], headers: Mapping[str, str]
    ) -> Completion:
        message: dict[str, Any] | None = None
        blocks: dict[int, dict[str, Any]] = {}
        partial_json: dict[int, list[str]] = {}
        finished = False
        last = ""
        async for name, data in sse.events(lines):
            last = data
            event = _loads(data, self.redact)
            kind = event.get("type", name)
            if kind == "error" or has_error(event):
                status = embedded_status(event) or (529 if _overloaded(event) else 500)
                raise self._error(status, event, headers)
            try:
                if kind == "message_start":
                    message = dict(event["message"])
                elif kind == "content_block_start":
                    blocks[int(event["index"])] = dict(event["content_block"])
                elif kind == "content_block_delta":
                    index = int(event["index"])
                    _apply_delta(blocks[index], event["delta"], partial_json, index)
                elif kind == "message_delta" and message is not None:
                    message.update(event.get("delta") or {})
                    message["usage"] = _merged_usage(message.get("usage"), event.get("usage"))
                elif kind == "message_stop":
                    finished = True
            except (KeyError, TypeError, ValueError, AttributeError):
                raise malformed(f"unexpected {kind} event", data, self.redact) from None
        if message is None or not finished:
            # A half answer must never be stored as a success: this is retried.
            raise malformed("the stream was cut off before the answer finished", last, self.redact)
        cut = message.get("stop_reason") == "max_tokens"
        for index, parts in partial_json.items():
            joined = "".join(parts)
            try:
                blocks[index]["input"] = orjson.loads(joined) if joined else {}
            except orjson.JSONDecodeError:
                if not cut:
                    raise malformed(
                        "a tool call's input is not valid JSON", joined, self.redact
                    ) from None
                # Cut by max_tokens inside the call: an answer (length), kept as raw text.
                blocks[index]["input"] = joined
        message["content"] = [blocks[i] for i in sorted(blocks)]
        body = read(AnthropicBody, message, last, self.redact)
        return self._completion(body, headers, last)


def _apply_delta(
    block: dict[str, Any], delta: dict[str, Any], partial_json: dict[int, list[str]], index: int
) -> None:
    kind = delta.get("type")
    if kind == "text_delta":
        block["text"] = _text(block.get("text")) + _text(delta.get("text"))
    elif kind == "thinking_delta":
        block["thinking"] = _text(block.get("thinking")) + _text(delta.get("thinking"))
    elif kind == "input_json_delta":
        partial_json.setdefault(index, []).append(_text(delta.get("partial_json")))
    elif kind == "signature_delta":
        block["signature"] = _text(block.get("signature")) + _text(delta.get("signature"))


EPHEMERAL = {"type": "ephemeral"}


def _mark_prefix_cacheable(body: dict[str, Any]) -> None:
    """One cache breakpoint at the end of the stable prefix: the last turn before the
    row's own message, else the system prompt, else the last tool. Everything before a
    breakpoint (tools, system, turns) is cached up to it."""
    turns = body["messages"]
    if len(turns) > 1:
        last = turns[-2]
        block = {"type": "text", "text": last["content"], "cache_control": EPHEMERAL}
        body["messages"] = [*turns[:-2], {**last, "content": [block]}, turns[-1]]
    elif "system" in body:
        body["system"] = [{"type": "text", "text": body["system"], "cache_control": EPHEMERAL}]
    elif body.get("tools"):
        body["tools"] = [*body["tools"][:-1], {**body["tools"][-1], "cache_control": EPHEMERAL}]


def _merged_usage(known: Any, update: Any) -> dict[str, Any]:
    """A `message_delta`'s usage over what `message_start` said: a field it sends as
    null (its type allows that) leaves the count already known."""
    merged = dict(known) if isinstance(known, dict) else {}
    if isinstance(update, dict):
        merged.update((k, v) for k, v in update.items() if v is not None)
    return merged


def _arguments_text(arguments: Any) -> str:
    """A tool call's input as the JSON text of the answer (raw text when it was cut)."""
    return arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()


def _finish_reason(stop: str | None) -> str | None:
    return STOP_REASONS.get(stop, stop) if stop is not None else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _overloaded(event: dict[str, Any]) -> bool:
    error = event.get("error")
    return isinstance(error, dict) and error.get("type") == "overloaded_error"


def _loads(data: str, redact: Callable[[str], str]) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise malformed("a stream event is not valid JSON", data, redact) from None
    if not isinstance(value, dict):
        raise malformed("a stream event is not a JSON object", data, redact)
    return value
