"""Structured output lands in typed columns; invalid answers are retried, then recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_job, reviews, run_cli

from pipeline.simulator import RunningSimulator, expected_structured
from pipeline.structured import OutputSchema, normalize

MODEL = "x-ai-grok-3-mini"
COMPACT = {
    "label": {"enum": ["positive", "negative", "neutral"]},
    "confidence": "number",
    "stars": "integer",
    "urgent": "boolean",
    "tags": ["string"],
    "buyer": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    },
}
TYPES = {
    "label": pa.dictionary(pa.int32(), pa.string()),
    "confidence": pa.float64(),
    "stars": pa.int64(),
    "urgent": pa.bool_(),
    "tags": pa.list_(pa.string()),
    "buyer": pa.struct([("name", pa.string()), ("age", pa.int64())]),
}
PROTOCOLS = {
    "json_schema": {},
    "json_object": {"model__provider": "modelslab"},
    "tool": {"model__provider": "anthropic"},
}


def sent_messages(text: str, protocol: str = "json_schema") -> list[dict[str, str]]:
    system = "You are terse."
    if protocol == "json_object":  # the schema travels in the system prompt
        system += "\n\n" + OutputSchema(COMPACT).instructions()
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Summarize: {text}"},
    ]


def run_schema_job(
    workdir: Path, simulator: RunningSimulator, protocol: str, **overrides: Any
) -> tuple[int, Path, str]:
    where = {
        "json_schema": {},
        "json_object": {"model__base_url": f"{simulator.url}/api/v7/llm"},
        "tool": {"model__base_url": simulator.url},
    }[protocol]
    job = make_job(
        workdir,
        simulator,
        name=protocol,
        output__path=f"out/{protocol}.parquet",
        output__schema=COMPACT,
        **PROTOCOLS[protocol],
        **where,
        **overrides,
    )
    result = run_cli("run", str(job), "--quiet", cwd=workdir)
    return result.returncode, workdir / "out" / f"{protocol}.parquet", result.stderr


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    reviews(6).write_csv(tmp_path / "reviews.csv")
    return tmp_path


@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_schema_properties_become_typed_columns(
    workdir: Path, simulator: RunningSimulator, protocol: str
) -> None:
    code, path, stderr = run_schema_job(workdir, simulator, protocol)

    assert code == 0, stderr
    schema = pq.read_schema(path)
    assert {name: schema.field(name).type for name in TYPES} == TYPES
    assert schema.names[-len(TYPES) :] == list(TYPES)
    out = pl.read_parquet(path)
    schema_json = normalize(COMPACT)
    for row in out.iter_rows(named=True):
        messages = sent_messages(row["text"], protocol)
        expected = expected_structured(MODEL, messages, schema_json)
        assert {name: row[name] for name in TYPES} == expected
        assert orjson.loads(row["response"]) == expected
        assert row["error"] is None


def test_an_invalid_answer_is_asked_again(workdir: Path, simulator: RunningSimulator) -> None:
    data = reviews(6).with_columns(
        pl.when(pl.int_range(pl.len()) < 3)
        .then(pl.col("text") + " [[sim:bad_json]]")
        .otherwise(pl.col("text"))
        .alias("text")
    )
    data.write_csv(workdir / "reviews.csv")

    code, path, stderr = run_schema_job(workdir, simulator, "json_schema")

    assert code == 0, stderr
    out = pl.read_parquet(path)
    assert out["attempts"].to_list()[:3] == [2, 2, 2]
    assert out["error"].null_count() == out.height


@pytest.mark.parametrize("protocol", ["json_schema", "tool"])
def test_persistently_invalid_answers_are_schema_violations(
    workdir: Path, simulator: RunningSimulator, protocol: str
) -> None:
    data = reviews(4).with_columns(
        pl.when(pl.col("review_id") == "R001")
        .then(pl.lit("broken [[sim:always_bad_json]]"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    data.write_csv(workdir / "reviews.csv")

    code, path, stderr = run_schema_job(workdir, simulator, protocol, output__schema_retries=2)

    assert code == 1, stderr
    rows = {r["review_id"]: r for r in pl.read_parquet(path).iter_rows(named=True)}
    bad = rows["R001"]
    assert bad["error"].startswith("schema_violation")
    assert bad["attempts"] == 3
    assert bad["response"], "the raw answer is kept for inspection"
    assert bad["label"] is None and bad["confidence"] is None
    assert all(rows[k]["error"] is None for k in ("R000", "R002", "R003"))


def test_tool_calls_land_with_parsed_arguments(workdir: Path, simulator: RunningSimulator) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "file_ticket",
            "description": "File a support ticket.",
            "parameters": {
                "type": "object",
                "properties": {
                    "priority": {"type": "integer"},
                    "team": {"enum": ["billing", "tech"]},
                },
                "required": ["priority", "team"],
            },
        },
    }
    job = make_job(workdir, simulator, model__tools=[tool], model__tool_choice="required")

    result = run_cli("run", str(job), "--quiet", cwd=workdir)

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(workdir / "out" / "result.parquet")
    assert (
        pq.read_schema(workdir / "out" / "result.parquet").field("tool_calls").type == pa.string()
    )
    for row in out.iter_rows(named=True):
        calls = orjson.loads(row["tool_calls"])
        expected = expected_structured(
            MODEL, sent_messages(row["text"]), tool["function"]["parameters"]
        )
        assert [c["name"] for c in calls] == ["file_ticket"]
        assert calls[0]["arguments"] == expected
        assert row["finish_reason"] == "tool_calls"


def test_schema_property_named_like_an_output_column_is_refused(
    workdir: Path, simulator: RunningSimulator
) -> None:
    job = make_job(workdir, simulator, output__schema={"response": "string"})

    result = run_cli("validate", str(job), cwd=workdir)

    assert result.returncode == 2
    assert "output.schema" in result.stderr and "response" in result.stderr
