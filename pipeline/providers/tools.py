"""Tool definitions and tool choices, in either provider's format, converted both ways.

Jobs may write tools the OpenAI way (`{type: function, function: {name, description,
parameters}}`) or the Anthropic way (`{name, description, input_schema}`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson


def to_openai(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    converted = []
    for tool in tools:
        if tool.get("type") == "function" and "function" in tool:
            converted.append(tool)
            continue
        function = {"name": tool["name"], "parameters": tool.get("input_schema", {})}
        if tool.get("description"):
            function["description"] = tool["description"]
        converted.append({"type": "function", "function": function})
    return converted


def to_anthropic(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    converted = []
    for tool in tools:
        if "input_schema" in tool:
            converted.append(tool)
            continue
        function = tool.get("function", tool)
        entry = {"name": function["name"], "input_schema": function.get("parameters", {})}
        if function.get("description"):
            entry["description"] = function["description"]
        converted.append(entry)
    return converted


def choice_to_anthropic(choice: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if choice is None:
        return None
    if isinstance(choice, str):
        return {"type": {"required": "any"}.get(choice, choice)}
    if choice.get("type") == "function":
        return {"type": "tool", "name": choice["function"]["name"]}
    return choice


def normalized_call(name: str, arguments: Any, call_id: str | None = None) -> dict[str, Any]:
    """One tool call as the output's `tool_calls` column holds it: arguments parsed."""
    if isinstance(arguments, str):
        # Unparseable arguments are kept as the raw text the model produced.
        with contextlib.suppress(orjson.JSONDecodeError):
            arguments = orjson.loads(arguments) if arguments else {}
    return {"id": call_id, "name": name, "arguments": arguments}
