"""Conformance with the vendors' published types (the official `openai` and `anthropic`
SDKs, dev dependencies; the adapters never import them).

Requests: every body an adapter builds validates against the SDK's request type, with
no key the type does not know. Answers: a corpus of valid bodies, each checked against
the SDK's response types (streams event by event), is replayed by the simulator to the
real CLI, plain, streamed and through the batch API, and every stored row is asserted
field by field: response, reasoning, finish reason, usage, tool calls, error class,
one attempt, nothing paid twice.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import anthropic.types as anthropic_types
import openai.types.chat as openai_types
import orjson
import polars as pl
import pytest
from anthropic.types import message_create_params
from conftest import make_job, run_cli
from openai.types.chat import completion_create_params
from pydantic import TypeAdapter, ValidationError
from typing_extensions import is_typeddict

from pipeline.config import resolve_provider
from pipeline.http import HttpClient
from pipeline.providers import create_provider
from pipeline.simulator import RunningSimulator
from pipeline.spec import ModelSpec
from pipeline.structured import OutputSchema
from pipeline.types import ChatRequest

# -- requests ------------------------------------------------------------------------------

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Great kettle!"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "Summarize: the lamp flickers"},
]
REQUEST = ChatRequest(0, "r0", MESSAGES, "h", 20, 200)
CUSTOM_TOOL = {
    "name": "lookup",
    "description": "Look a city up.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
SCHEMA = {"label": {"enum": ["positive", "negative"]}, "confidence": "number"}
THINKING = {"type": "enabled", "budget_tokens": 1024}

REQUEST_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "openai-params": (
        "openai",
        {"params": {"temperature": 0.2, "max_tokens": 50, "top_p": 0.9, "seed": 7}},
    ),
    "openai-stream": ("openai", {"stream": True}),
    "openai-schema": ("openai", {"schema": SCHEMA}),
    "openai-cache": ("openai", {"prompt_cache": True}),
    "anthropic-cache": ("anthropic", {"prompt_cache": True, "tools": [CUSTOM_TOOL]}),
    "openai-tools": ("openai", {"tools": [CUSTOM_TOOL], "tool_choice": "required"}),
    "xai-reasoning": ("xai", {"params": {"reasoning_effort": "low", "max_tokens": 100}}),
    "anthropic-params": ("anthropic", {"params": {"max_tokens": 50, "stop_sequences": ["###"]}}),
    "anthropic-stream": ("anthropic", {"stream": True}),
    "anthropic-schema": ("anthropic", {"schema": SCHEMA}),
    "anthropic-tools": (
        "anthropic",
        {"tools": [CUSTOM_TOOL, WEB_SEARCH], "tool_choice": "required"},
    ),
    "anthropic-thinking": (
        "anthropic",
        {"params": {"max_tokens": 2048, "thinking": THINKING}, "tools": [WEB_SEARCH]},
    ),
}


def request_body(provider: str, options: dict[str, Any]) -> dict[str, Any]:
    schema = options.pop("schema", None)
    spec = ModelSpec(
        provider=provider, model="m", base_url="http://127.0.0.1:9/v1", api_key_env=None, **options
    )
    output = OutputSchema(schema) if schema else None
    adapter = create_provider(resolve_provider(spec, schema=output), HttpClient(1, 10))
    return adapter.request_body(REQUEST)


def unknown_keys(value: Any, annotation: Any, path: str) -> list[str]:
    """Keys of `value` that its TypedDict `annotation` (followed through unions and
    iterables) does not declare: pydantic ignores them, the vendors may not."""
    if is_typeddict(annotation):
        if not isinstance(value, dict):
            return []
        hints = get_type_hints(annotation)
        found = [f"{path}.{key}" for key in value if key not in hints]
        for key, item in value.items():
            if key in hints:
                found += unknown_keys(item, hints[key], f"{path}.{key}")
        return found
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        fits = [unknown_keys(value, arg, path) for arg in get_args(annotation) if _fits(value, arg)]
        return min(fits, key=len) if fits else []
    if origin in (list, collections.abc.Iterable, collections.abc.Sequence):
        [item_type] = get_args(annotation)
        return [k for i, v in enumerate(value) for k in unknown_keys(v, item_type, f"{path}[{i}]")]
    return []


def _fits(value: Any, annotation: Any) -> bool:
    if not is_typeddict(annotation):
        return not isinstance(value, dict) or get_origin(annotation) in (dict, typing.Dict)  # noqa: UP006
    if not isinstance(value, dict) or not annotation.__required_keys__ <= set(value):
        return False
    # Union members are told apart by their `type` literal (optional in a few).
    kind = get_type_hints(annotation).get("type")
    if kind is None:
        return True
    members = get_args(kind) if get_origin(kind) in (Union, types.UnionType) else (kind,)
    names = [n for m in members if get_origin(m) is typing.Literal for n in get_args(m)]
    if "type" not in value:
        return type(None) in members or not names
    return not names or value["type"] in names


def consume(value: Any) -> Any:
    """Validated iterables are lazy in pydantic: walking them validates every item."""
    if isinstance(value, dict):
        return {k: consume(v) for k, v in value.items()}
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        return value
    if isinstance(value, collections.abc.Iterable):
        return [consume(v) for v in value]
    return value


def request_type(provider: str, body: dict[str, Any]) -> Any:
    streaming = body.get("stream") is True
    if provider == "anthropic":
        return (
            message_create_params.MessageCreateParamsStreaming
            if streaming
            else message_create_params.MessageCreateParamsNonStreaming
        )
    return (
        completion_create_params.CompletionCreateParamsStreaming
        if streaming
        else completion_create_params.CompletionCreateParamsNonStreaming
    )


@pytest.mark.parametrize("case", list(REQUEST_CASES))
def test_request_bodies_are_valid_for_the_vendors_request_types(case: str) -> None:
    provider, options = REQUEST_CASES[case]
    body = request_body(provider, dict(options))
    kind = request_type(provider, body)

    adapter = TypeAdapter(kind)  # alive while its lazy iterables are walked
    consume(adapter.validate_python(body))
    assert unknown_keys(body, kind, "body") == []


def test_unknown_keys_are_found_where_pydantic_would_ignore_them() -> None:
    kind = message_create_params.MessageCreateParamsNonStreaming
    body = request_body("anthropic", {"tools": [CUSTOM_TOOL]})
    body["tools"] = [{**CUSTOM_TOOL, "parameters": {}}, {**WEB_SEARCH, "max_usess": 2}]

    assert unknown_keys(body, kind, "body") == [
        "body.tools[0].parameters",
        "body.tools[1].max_usess",
    ]


def test_lazily_validated_parts_are_checked_too() -> None:
    body = request_body("anthropic", {"prompt_cache": True})
    body["messages"][1]["content"][0]["text"] = None  # inside two lazy iterables
    adapter = TypeAdapter(message_create_params.MessageCreateParamsNonStreaming)

    with pytest.raises(ValidationError):
        consume(adapter.validate_python(body))


def test_server_tools_are_sent_as_written() -> None:
    body = request_body("anthropic", {"tools": [CUSTOM_TOOL, WEB_SEARCH]})

    assert body["tools"] == [CUSTOM_TOOL, WEB_SEARCH]
    assert request_body("openai", {"tools": [WEB_SEARCH]})["tools"] == [WEB_SEARCH]


# -- answers: the corpus -----------------------------------------------------------------


def openai_body(choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-corpus",
        "object": "chat.completion",
        "created": 1_750_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_corpus",
        "service_tier": "default",
        "choices": [
            {"index": i, "logprobs": None, "finish_reason": "stop", **c}
            for i, c in enumerate(choices)
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def message(content: Any = None, refusal: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "refusal": refusal, **extra}


def openai_usage(
    prompt: int, completion: int, cached: int = 0, reasoning: int = 0
) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0},
    }


LOGPROBS = {
    "content": [
        {"token": "Paris", "logprob": -0.01, "bytes": [80, 97, 114, 105, 115], "top_logprobs": []}
    ],
    "refusal": None,
}


def tool_call(call_id: str, city: str) -> dict[str, Any]:
    arguments = orjson.dumps({"city": city}).decode()
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "lookup", "arguments": arguments},
    }


def expect(
    response: str | None,
    finish: str | None,
    usage: tuple[int, int, int, int, int] | None,
    *,
    reasoning: str | None = None,
    error: str | None = None,
    calls: list[dict[str, Any]] | None = None,
    written: int = 0,
    fingerprint: str | None = "fp_corpus",
    tier: str | None = "default",
) -> dict[str, Any]:
    """The stored row: usage as (prompt, completion, reasoning, cached, total)."""
    names = (
        "prompt_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "cached_tokens",
        "total_tokens",
    )
    counts = dict(zip(names, usage or (None,) * 5, strict=True))
    return {
        "response": response,
        "reasoning": reasoning,
        "finish_reason": finish,
        **counts,
        "cache_write_tokens": written if usage is not None else None,
        "error": error,
        "tool_calls": calls,
        "system_fingerprint": fingerprint,
        "service_tier": tier,
    }


OPENAI_CORPUS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "text-logprobs-cached": (
        openai_body(
            [{"message": message("Paris is the capital."), "logprobs": LOGPROBS}],
            openai_usage(20, 6, cached=8),
        ),
        expect("Paris is the capital.", "stop", (20, 6, 0, 8, 26)),
    ),
    "refusal": (
        openai_body([{"message": message(None, "I can't help with that.")}], openai_usage(15, 7)),
        expect("I can't help with that.", "refusal", (15, 7, 0, 0, 22), error="refused"),
    ),
    "n=3": (
        openai_body(
            [{"message": message(text)} for text in ("First.", "Second.", "Third.")],
            openai_usage(10, 9),
        ),
        expect("First.", "stop", (10, 9, 0, 0, 19)),
    ),
    "tool-calls": (
        openai_body(
            [
                {
                    "message": message(
                        None, tool_calls=[tool_call("call_1", "Paris"), tool_call("call_2", "Rome")]
                    ),
                    "finish_reason": "tool_calls",
                }
            ],
            openai_usage(30, 20),
        ),
        expect(
            "",
            "tool_calls",
            (30, 20, 0, 0, 50),
            calls=[
                {"id": "call_1", "name": "lookup", "arguments": {"city": "Paris"}},
                {"id": "call_2", "name": "lookup", "arguments": {"city": "Rome"}},
            ],
        ),
    ),
    "length": (
        openai_body(
            [{"message": message("The answer is"), "finish_reason": "length"}], openai_usage(9, 4)
        ),
        expect("The answer is", "length", (9, 4, 0, 0, 13)),
    ),
    "content-filter": (
        openai_body(
            [{"message": message(""), "finish_reason": "content_filter"}], openai_usage(12, 0)
        ),
        expect("", "content_filter", (12, 0, 0, 0, 12), error="content_filtered"),
    ),
    "reasoning-tokens": (
        openai_body([{"message": message("42")}], openai_usage(10, 80, reasoning=64)),
        expect("42", "stop", (10, 80, 64, 0, 90)),
    ),
    "no-usage": (
        openai_body([{"message": message("Fine.")}], None),
        expect("Fine.", "stop", None),
    ),
}


def anthropic_body(
    content: list[dict[str, Any]], stop: str, usage: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return {
        "id": "msg_corpus",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "service_tier": "standard",
            **usage,
        },
        **extra,
    }


def expect_anthropic(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """Anthropic reports no fingerprint, and its tier inside usage."""
    return expect(*args, fingerprint=None, tier="standard", **kwargs)


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value, "citations": None}


SEARCH = {
    "type": "server_tool_use",
    "id": "srvtoolu_1",
    "name": "web_search",
    "input": {"query": "kettles"},
}
SEARCH_RESULT = {
    "type": "web_search_tool_result",
    "tool_use_id": "srvtoolu_1",
    "content": [
        {
            "type": "web_search_result",
            "url": "https://example.com/kettles",
            "title": "Kettles",
            "encrypted_content": "EqgfCioIARgBIiQ3",
            "page_age": None,
        }
    ],
}
ANTHROPIC_CORPUS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "text-cache": (
        anthropic_body(
            [text("Hello there.")],
            "end_turn",
            {
                "input_tokens": 12,
                "output_tokens": 5,
                "cache_creation_input_tokens": 100,
                "cache_read_input_tokens": 200,
            },
        ),
        expect_anthropic("Hello there.", "stop", (312, 5, 0, 200, 317), written=100),
    ),
    "thinking": (
        anthropic_body(
            [{"type": "thinking", "thinking": "Six times seven.", "signature": "c2ln"}, text("42")],
            "end_turn",
            {
                "input_tokens": 10,
                "output_tokens": 50,
                "output_tokens_details": {"thinking_tokens": 40},
            },
        ),
        expect_anthropic("42", "stop", (10, 50, 40, 0, 60), reasoning="Six times seven."),
    ),
    "redacted-thinking": (
        anthropic_body(
            [{"type": "redacted_thinking", "data": "ZW5jcnlwdGVk"}, text("ok")],
            "end_turn",
            {"input_tokens": 10, "output_tokens": 30},
        ),
        expect_anthropic("ok", "stop", (10, 30, 0, 0, 40), reasoning="[redacted thinking]"),
    ),
    "tool-use": (
        anthropic_body(
            [
                text("Looking it up."),
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"city": "Paris"}},
            ],
            "tool_use",
            {"input_tokens": 40, "output_tokens": 20},
        ),
        expect_anthropic(
            "Looking it up.",
            "tool_calls",
            (40, 20, 0, 0, 60),
            calls=[{"id": "toolu_1", "name": "lookup", "arguments": {"city": "Paris"}}],
        ),
    ),
    "server-tools": (
        anthropic_body(
            [text("Searching. "), SEARCH, SEARCH_RESULT, text("Kettles boil.")],
            "end_turn",
            {
                "input_tokens": 900,
                "output_tokens": 25,
                "server_tool_use": {"web_search_requests": 1, "web_fetch_requests": 0},
            },
        ),
        expect_anthropic("Searching. Kettles boil.", "stop", (900, 25, 0, 0, 925)),
    ),
    "pause-turn": (
        anthropic_body(
            [text("Searching."), SEARCH], "pause_turn", {"input_tokens": 50, "output_tokens": 10}
        ),
        expect_anthropic("Searching.", "pause_turn", (50, 10, 0, 0, 60), error="paused_turn"),
    ),
    "refusal": (
        anthropic_body(
            [text("I can't help")],
            "refusal",
            {"input_tokens": 20, "output_tokens": 3},
            stop_details={"type": "refusal", "category": None, "explanation": None},
        ),
        expect_anthropic("I can't help", "refusal", (20, 3, 0, 0, 23), error="refused"),
    ),
    "max-tokens": (
        anthropic_body([text("The answer")], "max_tokens", {"input_tokens": 8, "output_tokens": 2}),
        expect_anthropic("The answer", "length", (8, 2, 0, 0, 10)),
    ),
    "stop-sequence": (
        {
            **anthropic_body([text("A")], "stop_sequence", {"input_tokens": 8, "output_tokens": 1}),
            "stop_sequence": "###",
        },
        expect_anthropic("A", "stop", (8, 1, 0, 0, 9)),
    ),
    "context-window": (
        anthropic_body(
            [text("Long")], "model_context_window_exceeded", {"input_tokens": 8, "output_tokens": 1}
        ),
        expect_anthropic("Long", "length", (8, 1, 0, 0, 9)),
    ),
}


# -- answers: their streamed form ---------------------------------------------------------


def pieces(value: str, size: int = 5) -> list[str]:
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]


def openai_chunks(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks that stream `body`: choices interleaved, usage only in a last chunk
    with no choices (`stream_options.include_usage`)."""
    head = {k: body[k] for k in ("id", "created", "model", "system_fingerprint", "service_tier")}
    per_choice = [_choice_deltas(choice) for choice in body["choices"]]
    chunks = []
    for step in range(max(len(d) for d in per_choice)):
        for index, deltas in enumerate(per_choice):
            if step < len(deltas):
                delta, finish = deltas[step]
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                chunks.append(
                    {**head, "object": "chat.completion.chunk", "choices": [choice], "usage": None}
                )
    if "usage" in body:
        chunks.append(
            {**head, "object": "chat.completion.chunk", "choices": [], "usage": body["usage"]}
        )
    return chunks


