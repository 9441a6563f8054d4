"""Success payloads (plain and streamed) for the OpenAI and Anthropic wire formats."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import orjson

from .behaviour import Completion

_ids = itertools.count(1)
FINGERPRINT = "fp_sim"


def next_id(prefix: str) -> str:
    return f"{prefix}sim{next(_ids):015x}"


def _pieces(text: str, size: int) -> Iterator[str]:
    for i in range(0, len(text), size):
        yield text[i : i + size]


# --- OpenAI Chat Completions --------------------------------------------------------


def openai_content(c: Completion, reasoning_style: str) -> str | None:
    """Message content as sent (with an inline ``<think>`` block for that style); None
    for a tool call without such a block, and for a refusal (its text is ``refusal``)."""
    if c.finish == "refusal":
        return None
    if reasoning_style == "think" and c.reasoning:
        return f"<think>{c.reasoning}</think>{c.content}"
    if c.tool_call is not None:
        return None
    return c.content


def openai_tool_calls(c: Completion) -> list[dict[str, Any]]:
    tc = c.tool_call
    if tc is None:
        return []
    fn = {"name": tc.name, "arguments": tc.arguments}
    return [{"id": f"call_{tc.key}", "type": "function", "function": fn}]


def openai_usage(c: Completion, usage_style: str) -> dict[str, Any]:
    completion = c.completion_tokens
    if usage_style == "openai":
        completion += c.reasoning_tokens
    usage: dict[str, Any] = {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": c.prompt_tokens + c.completion_tokens + c.reasoning_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": c.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    if usage_style == "xai":
        usage["prompt_tokens_details"]["text_tokens"] = c.prompt_tokens
        usage["prompt_tokens_details"]["image_tokens"] = 0
        usage["num_sources_used"] = 0
    return usage


def openai_finish(c: Completion) -> str:
    """Chat Completions ends a refusal with ``stop`` (the text is in ``refusal``) and
    knows no paused turns."""
    return "stop" if c.finish in ("refusal", "pause_turn") else c.finish


def served_tier(body: dict[str, Any]) -> str:
    """The service tier an OpenAI answer reports: the one asked for, ``auto`` as
    ``default``."""
    asked = body.get("service_tier")
    return asked if isinstance(asked, str) and asked not in ("auto", "") else "default"


def openai_response(
    c: Completion, model: str, reasoning_style: str, usage_style: str, tier: str = "default"
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": openai_content(c, reasoning_style),
        "refusal": c.content if c.finish == "refusal" else None,
    }
    if c.reasoning and reasoning_style in ("reasoning_content", "reasoning"):
        message[reasoning_style] = c.reasoning
    if c.tool_call is not None:
        message["tool_calls"] = openai_tool_calls(c)
    return {
        "id": next_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": openai_finish(c)}
        ],
        "usage": openai_usage(c, usage_style),
        "system_fingerprint": FINGERPRINT,
        "service_tier": tier,
    }


def openai_stream_events(
    c: Completion,
    model: str,
    reasoning_style: str,
    usage_style: str,
    include_usage: bool,
    chunk_chars: int,
    tier: str = "default",
) -> list[bytes]:
    """Every SSE event of a streamed completion, ``data: [DONE]`` included."""
    cid = next_id("chatcmpl-")
    created = int(time.time())
    events: list[bytes] = []

    def chunk(delta: dict[str, Any], finish: str | None = None) -> None:
        obj: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "service_tier": tier,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None
        events.append(b"data: " + orjson.dumps(obj) + b"\n\n")

    content = openai_content(c, reasoning_style)
    chunk({"role": "assistant", "content": "" if content is not None else None})
    if c.reasoning and reasoning_style in ("reasoning_content", "reasoning"):
        for piece in _pieces(c.reasoning, chunk_chars):
            chunk({"content": None, reasoning_style: piece})
    for piece in _pieces(content or "", chunk_chars):
        chunk({"content": piece})
    if c.finish == "refusal":
        for piece in _pieces(c.content, chunk_chars):
            chunk({"refusal": piece})
    tc = c.tool_call
    if tc is not None:
        fn = {"name": tc.name, "arguments": ""}
        call = {"index": 0, "id": f"call_{tc.key}", "type": "function", "function": fn}
        chunk({"tool_calls": [call]})
        for piece in _pieces(tc.arguments, chunk_chars):
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    chunk({}, openai_finish(c))
    if include_usage:
        obj = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": FINGERPRINT,
            "service_tier": tier,
            "choices": [],
            "usage": openai_usage(c, usage_style),
        }
        events.append(b"data: " + orjson.dumps(obj) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


# --- Anthropic Messages ---------------------------------------------------------------

_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "content_filter": "refusal",
    "tool_calls": "tool_use",
    "refusal": "refusal",
    "pause_turn": "pause_turn",
}


def anthropic_usage(
    c: Completion, thinking_details: bool = False, tier: str = "standard"
) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "service_tier": tier,
        "input_tokens": c.prompt_tokens - c.cached_tokens - c.cache_write_tokens,
        "output_tokens": c.completion_tokens + c.reasoning_tokens,
        "cache_creation_input_tokens": c.cache_write_tokens,
        "cache_read_input_tokens": c.cached_tokens,
    }
    if thinking_details:
        usage["output_tokens_details"] = {"thinking_tokens": c.reasoning_tokens}
    return usage


def _delta_usage(usage: dict[str, Any], style: str) -> dict[str, Any]:
    """A ``message_delta``'s usage in one of the forms its type allows."""
    if style == "cumulative":
        return usage
    if style == "nulls":
        return {**{k: None for k in usage}, "output_tokens": usage["output_tokens"]}
    return {"output_tokens": usage["output_tokens"]}


