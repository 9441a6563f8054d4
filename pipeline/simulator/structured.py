"""Deterministic structured output (JSON modes) and tool calls.

Values are derived from the request digest and the JSON path of each value, so tests
can compute them with :func:`expected_structured`. Supported schema keywords: ``type``
(a string or a list; the first non-null wins), ``enum``, ``const``, ``properties``,
``required``, ``items``, ``prefixItems``, ``minItems``/``maxItems``,
``minimum``/``maximum`` and their exclusive forms, ``minLength``/``maxLength``,
``format`` (date, date-time, time, email, uuid, uri), ``anyOf``/``oneOf`` (first
non-null branch), ``allOf`` (merged) and local ``$ref`` (``#/$defs/...``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import uuid
from dataclasses import dataclass, replace
from typing import Any, Literal

import orjson

from .behaviour import ToolCall, Triggers, message_text, request_digest

_MAX_DEPTH = 24
_EMPTY_OBJECT: dict[str, Any] = {"type": "object", "properties": {}}
SCHEMA_HINT = "JSON Schema: "
BAD_ENUM_VALUE = "__not_in_enum__"


class OutputError(ValueError):
    """The request asks for a structured answer in a way the API would reject."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# --- value generation -------------------------------------------------------------------


def _hash(digest: str, path: str) -> int:
    return int(hashlib.sha256(f"{digest}|{path}".encode()).hexdigest()[:12], 16)


def _resolve(schema: Any, root: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """Follow local ``$ref`` and merge ``allOf``; a non-dict schema is the empty schema."""
    if not isinstance(schema, dict):
        return {}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#") and depth < _MAX_DEPTH:
        target: Any = root
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            target = target.get(part) if isinstance(target, dict) else None
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        return _resolve({**_resolve(target, root, depth + 1), **rest}, root, depth + 1)
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and all_of and depth < _MAX_DEPTH:
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for sub in all_of:
            part_schema = _resolve(sub, root, depth + 1)
            for k, v in part_schema.items():
                if k == "properties" and isinstance(v, dict):
                    merged["properties"] = {**merged.get("properties", {}), **v}
                elif k == "required" and isinstance(v, list):
                    merged["required"] = [*merged.get("required", []), *v]
                else:
                    merged.setdefault(k, v)
        return merged
    return schema


def _first_type(schema: dict[str, Any]) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        non_null = [x for x in t if x != "null"]
        return non_null[0] if non_null else ("null" if t else None)
    if isinstance(t, str):
        return t
    if "properties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return None


def _bound(schema: dict[str, Any], plain: str, exclusive: str) -> tuple[float | None, bool]:
    """(bound, exclusive?) accepting draft-4 boolean and draft-6+ numeric exclusives."""
    ex = schema.get(exclusive)
    if isinstance(ex, (int, float)) and not isinstance(ex, bool):
        return float(ex), True
    v = schema.get(plain)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v), ex is True
    return None, False


def _number(schema: dict[str, Any], h: int) -> float:
    frac = (h % 1000) / 1000
    lo, lo_ex = _bound(schema, "minimum", "exclusiveMinimum")
    hi, hi_ex = _bound(schema, "maximum", "exclusiveMaximum")
    if lo is not None and hi is not None:
        v = min(max(round(lo + frac * (hi - lo), 3), lo), hi)
        if (lo_ex and v <= lo) or (hi_ex and v >= hi):
            v = (lo + hi) / 2
        return float(v)
    if lo is not None:
        v = round(lo + frac, 3)
        return float(lo + 0.5 if lo_ex and v <= lo else v)
    if hi is not None:
        v = round(hi - frac, 3)
        return float(hi - 0.5 if hi_ex and v >= hi else v)
    return frac


def _integer(schema: dict[str, Any], h: int) -> int:
    lo_f, lo_ex = _bound(schema, "minimum", "exclusiveMinimum")
    hi_f, hi_ex = _bound(schema, "maximum", "exclusiveMaximum")
    lo = None if lo_f is None else (math.floor(lo_f) + 1 if lo_ex else math.ceil(lo_f))
    hi = None if hi_f is None else (math.ceil(hi_f) - 1 if hi_ex else math.floor(hi_f))
    if lo is not None and hi is not None:
        return lo if hi < lo else lo + h % (hi - lo + 1)
    if lo is not None:
        return lo + h % 100
    if hi is not None:
        return hi - h % 100
    return h % 1000


