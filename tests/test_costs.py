"""Costs add up: every paid attempt counts, reported costs win, unknown stays unknown."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import make_job, reviews, run_cli

from pipeline.config import Price
from pipeline.runlog import read_events
from pipeline.simulator import RunningSimulator
from pipeline.spend import RowSpend, attempt_cost
from pipeline.types import Completion, RowResult, Usage

SCHEMA = {"label": {"enum": ["good", "bad"]}}
PRICE = Price(input=1.0, cached_input=0.5, output=2.0)  # dollars per million tokens


def completion(prompt: int, output: int, reported: float | None = None) -> Completion:
    usage = Usage(prompt, output, 0, 0, prompt + output)
    return Completion("x", None, usage, "stop", "m", reported_cost_usd=reported)


def test_a_row_keeps_the_total_of_every_paid_attempt() -> None:
    spend = RowSpend()
    first, second = completion(100, 10), completion(120, 20)
    spend.add(first, attempt_cost(first, PRICE))
    spend.add(second, attempt_cost(second, PRICE))
    result = spend.charge(RowResult(0, "k", "h", 2, 0.1, completion=second))
    assert result.completion is not None and result.completion.usage is not None
    assert result.completion.usage.prompt_tokens == 220
    assert result.completion.usage.completion_tokens == 30
    assert result.cost_usd == pytest.approx((220 * 1.0 + 30 * 2.0) / 1e6)


def test_a_reported_cost_wins_over_the_price_table() -> None:
    assert attempt_cost(completion(100, 10, reported=0.25), PRICE) == 0.25


def test_one_attempt_at_an_unknown_price_makes_the_row_cost_unknown() -> None:
    spend = RowSpend()
    spend.add(completion(1, 1), 0.001)
    spend.add(completion(1, 1), None)
    assert spend.charge(RowResult(0, "k", "h", 2, 0.1)).cost_usd is None


def test_schema_retries_are_counted_in_tokens_and_cost(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    data = reviews(6).with_columns(
        pl.when(pl.int_range(pl.len()) < 3)
        .then(pl.col("text") + " [[sim:bad_json]]")
        .otherwise(pl.col("text"))
        .alias("text")
    )
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, output__schema=SCHEMA, output__schema_retries=1)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet").sort("review_id")
    paid = simulator.stats()["completions"]
    assert paid == 9  # three rows were answered twice
    # Each row's tokens and cost are the sum of its paid attempts.
    assert out["attempts"].to_list() == [2, 2, 2, 1, 1, 1]
    retried, once = out[:3], out[3:]
    assert min(retried["prompt_tokens"]) > max(once["prompt_tokens"])
    costs = [
        e["cost_usd"]
        for e in read_events(tmp_path / "out" / "result.parquet.run" / "events.jsonl")
        if e["event"] == "attempt"
    ]
    assert sum(costs) == pytest.approx(out["cost_usd"].sum())


def test_an_unknown_price_prints_unknown(tmp_path: Path, simulator: RunningSimulator) -> None:
    reviews(3).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, model__model="sim-unpriced-model")
    simulator.configure(accept_any_model=True)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "cost: unknown this run, unknown all finished rows" in result.stderr
    assert "$0.000000" not in result.stderr


def test_the_run_log_is_written_as_attempts_happen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run where no row finishes (nothing to commit) still shows its attempts."""
    from pipeline import runlog

    now = [100.0]
    monkeypatch.setattr(runlog.time, "monotonic", lambda: now[0])
    path = tmp_path / "events.jsonl"
    log = runlog.RunLog(path, write_every_s=runlog.WRITE_EVERY_S)
    log.attempt("r1", 1, status=429, latency_s=0.1, outcome="rate_limited", in_flight=1)
    assert read_events(path) == []  # buffered for now
    now[0] += runlog.WRITE_EVERY_S
    log.attempt("r1", 2, status=429, latency_s=0.1, outcome="rate_limited", in_flight=1)
    assert [e["attempt"] for e in read_events(path)] == [1, 2]
