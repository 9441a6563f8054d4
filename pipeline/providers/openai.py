"""OpenAI Chat Completions, as spoken by OpenAI, xAI, ModelsLab, OpenRouter, vLLM, Ollama."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import orjson

from pipeline import errors
from pipeline.config import ProviderSettings
from pipeline.http import HttpClient, HttpResponse
from pipeline.providers import sse, tools
from pipeline.providers.base import Provider, register
from pipeline.providers.classify import classify, classify_error_in_body, has_error
from pipeline.providers.headers import parse_rate_limits, response_cost
from pipeline.providers.shapes import (
    OpenAIBody,
    OpenAIChunk,
    OpenAIDelta,
    OpenAIFunction,
    OpenAIMessage,
    OpenAIToolCall,
    OpenAIUsage,
    malformed,
    read,
)
from pipeline.structured import SCHEMA_NAME
from pipeline.types import REFUSAL, ChatRequest, Completion, RateLimitInfo

_THINK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)


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
        if settings.tools:
            self.body_base["tools"] = tools.to_openai(settings.tools)
        if settings.tool_choice is not None:
            self.body_base["tool_choice"] = settings.tool_choice
        self.schema_instructions: str | None = None
        self.schema_via_tool = False
        if settings.schema is not None:
            self._ask_for_schema(settings)
        if settings.stream:
            self.body_base["stream"] = True
            self.body_base["stream_options"] = {"include_usage": True}

    def _ask_for_schema(self, settings: ProviderSettings) -> None:
        schema = settings.schema
        assert schema is not None
        mode = settings.preset.structured_output
        if mode == "json_schema":
            self.body_base["response_format"] = schema.response_format()
        elif mode == "json_object":
            self.body_base["response_format"] = {"type": "json_object"}
            self.schema_instructions = schema.instructions()
        else:
            name = SCHEMA_NAME
            self.body_base["tools"] = [
                *self.body_base.get("tools", []),
                {"type": "function", "function": {"name": name, "parameters": schema.schema}},
            ]
            self.body_base["tool_choice"] = {"type": "function", "function": {"name": name}}
            self.schema_via_tool = True

    def _messages(self, request: ChatRequest) -> list[dict[str, str]]:
        if self.schema_instructions is None:
            return request.messages
        messages = list(request.messages)
        if messages and messages[0]["role"] == "system":
            content = f"{messages[0]['content']}\n\n{self.schema_instructions}"
            messages[0] = {"role": "system", "content": content}
        else:
            messages.insert(0, {"role": "system", "content": self.schema_instructions})
        return messages

    async def list_models(self) -> list[str]:
        base = self.url.removesuffix("/chat/completions")
        payload = await self._get_json(f"{base}/models", self.headers)
        data = payload.get("data") if isinstance(payload, dict) else None
        return [str(m.get("id")) for m in data or [] if isinstance(m, dict)]

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        messages = self._messages(request)
        body = {**self.body_base, "messages": messages}
        cache = self.settings.prompt_cache
        if cache and self.settings.preset.prompt_cache_key:
            body["prompt_cache_key"] = cache if isinstance(cache, str) else prefix_key(messages)
        return body

    def parse_body(self, status: int, body: Any) -> Completion:
        completion = self.parse(HttpResponse(status, {}, orjson.dumps(body)))
        return _schema_answer_from_tool(completion) if self.schema_via_tool else completion

    async def complete(self, request: ChatRequest) -> Completion:
        body = orjson.dumps(self.request_body(request))
        if self.settings.stream:
            completion = await self._stream(body)
        else:
            completion = self.parse(await self.client.post(self.url, body, self.headers))
        if self.schema_via_tool:
            return _schema_answer_from_tool(completion)
        return completion

    async def _assemble(
        self, lines: AsyncIterator[bytes], headers: Mapping[str, str]
    ) -> Completion:
        assembler = _StreamAssembler(self.redact)
        async for _, data in sse.events(lines):
            if data.strip() == "[DONE]":
                assembler.done = True
                break
            chunk = _loads(data, self.redact)
            if has_error(chunk):
                raise classify_error_in_body(chunk, headers, self.redact)
            assembler.add(chunk, data)
        return assembler.finish(parse_rate_limits(headers), response_cost(headers))

    def parse(self, response: HttpResponse) -> Completion:
        status, headers = response.status, response.headers
        try:
            payload = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            payload = None
        if status >= 400:
            error = self.classify(status, payload, headers)
            error.rate_limits = parse_rate_limits(headers)
            raise error
        payload = self._answer_object(payload, response)
        body = read(OpenAIBody, payload, response.content, self.redact)
        if not body.choices:
            raise malformed("response has no choices", response.content, self.redact)
        # With several choices (n > 1, refused by validate) the first is the answer.
        choice = next((c for c in body.choices if not c.index), body.choices[0])
        if choice.message is None:
            raise malformed("choices[0] has no message", response.content, self.redact)
        completion = _completion(
            choice.message,
            choice.finish_reason,
            body.usage,
            body.model,
            parse_rate_limits(headers),
            response_cost(headers),
            lambda: malformed(_EMPTY, response.content, self.redact),
        )
        return dataclasses.replace(
            completion, system_fingerprint=body.system_fingerprint, service_tier=body.service_tier
        )

    def classify(self, status: int, payload: Any, headers: Any) -> errors.ProviderError:
        return classify(status, payload, headers, self.redact)


_EMPTY = "answer has no content, no tool call and no usage"


def _completion(
    message: OpenAIMessage,
    finish_reason: str | None,
    usage_block: OpenAIUsage | None,
    model: str | None,
    rate_limits: RateLimitInfo | None,
    header_cost: float | None,
    empty: Callable[[], errors.MalformedResponse],
) -> Completion:
    content = message.content or ""
    if message.refusal:
        # A refusal is the model's answer to this row, kept in its words: never an
        # empty success, never a schema mismatch to be asked (and paid for) again.
        content, finish_reason = message.refusal, REFUSAL
    reasoning = _reasoning(message)
    if reasoning is None and (think := _THINK.match(content)):
        reasoning = think.group(1).strip()
        content = content[think.end() :]
    calls = [
        tools.normalized_call(call.function.name or "", call.function.arguments or "", call.id)
        for call in message.tool_calls or []
    ]
    usage = usage_block.to_usage() if usage_block is not None else None
    if not content and not calls and usage is None:
        raise empty()
    reported = header_cost
    if reported is None and usage_block is not None:
        reported = usage_block.cost
    return Completion(
        response=content,
        reasoning=reasoning,
        usage=usage,
        finish_reason=finish_reason,
        model=model,
        rate_limits=rate_limits,
        tool_calls=calls or None,
        reported_cost_usd=reported,
    )


def prefix_key(messages: list[dict[str, str]]) -> str:
    """A cache key naming the stable prefix (every message but the last), so requests
    that share it are routed to the same cache."""
    digest = hashlib.sha256(orjson.dumps(messages[:-1])).hexdigest()
    return f"pipeline-{digest[:24]}"


def _schema_answer_from_tool(completion: Completion) -> Completion:
    """With schemas asked for as a forced tool call, the call's arguments are the answer."""
    for call in completion.tool_calls or []:
        if call["name"] == SCHEMA_NAME:
            arguments = call["arguments"]
            text = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
            # The forced call is the answer: it stopped as asked, unless cut or filtered.
            finish = "stop" if completion.finish_reason == "tool_calls" else None
            return dataclasses.replace(
                completion,
                response=text,
                tool_calls=None,
                finish_reason=finish or completion.finish_reason,
            )
    return completion


