"""Protocols and answer shapes: Anthropic Messages beside OpenAI, streaming, multi-turn."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import make_job, messages_for, reviews, run_cli

from pipeline.simulator import RunningSimulator, expected_reasoning, expected_response

MODEL = "x-ai-grok-3-mini"
SYSTEM = "You are terse."


def run_job(
    workdir: Path, simulator: RunningSimulator, name: str, **overrides: object
) -> pl.DataFrame:
    job = make_job(workdir, simulator, name=name, output__path=f"out/{name}.parquet", **overrides)
    result = run_cli("run", str(job), "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return pl.read_parquet(workdir / "out" / f"{name}.parquet")


def anthropic(simulator: RunningSimulator) -> dict[str, object]:
    return {"model__provider": "anthropic", "model__base_url": simulator.url}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    reviews(8).write_csv(tmp_path / "reviews.csv")
    return tmp_path


def test_openai_and_anthropic_give_the_same_columns_and_types(
    workdir: Path, simulator: RunningSimulator
) -> None:
    via_openai = run_job(workdir, simulator, "openai")
    via_anthropic = run_job(workdir, simulator, "anthropic", **anthropic(simulator))

    assert via_anthropic.schema == via_openai.schema
    schema_a = pq.read_schema(workdir / "out" / "anthropic.parquet")
    schema_o = pq.read_schema(workdir / "out" / "openai.parquet")
    assert schema_a.equals(schema_o)
    assert via_anthropic["response"].to_list() == via_openai["response"].to_list()
    assert via_anthropic["error"].null_count() == via_anthropic.height
    for row in via_anthropic.iter_rows(named=True):
        assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        assert row["finish_reason"] == "stop"


def test_anthropic_thinking_becomes_reasoning(workdir: Path, simulator: RunningSimulator) -> None:
    out = run_job(
        workdir,
        simulator,
        "thinking",
        **anthropic(simulator),
        model__params={"max_tokens": 2048, "thinking": {"type": "enabled", "budget_tokens": 1024}},
    )

    for row in out.iter_rows(named=True):
        assert row["reasoning"] == expected_reasoning(MODEL, messages_for(row["text"]))


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_streamed_and_plain_runs_give_identical_rows(
    workdir: Path, simulator: RunningSimulator, protocol: str
) -> None:
    extra = anthropic(simulator) if protocol == "anthropic" else {}
    plain = run_job(workdir, simulator, f"{protocol}-plain", **extra)
    streamed = run_job(workdir, simulator, f"{protocol}-streamed", model__stream=True, **extra)

    assert streamed.drop("latency_s").equals(plain.drop("latency_s"))


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_a_stream_cut_midway_is_retried_never_stored(
    workdir: Path, simulator: RunningSimulator, protocol: str
) -> None:
    simulator.configure(truncate_stream=0.5, seed=3)
    extra = anthropic(simulator) if protocol == "anthropic" else {}

    out = run_job(
        workdir, simulator, f"cut-{protocol}", model__stream=True, limits__max_attempts=10, **extra
    )

    assert simulator.stats()["faults"].get("truncate_stream", 0) > 0, "the fault must have fired"
    for row in out.iter_rows(named=True):
        assert row["error"] is None
        assert row["response"] == expected_response(MODEL, messages_for(row["text"]))
    assert out["attempts"].max() > 1


def test_prompt_messages_send_every_turn(workdir: Path, simulator: RunningSimulator) -> None:
    turns = [
        {"role": "system", "content": "Classify sentiment."},
        {"role": "user", "content": "Great kettle!"},
        {"role": "assistant", "content": "positive"},
        {"role": "user", "content": "{{ text }}"},
    ]
    out = run_job(workdir, simulator, "few-shot", prompt={"messages": turns})

    for row in out.iter_rows(named=True):
        sent = [*turns[:3], {"role": "user", "content": row["text"]}]
        assert row["response"] == expected_response(MODEL, sent)


def test_prompt_needs_one_form(workdir: Path, simulator: RunningSimulator) -> None:
    job = make_job(
        workdir,
        simulator,
        prompt={"template": "x", "messages": [{"role": "user", "content": "y"}]},
    )

    result = run_cli("validate", str(job), cwd=workdir)

    assert result.returncode == 2
    assert "either prompt.template or prompt.messages" in result.stderr
