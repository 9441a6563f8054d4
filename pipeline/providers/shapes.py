"""The bodies providers send, as typed values: read once, at the adapter boundary.

Every model ignores fields it does not know and accepts what real servers send in
place of the documented shape (numbers as strings, `null` for an empty list). A body
that still does not fit is a `MalformedResponse` (retryable) whose message carries a
short, redacted snippet of what came back, so the run log shows what the server said.
A usage block that cannot be read is unknown (`None`), never guessed as 0: the answer
it came with is kept rather than paid for again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from pipeline import errors
from pipeline.types import Usage

SNIPPET_CHARS = 160


def _none_if_not_list(value: Any) -> Any:
    return value if isinstance(value, list) else None


def _none_if_not_dict(value: Any) -> Any:
    return value if isinstance(value, dict) else None


def _text_or_none(value: Any) -> Any:
    """Text content: a string, or the text parts of a list of content parts."""
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, list):
        parts = [p.get("text") for p in value if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    raise ValueError("content is neither text nor a list of parts")


def _count(value: Any) -> Any:
    """A token count: a non-negative integer, or unknown."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _money(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _optional_str(value: Any) -> Any:
    return value if isinstance(value, str) else None


Count = Annotated[int | None, BeforeValidator(_count)]
Money = Annotated[float | None, BeforeValidator(_money)]
OptionalStr = Annotated[str | None, BeforeValidator(_optional_str)]
Text = Annotated[str | None, BeforeValidator(_text_or_none)]
Details = Annotated[dict[str, Any] | None, BeforeValidator(_none_if_not_dict)]


class _Shape(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


# -- OpenAI Chat Completions -----------------------------------------------------------


class OpenAIFunction(_Shape):
    name: OptionalStr = None
    arguments: str | dict[str, Any] | None = None


class OpenAIToolCall(_Shape):
    index: int = 0
    id: OptionalStr = None
    function: OpenAIFunction = Field(default_factory=OpenAIFunction)


ToolCalls = Annotated[list[OpenAIToolCall] | None, BeforeValidator(_none_if_not_list)]


class OpenAIMessage(_Shape):
    content: Text = None
    refusal: OptionalStr = None  # the model declined: its words, with content null
    reasoning_content: OptionalStr = None
    reasoning: OptionalStr = None
    reasoning_details: Annotated[list[Any] | None, BeforeValidator(_none_if_not_list)] = None
    tool_calls: ToolCalls = None


class OpenAIChoice(_Shape):
    index: Count = None
    message: OpenAIMessage | None = None
    finish_reason: OptionalStr = None


class OpenAIUsage(_Shape):
    prompt_tokens: Count = None
    completion_tokens: Count = None
    total_tokens: Count = None
    prompt_tokens_details: Details = None
    completion_tokens_details: Details = None
    prompt_cache_hit_tokens: Count = None
    cost: Money = None  # OpenRouter and LiteLLM report what the call cost

    def to_usage(self) -> Usage | None:
        prompt, completion = self.prompt_tokens, self.completion_tokens
        if prompt is None and completion is None and self.total_tokens is None:
            return None
        prompt = prompt or 0
        completion = completion or 0
        cached = _count((self.prompt_tokens_details or {}).get("cached_tokens"))
        reasoning = _count((self.completion_tokens_details or {}).get("reasoning_tokens"))
        total = self.total_tokens
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            reasoning_tokens=reasoning or 0,
            cached_tokens=cached or self.prompt_cache_hit_tokens or 0,
            total_tokens=total if total is not None else prompt + completion,
        )


def _usage_or_none(value: Any) -> Any:
    return value if isinstance(value, dict) else None


UsageBlock = Annotated[OpenAIUsage | None, BeforeValidator(_usage_or_none)]


class OpenAIBody(_Shape):
    choices: list[OpenAIChoice]
    usage: UsageBlock = None
    model: OptionalStr = None
    system_fingerprint: OptionalStr = None
    service_tier: OptionalStr = None


class OpenAIDelta(_Shape):
    content: Text = None
    refusal: OptionalStr = None
    reasoning_content: OptionalStr = None
    reasoning: OptionalStr = None
    tool_calls: ToolCalls = None


class OpenAIChunkChoice(_Shape):
    index: Count = None
    delta: Annotated[OpenAIDelta | None, BeforeValidator(_none_if_not_dict)] = None
    finish_reason: OptionalStr = None


class OpenAIChunk(_Shape):
    choices: Annotated[list[OpenAIChunkChoice] | None, BeforeValidator(_none_if_not_list)] = None
    usage: UsageBlock = None
    model: OptionalStr = None
    system_fingerprint: OptionalStr = None
    service_tier: OptionalStr = None


# -- Anthropic Messages ----------------------------------------------------------------


class AnthropicBlock(_Shape):
    type: OptionalStr = None
    text: OptionalStr = None
    thinking: OptionalStr = None
    name: OptionalStr = None
    id: OptionalStr = None
    input: Any = None


class AnthropicUsage(_Shape):
    input_tokens: Count = None
    output_tokens: Count = None
    cache_read_input_tokens: Count = None
    cache_creation_input_tokens: Count = None
    output_tokens_details: Details = None  # thinking_tokens: part of output_tokens
    service_tier: OptionalStr = None  # standard, priority or batch

    def to_usage(self) -> Usage | None:
        if self.input_tokens is None and self.output_tokens is None:
            return None
        cached = self.cache_read_input_tokens or 0
        written = self.cache_creation_input_tokens or 0
        # input_tokens leaves out cached tokens; prompt_tokens counts them all.
        prompt = (self.input_tokens or 0) + cached + written
        output = self.output_tokens or 0
        thinking = _count((self.output_tokens_details or {}).get("thinking_tokens"))
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=output,
            reasoning_tokens=thinking or 0,
            cached_tokens=cached,
            total_tokens=prompt + output,
            cache_write_tokens=written,
        )


class AnthropicBody(_Shape):
    content: list[AnthropicBlock]
    usage: Annotated[AnthropicUsage | None, BeforeValidator(_usage_or_none)] = None
    stop_reason: OptionalStr = None
    model: OptionalStr = None


# -- reading -----------------------------------------------------------------------------


Shape = TypeVar("Shape", bound=BaseModel)


def read(
    shape: type[Shape], payload: Any, content: bytes | str, redact: Callable[[str], str]
) -> Shape:
    """`payload` as `shape`, or a MalformedResponse that shows what came back."""
    try:
        return shape.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise malformed(f"unexpected response shape at {where}", content, redact) from None


def malformed(
    reason: str,
    content: bytes | str,
    redact: Callable[[str], str],
    *,
    status: int | None = 200,
    headers: Mapping[str, str] | None = None,
) -> errors.MalformedResponse:
    """A retryable error whose message carries a short redacted snippet of the body."""
    kind = (headers or {}).get("content-type")
    kind_note = f" ({kind})" if kind else ""
    return errors.MalformedResponse(
        f"{reason}{kind_note}: {snippet(content, redact)}", status=status
    )


def snippet(content: bytes | str, redact: Callable[[str], str]) -> str:
    text = content.decode("utf-8", "replace") if isinstance(content, bytes) else content
    text = redact(" ".join(text.split()))
    if not text:
        return "(empty body)"
    return repr(text[:SNIPPET_CHARS] + ("..." if len(text) > SNIPPET_CHARS else ""))
