"""OpenAI Chat Completions, as spoken by OpenAI, xAI, ModelsLab, OpenRouter, vLLM, Ollama."""

from __future__ import annotations

import dataclasses
import re
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
from pipeline.types import ChatRequest, Completion, Usage

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
        return [str(m.get("id")) for m in payload.get("data") or [] if isinstance(m, dict)]

    def request_body(self, request: ChatRequest) -> dict[str, Any]:
        return {**self.body_base, "messages": self._messages(request)}

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

    async def _stream(self, body: bytes) -> Completion:
        async with self.client.stream(self.url, body, self.headers) as response:
            if response.status >= 400:
                return self.parse(
                    HttpResponse(response.status, response.headers, await response.read())
                )
            assembler = _StreamAssembler()
            async for _, data in sse.events(response.lines()):
                if data.strip() == "[DONE]":
                    assembler.done = True
                    break
                chunk = _loads(data)
                if not isinstance(chunk, dict):
                    raise errors.MalformedResponse("a stream event is not a JSON object")
                if "error" in chunk or chunk.get("status") == "error":
                    raise self.classify(200, chunk, response.headers)
                assembler.add(chunk)
            payload, choice = assembler.finish()
            return _completion(payload, choice, parse_rate_limits(response.headers))

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
            if has_error(payload):
                raise self.classify(status, payload, response.headers)
            raise errors.MalformedResponse("response has no choices", status=status)
        return _completion(payload, choices[0], parse_rate_limits(response.headers))

    def classify(self, status: int, payload: Any, headers: Any) -> errors.ProviderError:
        return classify(status, payload, headers, self.redact)


def _completion(payload: dict[str, Any], choice: Any, rate_limits: Any) -> Completion:
    if not isinstance(choice, dict):
        raise errors.MalformedResponse("choices[0] is not an object")
    message = choice.get("message") or {}
    content = message.get("content") or ""
    reasoning = _reasoning(message)
    if reasoning is None and (think := _THINK.match(content)):
        reasoning = think.group(1).strip()
        content = content[think.end() :]
    calls = [
        tools.normalized_call(
            (call.get("function") or {}).get("name", ""),
            (call.get("function") or {}).get("arguments", ""),
            call.get("id"),
        )
        for call in message.get("tool_calls") or []
        if isinstance(call, dict)
    ]
    return Completion(
        response=content,
        reasoning=reasoning,
        usage=_usage(payload.get("usage")),
        finish_reason=choice.get("finish_reason"),
        model=payload.get("model"),
        rate_limits=rate_limits,
        tool_calls=calls or None,
    )


def _schema_answer_from_tool(completion: Completion) -> Completion:
    """With schemas asked for as a forced tool call, the call's arguments are the answer."""
    for call in completion.tool_calls or []:
        if call["name"] == SCHEMA_NAME:
            arguments = call["arguments"]
            text = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
            return dataclasses.replace(completion, response=text, tool_calls=None)
    return completion


def _loads(data: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise errors.MalformedResponse("a stream event is not valid JSON") from None


class _StreamAssembler:
    """Joins OpenAI chunks into the body a non-streamed call would have returned."""

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: dict[str, list[str]] = {"reasoning_content": [], "reasoning": []}
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: Any = None
        self.model: str | None = None
        self.done = False

    def add(self, chunk: dict[str, Any]) -> None:
        self.model = chunk.get("model") or self.model
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self.content.append(delta["content"])
            for field, parts in self.reasoning.items():
                if isinstance(delta.get(field), str):
                    parts.append(delta[field])
            for call in delta.get("tool_calls") or []:
                entry = self.calls.setdefault(
                    call.get("index", 0), {"id": None, "name": "", "args": []}
                )
                entry["id"] = call.get("id") or entry["id"]
                function = call.get("function") or {}
                entry["name"] += function.get("name") or ""
                entry["args"].append(function.get("arguments") or "")
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]

    def finish(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if not self.done or self.finish_reason is None:
            # A half answer must never be stored as a success: this is retried.
            raise errors.MalformedResponse("the stream was cut off before the answer finished")
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        for field, parts in self.reasoning.items():
            if parts:
                message[field] = "".join(parts)
        if self.calls:
            message["tool_calls"] = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": "".join(c["args"])},
                }
                for _, c in sorted(self.calls.items())
            ]
        payload = {"model": self.model, "usage": self.usage}
        return payload, {"message": message, "finish_reason": self.finish_reason}


def _reasoning(message: dict[str, Any]) -> str | None:
    for field in ("reasoning_content", "reasoning"):
        value = message.get(field)
        if isinstance(value, str) and value:
            return value
    details = message.get("reasoning_details")
    if isinstance(details, list):
        texts = [
            text
            for d in details
            if isinstance(d, dict) and isinstance(text := d.get("text") or d.get("summary"), str)
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
