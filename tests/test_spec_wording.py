"""Spec errors in this project's words: every one names the key and says what it wants."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from conftest import make_job, reviews, run_cli

from pipeline.errors import SpecError
from pipeline.render import PromptRenderer
from pipeline.spec import PromptSpec, parse_spec
from pipeline.structured import OutputSchema

BASE: dict[str, Any] = {
    "name": "job",
    "input": {"path": "x.csv"},
    "model": {"provider": "openai", "model": "m"},
    "prompt": {"template": "hi"},
}
MODEL = {"provider": "openai", "model": "m"}
PYDANTIC_WORDS = ("Input should", "String should", "List should", "Value error", "instance of")


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        ("limits", None, "limits: expected a mapping with keys among concurrency,"),
        ("limits", {"concurrency": "many"}, "limits.concurrency: expected a whole number"),
        ("limits", {"concurrency": 0}, "limits.concurrency: must be at least 1, got 0"),
        ("limits", {"max_attempts": 1000}, "limits.max_attempts: must be at most 100"),
        ("limits", {"timeout_s": "soon"}, "limits.timeout_s: expected a number, got 'soon'"),
        ("model", {**MODEL, "tools": "x"}, "model.tools: expected a list"),
        ("model", {**MODEL, "tool_choice": 5}, "model.tool_choice: expected text or a mapping"),
        ("model", {**MODEL, "params": None}, "model.params: expected a mapping"),
        ("model", {**MODEL, "params": {"messages": 1}}, "'messages' cannot be set in model.params"),
        ("model", {**MODEL, "stream": "maybe"}, "model.stream: expected true or false"),
        ("prompt", {"template": "a", "messages": [{"role": "user", "content": "x"}]}, "either"),
        ("prompt", {"messages": [{"role": "bot", "content": "x"}]}, "must be one of 'system'"),
        ("prompt", {"messages": []}, "prompt.messages: needs at least 1 item"),
        ("prompt", {"template": ""}, "prompt.template: must not be empty"),
        ("prompt", None, "prompt: expected a mapping with keys among system, template"),
        ("name", "bad name", "name: 'bad name' is not a valid name: use letters, digits"),
        ("input", "x.csv", "input: expected a mapping with keys among path, id_column"),
        ("input", {"path": 5}, "input.path: expected text, got 5"),
        ("output", {"schema": "x"}, "output.schema: expected a mapping"),
        ("output", {"schema_retries": -1}, "output.schema_retries: must be at least 0"),
    ],
)
def test_spec_errors_are_worded_by_the_project(section: str, value: Any, expected: str) -> None:
    data = copy.deepcopy(BASE)
    data[section] = value
    with pytest.raises(SpecError) as caught:
        parse_spec(data)
    message = str(caught.value)
    assert expected in message
    assert not any(word in message for word in PYDANTIC_WORDS), message


NESTED_TYPO = {"type": "object", "properties": {"tags": {"type": "array", "itmes": {}}}}
IN_ANY_OF = {"type": "object", "properties": {"a": {"anyOf": [{"maxLenght": 3}]}}}


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        (
            {"label": {"enmu": ["a", "b"]}},
            "output.schema.label: unknown JSON Schema keyword 'enmu' (did you mean 'enum'?)",
        ),
        ({"label": {"enum": []}}, "output.schema.label.enum: an empty list allows no answer"),
        ({"n": {"type": "numbr"}}, "output.schema.n.type: unknown type 'numbr' (did you mean"),
        ({"n": "integr"}, "output.schema.n: unknown type 'integr' (did you mean 'integer'?"),
        (
            {"n": {"type": "number", "minimum": "low"}},
            "output.schema.n.minimum: not valid JSON Schema: 'low' is not of type 'number'",
        ),
        (NESTED_TYPO, "output.schema.properties.tags: unknown JSON Schema keyword 'itmes'"),
        (IN_ANY_OF, "output.schema.properties.a.anyOf.0: unknown JSON Schema keyword"),
    ],
)
def test_schema_keywords_are_checked_with_did_you_mean(
    schema: dict[str, Any], expected: str
) -> None:
    with pytest.raises(SpecError) as caught:
        OutputSchema(schema)
    assert expected in str(caught.value)


def test_annotations_and_nested_schemas_are_accepted() -> None:
    schema = OutputSchema(
        {
            "label": {"enum": ["a", "b"], "description": "the class"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}},
            "where": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    )
    assert schema.columns == ["label", "tags", "where"]


def test_template_variables_get_a_did_you_mean() -> None:
    renderer = PromptRenderer(PromptSpec(template="{{ txt }} ({{ ratng }} stars) {{ zzz }}"))
    with pytest.raises(SpecError) as caught:
        renderer.check_columns(["text", "rating"])
    message = str(caught.value)
    assert "{{ txt }} (did you mean {{ text }}?)" in message
    assert "{{ ratng }} (did you mean {{ rating }}?)" in message
    assert "{{ zzz }} not found" in message


def test_validate_refuses_a_misspelt_schema_keyword_before_sending(tmp_path: Path) -> None:
    reviews(3).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, None, output__schema={"label": {"enmu": ["a", "b"]}})
    result = run_cli("validate", str(job), cwd=tmp_path)
    assert result.returncode == 2
    assert "did you mean 'enum'?" in result.stderr