def _string(schema: dict[str, Any], name: str, digest: str, h: int) -> str:
    fmt = schema.get("format")
    day = dt.date(2000, 1, 1) + dt.timedelta(days=h % 9000)
    if fmt == "date":
        return day.isoformat()
    if fmt == "date-time":
        return f"{day.isoformat()}T{h % 24:02d}:{h % 60:02d}:00Z"
    if fmt == "time":
        return f"{h % 24:02d}:{h % 60:02d}:00"
    if fmt == "uuid":
        return str(uuid.UUID(hashlib.sha256(f"{digest}|{name}".encode()).hexdigest()[:32]))
    base = f"{name}-{digest[:6]}"
    if fmt == "email":
        return f"{base}@example.com"
    if fmt in ("uri", "url"):
        return f"https://example.com/{base}"
    min_len, max_len = schema.get("minLength"), schema.get("maxLength")
    if isinstance(min_len, int) and len(base) < min_len:
        base = base.ljust(min_len, "x")
    if isinstance(max_len, int) and len(base) > max_len:
        base = base[:max_len]
    return base


def _value(schema: Any, root: dict[str, Any], name: str, path: str, digest: str, depth: int) -> Any:
    s = _resolve(schema, root)
    if "const" in s:
        return s["const"]
    h = _hash(digest, path)
    enum = s.get("enum")
    if isinstance(enum, list) and enum:
        return enum[h % len(enum)]
    for key in ("anyOf", "oneOf"):
        branches = s.get(key)
        if isinstance(branches, list) and branches:
            resolved = [_resolve(b, root) for b in branches]
            chosen = next((b for b in resolved if _first_type(b) != "null"), resolved[0])
            rest = {k: v for k, v in s.items() if k != key}
            return _value({**rest, **chosen}, root, name, path, digest, depth)
    kind = _first_type(s)
    if kind == "object":
        props = s.get("properties")
        if not isinstance(props, dict) or depth >= _MAX_DEPTH:
            return {}
        return {
            k: _value(sub, root, k, f"{path}/{k}", digest, depth + 1) for k, sub in props.items()
        }
    if kind == "array":
        return _array(s, root, name, path, digest, depth)
    if kind == "number":
        return _number(s, h)
    if kind == "integer":
        return _integer(s, h)
    if kind == "boolean":
        return h % 2 == 1
    if kind == "null":
        return None
    return _string(s, name, digest, h)


def _array(
    s: dict[str, Any], root: dict[str, Any], name: str, path: str, digest: str, depth: int
) -> list[Any]:
    if depth >= _MAX_DEPTH:
        return []
    n = 2
    max_items, min_items = s.get("maxItems"), s.get("minItems")
    if isinstance(max_items, int):
        n = min(n, max_items)
    if isinstance(min_items, int):
        n = max(n, min_items)
    prefix = s.get("prefixItems")
    schemas: list[Any] = list(prefix) if isinstance(prefix, list) else []
    items = s.get("items")
    if isinstance(items, list):  # draft-4 tuple form
        schemas, items = list(items), s.get("additionalItems", {})
    n = max(n, len(schemas))
    if items is False:
        n = len(schemas)
    out: list[Any] = []
    for i in range(n):
        sub = schemas[i] if i < len(schemas) else (items if isinstance(items, dict) else {})
        out.append(_value(sub, root, f"{name}{i + 1}", f"{path}/{i}", digest, depth + 1))
    return out


def generate(schema: Any, digest: str) -> Any:
    """The value for ``schema`` derived from a request digest."""
    root = schema if isinstance(schema, dict) else {}
    return _value(root, root, "value", "", digest, 0)


def expected_structured(model: str, messages: list[dict[str, Any]], schema: Any) -> Any:
    """The object the simulator answers for this prompt and JSON schema (a dict for an
    object schema): the ``json_schema`` content and the input of a tool call alike.

    For Anthropic requests put the ``system`` prompt first as a system message."""
    return generate(schema, request_digest(model, messages))


def corrupt(obj: Any, schema: Any) -> dict[str, Any]:
    """``obj`` made invalid for ``schema``: drop the first required property and give the
    first enum property a value outside its enum (or a wrong type when neither applies)."""
    root = schema if isinstance(schema, dict) else {}
    s = _resolve(root, root)
    bad: dict[str, Any] = dict(obj) if isinstance(obj, dict) else {}
    changed = False
    required = s.get("required")
    if isinstance(required, list):
        gone = next((r for r in required if r in bad), None)
        if gone is not None:
            del bad[gone]
            changed = True
    props = s.get("properties")
    props = props if isinstance(props, dict) else {}
    for k, sub in props.items():
        if k in bad and isinstance(_resolve(sub, root).get("enum"), list):
            bad[k] = BAD_ENUM_VALUE
            return bad
    if changed:
        return bad
    for k, sub in props.items():
        kind = _first_type(_resolve(sub, root))
        if k in bad and kind is not None:
            bad[k] = 12345 if kind == "string" else "not-a-" + kind
            return bad
    bad["oops"] = True
    return bad