def _choice_deltas(choice: dict[str, Any]) -> list[tuple[dict[str, Any], str | None]]:
    msg = choice["message"]
    deltas: list[tuple[dict[str, Any], str | None]] = [({"role": "assistant", "content": ""}, None)]
    deltas += [({"content": p}, None) for p in pieces(msg["content"] or "") if p]
    deltas += [({"refusal": p}, None) for p in pieces(msg["refusal"] or "") if p]
    for index, call in enumerate(msg.get("tool_calls") or []):
        start = {
            **call,
            "index": index,
            "function": {"name": call["function"]["name"], "arguments": ""},
        }
        deltas.append(({"tool_calls": [start]}, None))
        for p in pieces(call["function"]["arguments"]):
            deltas.append(({"tool_calls": [{"index": index, "function": {"arguments": p}}]}, None))
    deltas.append(({}, choice["finish_reason"]))
    return deltas


def anthropic_events(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The events that stream `body`, with a ping and an event type not known yet, and
    a final usage that lists the counts it does not repeat as null (the SDK's type
    allows both)."""
    usage = body["usage"]
    start_usage = {**usage, "output_tokens": 1}
    start_usage.pop("output_tokens_details", None)
    start = {
        **body,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": start_usage,
    }
    start.pop("stop_details", None)
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": start},
        {"type": "ping"},
        # Anthropic's versioning policy: new event types may appear; they are skipped.
        {"type": "future_event", "detail": {"x": 1}},
    ]
    for index, block in enumerate(body["content"]):
        events += _block_events(index, block)
    final_usage = {
        **{k: None for k in usage},
        **{
            k: usage[k]
            for k in ("output_tokens", "output_tokens_details", "server_tool_use")
            if k in usage
        },
    }
    delta = {"stop_reason": body["stop_reason"], "stop_sequence": body["stop_sequence"]}
    events.append({"type": "message_delta", "delta": delta, "usage": final_usage})
    events.append({"type": "message_stop"})
    return events


def _block_events(index: int, block: dict[str, Any]) -> list[dict[str, Any]]:
    kind = block["type"]
    deltas: list[dict[str, Any]] = []
    if kind == "text":
        start = {**block, "text": ""}
        deltas = [{"type": "text_delta", "text": p} for p in pieces(block["text"])]
    elif kind == "thinking":
        start = {**block, "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": p} for p in pieces(block["thinking"])]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind in ("tool_use", "server_tool_use"):
        start = {**block, "input": {}}
        arguments = orjson.dumps(block["input"]).decode()
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces(arguments)]
    else:  # redacted thinking, a server tool's result: whole at the start
        start = block
    return [
        {"type": "content_block_start", "index": index, "content_block": start},
        *({"type": "content_block_delta", "index": index, "delta": d} for d in deltas),
        {"type": "content_block_stop", "index": index},
    ]


ANTHROPIC_EVENT = TypeAdapter(anthropic_types.RawMessageStreamEvent)


@pytest.mark.parametrize("name", list(OPENAI_CORPUS))
def test_the_openai_corpus_is_valid_for_the_sdk(name: str) -> None:
    body, _ = OPENAI_CORPUS[name]
    openai_types.ChatCompletion.model_validate(body)
    for chunk in openai_chunks(body):
        openai_types.ChatCompletionChunk.model_validate(chunk)


@pytest.mark.parametrize("name", list(ANTHROPIC_CORPUS))
def test_the_anthropic_corpus_is_valid_for_the_sdk(name: str) -> None:
    body, _ = ANTHROPIC_CORPUS[name]
    anthropic_types.Message.model_validate(body)
    for event in anthropic_events(body):
        if event["type"] not in ("ping", "future_event"):  # outside the SDK's event union
            ANTHROPIC_EVENT.validate_python(event)


# -- answers: stored as they say ------------------------------------------------------------

CORPORA = {"openai": OPENAI_CORPUS, "anthropic": ANTHROPIC_CORPUS}
STREAMS = {"openai": openai_chunks, "anthropic": anthropic_events}


@pytest.mark.parametrize("mode", ["plain", "stream", "batch"])
@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_every_valid_answer_is_stored_as_it_says(
    tmp_path: Path, simulator: RunningSimulator, protocol: str, mode: str
) -> None:
    corpus = CORPORA[protocol]
    replay = [{"body": body, "events": STREAMS[protocol](body)} for body, _ in corpus.values()]
    simulator.configure(replay=replay, batch_turnaround_s=0.1)
    ids = list(corpus)
    texts = [f"[[sim:replay={i}]]" for i in range(len(ids))]
    pl.DataFrame({"review_id": ids, "text": texts}).write_csv(tmp_path / "reviews.csv")
    extra: dict[str, Any] = {"model__tools": [CUSTOM_TOOL]}
    if protocol == "anthropic":
        extra.update(model__provider="anthropic", model__base_url=simulator.url)
    if mode == "stream":
        extra["model__stream"] = True
    if mode == "batch":
        extra.update(model__batch=True, model__batch_poll_s=0.1)
    job = make_job(tmp_path, simulator, **extra)

    result = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert result.returncode == 1, result.stderr  # refusals and the like are row errors
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    for row in out.iter_rows(named=True):
        _, expected = corpus[row["review_id"]]
        stored = {key: row[key] for key in expected}
        stored["tool_calls"] = orjson.loads(row["tool_calls"]) if row["tool_calls"] else None
        if stored["error"] is not None and expected["error"] is not None:
            assert stored["error"].startswith(expected["error"]), (
                row["review_id"],
                stored["error"],
            )
            stored["error"] = expected["error"]
        assert stored == expected, row["review_id"]
        assert row["attempts"] == 1, row["review_id"]
    assert simulator.stats()["duplicate_paid"] == 0


@pytest.mark.parametrize("provider", ["openai", "xai"])
def test_seed_and_service_tier_are_sent_as_given(provider: str) -> None:
    body = request_body(provider, {"params": {"seed": 7, "service_tier": "flex"}})

    assert body["seed"] == 7 and body["service_tier"] == "flex"
