"""Structured output: a JSON Schema in the job, typed Parquet columns out.

`output.schema` is a JSON Schema object, or a compact form such as
`{label: {enum: [positive, negative]}, score: number}`. Each answer is parsed and
validated (jsonschema); each top-level property becomes its own typed column:
enum -> dictionary, number -> float64, integer -> int64, boolean -> bool,
arrays -> lists, objects with properties -> structs, anything else -> JSON text.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import orjson
import pyarrow as pa

from pipeline.columns import arrow_array
from pipeline.errors import SchemaViolation, SpecError

SCALARS = {"string", "number", "integer", "boolean"}
JSON_TYPES = SCALARS | {"object", "array", "null"}
_FENCE = re.compile(r"^\s*```(?:json)?\s*(.*?)\s*```\s*$", re.DOTALL)
SCHEMA_NAME = "row_output"


def normalize(raw: dict[str, Any]) -> dict[str, Any]:
    """A full JSON Schema object from either form."""
    if raw.get("type") == "object" or "properties" in raw:
        schema = dict(raw)
        schema.setdefault("type", "object")
        return schema
    properties = {name: _property(name, value) for name, value in raw.items()}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _property(name: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        if value not in SCALARS:
            close = difflib.get_close_matches(value, sorted(SCALARS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise SpecError(
                f"output.schema.{name}: unknown type '{value}' ({hint}"
                f"use one of {', '.join(sorted(SCALARS))}, or a JSON Schema object)"
            )
        return {"type": value}
    if isinstance(value, list):
        return {"type": "array", "items": _property(name, value[0]) if value else {}}
    if isinstance(value, dict):
        prop = dict(value)
        if "enum" in prop and "type" not in prop:
            prop["type"] = "string"
        return prop
    raise SpecError(f"output.schema.{name}: expected a type name or a JSON Schema object")


# Keywords that only annotate (no validation), accepted alongside the validating ones.
ANNOTATIONS = {
    "$schema", "$id", "$anchor", "$dynamicAnchor", "$defs", "$comment", "$vocabulary",
    "title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly",
    "contentEncoding", "contentMediaType", "contentSchema", "definitions",
}  # fmt: skip
# Keywords whose value is a schema, a list of schemas, or a mapping of names to schemas.
_ONE_SCHEMA = (
    "items", "contains", "not", "if", "then", "else", "additionalProperties",
    "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema",
)  # fmt: skip
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "dependentSchemas", "$defs", "definitions")


def check_keywords(schema: Any, where: str, validating: set[str]) -> None:
    """Refuse keywords JSON Schema does not have (a typo is otherwise silently ignored)."""
    if not isinstance(schema, dict):
        return
    known = validating | ANNOTATIONS | {"then", "else"}
    for key, value in schema.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "see the JSON Schema reference"
            raise SpecError(f"{where}: unknown JSON Schema keyword '{key}' ({hint})")
        if key == "type":
            for kind in value if isinstance(value, list) else [value]:
                if isinstance(kind, str) and kind not in JSON_TYPES:
                    close = difflib.get_close_matches(kind, sorted(JSON_TYPES), n=1)
                    hint = f"did you mean '{close[0]}'?" if close else ", ".join(sorted(JSON_TYPES))
                    raise SpecError(f"{where}.type: unknown type '{kind}' ({hint})")
        if key == "enum" and isinstance(value, list) and not value:
            raise SpecError(f"{where}.enum: an empty list allows no answer; list the values")
        if key in _ONE_SCHEMA:
            check_keywords(value, f"{where}.{key}", validating)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, item in enumerate(value):
                check_keywords(item, f"{where}.{key}.{i}", validating)
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, item in value.items():
                check_keywords(item, f"{where}.{key}.{name}", validating)


class OutputSchema:
    """A validated schema: how to ask for it, how to check answers, which columns to write."""

    def __init__(self, raw: dict[str, Any]) -> None:
        # Imported here: jsonschema costs a noticeable share of start-up, and most jobs
        # have no schema.
        from jsonschema import Draft202012Validator
        from jsonschema.exceptions import SchemaError

        compact = not (raw.get("type") == "object" or "properties" in raw)
        self.schema = normalize(raw)
        where = "output.schema"
        if compact:  # the compact form's keys are the properties: name them as written
            for name, prop in self.schema["properties"].items():
                check_keywords(prop, f"{where}.{name}", set(Draft202012Validator.VALIDATORS))
        else:
            check_keywords(self.schema, where, set(Draft202012Validator.VALIDATORS))
        try:
            Draft202012Validator.check_schema(self.schema)
        except SchemaError as exc:
            parts = list(exc.path)
            if compact and parts[:1] == ["properties"]:
                parts = parts[1:]
            path = "".join(f".{p}" for p in parts)
            raise SpecError(
                f"{where}{path}: not valid JSON Schema: {exc.message} "
                "(see https://json-schema.org/understanding-json-schema/reference)"
            ) from None
        self.properties: dict[str, Any] = self.schema.get("properties") or {}
        if not self.properties:
            raise SpecError("output.schema: needs at least one property (one output column each)")
        self._validator = Draft202012Validator(self.schema)

    @property
    def columns(self) -> list[str]:
        return list(self.properties)

    def response_format(self) -> dict[str, Any]:
        """OpenAI's structured-output request field."""
        return {
            "type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "schema": self.schema, "strict": True},
        }

    def instructions(self) -> str:
        """For providers with JSON mode only: the schema, stated in the system prompt."""
        return (
            "Reply with one JSON object and nothing else. It must match this JSON Schema.\n"
            f"JSON Schema: {orjson.dumps(self.schema).decode()}"
        )

    def parse(self, text: str) -> dict[str, Any]:
        """The answer as an object that matches the schema, or SchemaViolation."""
        fenced = _FENCE.match(text)
        try:
            value = orjson.loads(fenced.group(1) if fenced else text)
        except orjson.JSONDecodeError as exc:
            raise SchemaViolation(f"the answer is not valid JSON ({exc})") from None
        errors = sorted(self._validator.iter_errors(value), key=lambda e: list(e.path))
        if errors:
            first = errors[0]
            where = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in first.path)
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise SchemaViolation(f"at {where}: {first.message}{more}")
        return value

    def arrow_fields(self) -> list[pa.Field]:
        return [pa.field(name, arrow_type(spec)) for name, spec in self.properties.items()]

    def arrays(self, parsed: list[dict[str, Any] | None]) -> list[pa.Array]:
        """One typed array per property; rows without a valid answer are null."""
        arrays = []
        for field in self.arrow_fields():
            values = [row.get(field.name) if row else None for row in parsed]
            if field.type == pa.string() and not _is_string(self.properties[field.name]):
                values = [None if v is None else orjson.dumps(v).decode() for v in values]
            if pa.types.is_dictionary(field.type):
                arrays.append(arrow_array(values, pa.string()).dictionary_encode())
            else:
                arrays.append(arrow_array(values, field.type))
        return arrays


def arrow_type(spec: dict[str, Any], *, nested: bool = False) -> pa.DataType:
    kind = spec.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if "enum" in spec and kind in (None, "string"):
        # Dictionary-encoded at the top level; plain strings inside lists and structs.
        return pa.string() if nested else pa.dictionary(pa.int32(), pa.string())
    if kind == "string":
        return pa.string()
    if kind == "number":
        return pa.float64()
    if kind == "integer":
        return pa.int64()
    if kind == "boolean":
        return pa.bool_()
    if kind == "array" and isinstance(spec.get("items"), dict):
        return pa.list_(arrow_type(spec["items"], nested=True))
    if kind == "object" and spec.get("properties"):
        return pa.struct(
            [
                pa.field(name, arrow_type(sub, nested=True))
                for name, sub in spec["properties"].items()
            ]
        )
    return pa.string()  # anything else is kept as JSON text


def _is_string(spec: dict[str, Any]) -> bool:
    kind = spec.get("type")
    return kind == "string" or (isinstance(kind, list) and "string" in kind) or "enum" in spec