# --- request parsing ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Output:
    """What a structured request asks for: JSON content or a tool call."""

    kind: Literal["json", "tool"]
    schema: dict[str, Any] | None  # None: the ``{"answer": ...}`` fallback
    tool_name: str = ""
    bad: bool = False

    def invalid(self) -> Output:
        return replace(self, bad=True)

    def render(self, digest: str, answer: str) -> tuple[str, ToolCall | None]:
        """(content, tool call) for a request with this digest and answer text."""
        if self.kind == "json":
            if self.bad:
                return '{"oops": ' + orjson.dumps(answer).decode()[:-1], None
            if self.schema is None:
                return orjson.dumps({"answer": answer}).decode(), None
            return orjson.dumps(generate(self.schema, digest)).decode(), None
        schema = self.schema if self.schema is not None else _EMPTY_OBJECT
        value = generate(schema, digest)
        args: dict[str, Any] = value if isinstance(value, dict) else {}
        if self.bad:
            args = corrupt(args, schema)
        return "", ToolCall(self.tool_name, orjson.dumps(args).decode(), args, digest)


def schema_hint(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A JSON object following a line ``JSON Schema: `` in a system message."""
    decoder = json.JSONDecoder()
    for m in messages:
        if m.get("role") not in ("system", "developer"):
            continue
        text = message_text(m.get("content"))
        start = 0
        while (i := text.find(SCHEMA_HINT, start)) >= 0:
            start = i + len(SCHEMA_HINT)
            if i > 0 and text[i - 1] != "\n":
                continue
            try:
                obj, _ = decoder.raw_decode(text[start:].lstrip(" \t"))
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def _wants_tool(triggers: Triggers | None) -> bool:
    return triggers is not None and triggers.tool


def openai_output(
    body: dict[str, Any], messages: list[dict[str, Any]], triggers: Triggers | None
) -> Output | None:
    """The structured answer a Chat Completions request asks for, if any."""
    tools: dict[str, Any] = {}
    raw_tools = body.get("tools")
    for t in raw_tools if isinstance(raw_tools, list) else []:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            tools.setdefault(fn["name"], fn.get("parameters"))
    choice = body.get("tool_choice")
    name: str | None = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or name not in tools:
            raise OutputError(f"tool_choice names an unknown function: {name!r}", "tool_choice")
    elif choice == "required":
        if not tools:
            raise OutputError("tool_choice 'required' needs at least one tool", "tool_choice")
        name = next(iter(tools))
    elif choice in (None, "auto") and tools and _wants_tool(triggers):
        name = next(iter(tools))
    if name is not None:
        params = tools[name]
        return Output("tool", params if isinstance(params, dict) else None, name)

    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if isinstance(schema, dict):
            return Output("json", schema)
        return Output("json", schema_hint(messages))
    if fmt.get("type") == "json_object":
        return Output("json", schema_hint(messages))
    return None


def anthropic_output(body: dict[str, Any], triggers: Triggers | None) -> Output | None:
    """The tool call an Anthropic Messages request asks for, if any."""
    tools: dict[str, Any] = {}
    raw_tools = body.get("tools")
    for t in raw_tools if isinstance(raw_tools, list) else []:
        if isinstance(t, dict) and isinstance(t.get("name"), str):
            tools.setdefault(t["name"], t.get("input_schema"))
    choice = body.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None
    name: str | None = None
    if kind == "tool":
        assert isinstance(choice, dict)
        name = choice.get("name")
        if not isinstance(name, str) or name not in tools:
            raise OutputError(f"tool_choice.name: tool {name!r} not found in tools")
    elif kind == "any":
        if not tools:
            raise OutputError("tool_choice.type 'any' requires tools")
        name = next(iter(tools))
    elif kind in (None, "auto") and tools and _wants_tool(triggers):
        name = next(iter(tools))
    if name is None:
        return None
    schema = tools[name]
    return Output("tool", schema if isinstance(schema, dict) else None, name)