def _loads(data: str, redact: Callable[[str], str]) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise malformed("a stream event is not valid JSON", data, redact) from None
    if not isinstance(value, dict):
        raise malformed("a stream event is not a JSON object", data, redact)
    return value


class _StreamAssembler:
    """Joins OpenAI chunks into the body a non-streamed call would have returned."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        self.redact = redact
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.reasoning: dict[str, list[str]] = {"reasoning_content": [], "reasoning": []}
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: OpenAIUsage | None = None
        self.model: str | None = None
        self.system_fingerprint: str | None = None
        self.service_tier: str | None = None
        self.done = False
        self.last = ""

    def add(self, payload: dict[str, Any], data: str) -> None:
        chunk = read(OpenAIChunk, payload, data, self.redact)
        self.last = data
        self.model = chunk.model or self.model
        self.system_fingerprint = chunk.system_fingerprint or self.system_fingerprint
        self.service_tier = chunk.service_tier or self.service_tier
        if chunk.usage is not None:
            self.usage = chunk.usage
        for choice in chunk.choices or []:
            if choice.index:
                continue  # another of n choices: never interleaved into the first
            delta = choice.delta or OpenAIDelta()
            if delta.content:
                self.content.append(delta.content)
            if delta.refusal:
                self.refusal.append(delta.refusal)
            for field, parts in self.reasoning.items():
                if text := getattr(delta, field):
                    parts.append(text)
            for call in delta.tool_calls or []:
                entry = self.calls.setdefault(call.index, {"id": None, "name": "", "args": []})
                entry["id"] = call.id or entry["id"]
                entry["name"] += call.function.name or ""
                arguments = call.function.arguments
                if isinstance(arguments, dict):
                    arguments = orjson.dumps(arguments).decode()
                entry["args"].append(arguments or "")
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason

    def finish(self, rate_limits: RateLimitInfo | None, header_cost: float | None) -> Completion:
        if not self.done or self.finish_reason is None:
            # A half answer must never be stored as a success: this is retried.
            raise malformed(
                "the stream was cut off before the answer finished", self.last, self.redact
            )
        message = OpenAIMessage(
            content="".join(self.content),
            refusal="".join(self.refusal) or None,
            reasoning_content="".join(self.reasoning["reasoning_content"]) or None,
            reasoning="".join(self.reasoning["reasoning"]) or None,
            tool_calls=[
                OpenAIToolCall(
                    index=index,
                    id=c["id"],
                    function=OpenAIFunction(name=c["name"], arguments="".join(c["args"])),
                )
                for index, c in sorted(self.calls.items())
            ]
            or None,
        )
        completion = _completion(
            message,
            self.finish_reason,
            self.usage,
            self.model,
            rate_limits,
            header_cost,
            lambda: malformed(_EMPTY, self.last, self.redact),
        )
        return dataclasses.replace(
            completion, system_fingerprint=self.system_fingerprint, service_tier=self.service_tier
        )


def _reasoning(message: OpenAIMessage) -> str | None:
    for value in (message.reasoning_content, message.reasoning):
        if value:
            return value
    details = message.reasoning_details
    if details:
        texts = [
            text
            for d in details
            if isinstance(d, dict) and isinstance(text := d.get("text") or d.get("summary"), str)
        ]
        if texts:
            return "\n".join(texts)
    return None