def _server_tool_use(c: Completion) -> dict[str, Any]:
    """The web search a paused turn was running when the server stopped it."""
    return {
        "type": "server_tool_use",
        "id": f"srvtoolu_{c.prompt_tokens:08d}",
        "name": "web_search",
        "input": {"query": c.content[:40]},
    }


def anthropic_response(
    c: Completion, model: str, thinking_details: bool = False, tier: str = "standard"
) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []
    if c.reasoning:
        blocks.append({"type": "thinking", "thinking": c.reasoning, "signature": "sig"})
    tc = c.tool_call
    if tc is not None:
        blocks.append(
            {"type": "tool_use", "id": f"toolu_{tc.key}", "name": tc.name, "input": tc.input}
        )
    else:
        blocks.append({"type": "text", "text": c.content})
    if c.finish == "pause_turn":
        blocks.append(_server_tool_use(c))
    return {
        "id": next_id("msg_"),
        "type": "message",
        "role": "assistant",
        "content": blocks,
        "model": model,
        "stop_reason": _STOP.get(c.finish, "end_turn"),
        "stop_sequence": None,
        "usage": anthropic_usage(c, thinking_details, tier),
    }


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def anthropic_stream_events(
    c: Completion,
    model: str,
    chunk_chars: int,
    delta_usage: str = "output",
    thinking_details: bool = False,
) -> list[bytes]:
    usage = anthropic_usage(c, thinking_details)
    start_usage = {**usage, "output_tokens": 1}
    message: dict[str, Any] = {
        "id": next_id("msg_"),
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    ev = [
        _sse("message_start", {"type": "message_start", "message": message}),
        _sse("ping", {"type": "ping"}),
    ]
    index = 0

    def block(start: dict[str, Any], deltas: list[dict[str, Any]]) -> None:
        ev.append(
            _sse(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": start},
            )
        )
        for d in deltas:
            ev.append(
                _sse(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": d},
                )
            )
        ev.append(_sse("content_block_stop", {"type": "content_block_stop", "index": index}))

    if c.reasoning:
        deltas = [
            {"type": "thinking_delta", "thinking": p} for p in _pieces(c.reasoning, chunk_chars)
        ]
        deltas.append({"type": "signature_delta", "signature": "sig"})
        block({"type": "thinking", "thinking": "", "signature": ""}, deltas)
        index += 1
    tc = c.tool_call
    if tc is not None:
        block(
            {"type": "tool_use", "id": f"toolu_{tc.key}", "name": tc.name, "input": {}},
            [
                {"type": "input_json_delta", "partial_json": p}
                for p in _pieces(tc.arguments, chunk_chars)
            ],
        )
    else:
        block(
            {"type": "text", "text": ""},
            [{"type": "text_delta", "text": p} for p in _pieces(c.content, chunk_chars)],
        )
    if c.finish == "pause_turn":
        index += 1
        server = _server_tool_use(c)
        arguments = orjson.dumps(server["input"]).decode()
        block(
            {**server, "input": {}},
            [{"type": "input_json_delta", "partial_json": p} for p in _pieces(arguments, 8)],
        )
    ev.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": _STOP.get(c.finish, "end_turn"), "stop_sequence": None},
                "usage": _delta_usage(usage, delta_usage),
            },
        )
    )
    ev.append(_sse("message_stop", {"type": "message_stop"}))
    return ev


# --- canned answers -------------------------------------------------------------------


def replay_events(events: list[dict[str, Any]], anthropic: bool) -> list[bytes]:
    """A canned stream framed as the protocol frames it."""
    if anthropic:
        return [_sse(str(e.get("type")), e) for e in events]
    return [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
