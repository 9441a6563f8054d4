"""Batch mode end to end: the real CLI against the simulator's batch endpoints."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
from conftest import make_job, messages_for, reviews, run_cli

from pipeline.output import OUTPUT_COLUMNS
from pipeline.simulator import RunningSimulator, expected_reasoning, expected_response

MODEL = "x-ai-grok-3-mini"
BATCH = {"model__batch": True, "model__batch_poll_s": 0.1}


def online_cost(row: dict[str, object]) -> float:
    prompt = int(row["prompt_tokens"])  # type: ignore[call-overload]
    output = int(row["completion_tokens"]) + int(row["reasoning_tokens"])  # type: ignore[call-overload]
    return (prompt * 0.30 + output * 0.50) / 1e6


def test_openai_batch_with_failures_and_expiry_finishes_every_row_at_half_price(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=0.5, batch_fail_rate=0.05, batch_expire_rate=0.03)
    data = reviews(2000)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, **BATCH, limits__max_attempts=6)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.columns == [*data.columns, *OUTPUT_COLUMNS]
    assert out["review_id"].to_list() == data["review_id"].to_list()
    assert out["error"].null_count() == len(out)
    for row in out.iter_rows(named=True):
        messages = messages_for(row["text"])
        assert row["response"] == expected_response(MODEL, messages)
        assert row["reasoning"] == expected_reasoning(MODEL, messages)
        assert math.isclose(row["cost_usd"], online_cost(row) / 2, rel_tol=1e-9)
    stats = simulator.stats()
    assert stats["requests"] == 0  # no chat-completion endpoint was called
    assert stats["duplicate_paid"] == 0
    assert stats["batches_created"] >= 2  # failed and expired requests went into later batches
    assert stats["batch_requests_paid"] == 2000
    assert (out["attempts"] > 1).sum() > 0


def test_anthropic_batch_with_failures_and_expiry_finishes_every_row_at_half_price(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=0.5, batch_fail_rate=0.05, batch_expire_rate=0.03)
    data = reviews(500)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(
        tmp_path,
        simulator,
        **BATCH,
        model__provider="anthropic",
        model__base_url=simulator.url,
        limits__max_attempts=6,
    )

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["review_id"].to_list() == data["review_id"].to_list()
    assert out["error"].null_count() == len(out)
    for row in out.iter_rows(named=True):
        assert row["response"] == expected_response(MODEL, messages_for(row["text"]))
        assert row["finish_reason"] == "stop"
        assert math.isclose(row["cost_usd"], online_cost(row) / 2, rel_tol=1e-9)
    stats = simulator.stats()
    assert stats["requests"] == 0  # no Messages call: everything went through batches
    assert stats["duplicate_paid"] == 0
    assert stats["batches_created"] >= 2
    assert stats["batch_requests_paid"] == 500


def test_provider_without_batch_api_is_refused_naming_those_with_one(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(5).write_csv(tmp_path / "reviews.csv")
    job = make_job(
        tmp_path, simulator, **BATCH, model__provider="modelslab", model__base_url=simulator.url
    )

    for command in ("validate", "run"):
        result = run_cli(command, str(job), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "model.batch: provider 'modelslab' has no batch API" in result.stderr
        assert "for x-ai-grok-3-mini: xai" in result.stderr
    assert simulator.stats()["requests"] == 0
    assert simulator.stats()["batches_created"] == 0


def test_batch_switch_on_the_command_line_is_refused_the_same_way(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(5).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, model__provider="modelslab", model__base_url=simulator.url)

    result = run_cli("run", str(job), "--batch", cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert "has no batch API" in result.stderr
    assert simulator.stats()["requests"] == 0
