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
from pydantic import TypeAdapter
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

    consume(TypeAdapter(kind).validate_python(body))
    assert unknown_keys(body, kind, "body") == []


def test_unknown_keys_are_found_where_pydantic_would_ignore_them() -> None:
    kind = message_create_params.MessageCreateParamsNonStreaming
    body = request_body("anthropic", {"tools": [CUSTOM_TOOL]})
    body["tools"] = [{**CUSTOM_TOOL, "parameters": {}}, {**WEB_SEARCH, "max_usess": 2}]

    assert unknown_keys(body, kind, "body") == [
        "body.tools[0].parameters",
        "body.tools[1].max_usess",
    ]


def test_server_tools_are_sent_as_written() -> None:
    body = request_body("anthropic", {"tools": [CUSTOM_TOOL, WEB_SEARCH]})

    assert body["tools"] == [CUSTOM_TOOL, WEB_SEARCH]
    assert request_body("openai", {"tools": [WEB_SEARCH]})["tools"] == [WEB_SEARCH]
