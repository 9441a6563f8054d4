"""Tool definitions and tool choices, in either provider's format, converted both ways.

Jobs may write tools the OpenAI way (`{type: function, function: {name, description,
parameters}}`) or the Anthropic way (`{name, description, input_schema}`). A tool the
provider defines itself (Anthropic's `{type: web_search_20250305, name: web_search,
max_uses: 3}`, `code_execution_*`, OpenAI's built-ins) is sent exactly as written.
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson

# The `type` of tools a job defines (with a schema); any other type is the provider's own.
CUSTOM_TYPES = frozenset({"function", "custom"})


def provider_defined(tool: dict[str, Any]) -> bool:
    """A server tool the provider defines and runs: its `type` names it (a version)."""
    kind = tool.get("type")
    return isinstance(kind, str) and kind not in CUSTOM_TYPES


def to_openai(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    converted = []
    for tool in tools:
        if provider_defined(tool) or (tool.get("type") == "function" and "function" in tool):
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
        if provider_defined(tool) or "input_schema" in tool:
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
