"""Batch mode end to end: the real CLI against the simulator's batch endpoints."""

from __future__ import annotations

import math
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
from conftest import make_job, messages_for, reviews, run_cli, start_cli

from pipeline.columns import RESULT_NAMES
from pipeline.simulator import RunningSimulator, expected_reasoning, expected_response
from pipeline.simulator.behaviour import estimate_prompt_tokens

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
    assert out.columns == [*data.columns, *RESULT_NAMES]
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


def chunk_states(workdir: Path) -> list[tuple[str, str | None]]:
    """(state, batch id) of every batch chunk in the job's checkpoint."""
    path = workdir / "out" / "result.parquet.run" / "checkpoint.sqlite"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        try:
            rows = db.execute("SELECT state, batch_id FROM batch_chunks ORDER BY chunk_id")
            return [(str(state), batch) for state, batch in rows]
        except sqlite3.OperationalError:
            return []  # the tables are not created yet


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str]) -> None:
    """Wait on the state (not on a fixed time); fail if the process ends first."""
    deadline = time.monotonic() + 60
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def test_kill_after_the_first_batch_is_created_then_rerun_pays_once(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=3600)
    data = reviews(300)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, **BATCH)

    process = start_cli("run", str(job), "--quiet", cwd=tmp_path)
    wait_for(lambda: simulator.stats()["batches_created"] >= 1, process)
    process.kill()  # SIGKILL: no handler runs, whatever step the run was at
    process.communicate()
    simulator.configure(batch_turnaround_s=0.2)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    stats = simulator.stats()
    assert stats["batches_created"] == 1  # the rerun adopted or resumed it: no second batch
    assert stats["batch_requests_paid"] == 300
    assert stats["duplicate_paid"] == 0
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["review_id"].to_list() == data["review_id"].to_list()
    assert out["error"].null_count() == 300
    for row in out.iter_rows(named=True):
        assert row["response"] == expected_response(MODEL, messages_for(row["text"]))


def test_a_lost_create_response_adopts_the_batch_by_its_metadata(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=0.2, batch_drop_create_response=True)
    reviews(40).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, **BATCH)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    stats = simulator.stats()
    assert stats["batches_created"] == 1
    assert stats["duplicate_paid"] == 0
    assert stats["batch_requests_paid"] == 40


def test_a_batch_that_fails_validation_stops_the_job_showing_its_line_errors(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=0.2)
    data = reviews(10).with_columns(
        pl.when(pl.int_range(pl.len()) == 3)
        .then(pl.col("text") + " [[sim:batch_invalid]]")
        .otherwise(pl.col("text"))
        .alias("text")
    )
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, **BATCH)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 3, result.stderr
    assert "failed validation" in result.stderr
    assert "line 4: body: this request was marked invalid" in result.stderr
    assert not (tmp_path / "out" / "result.parquet").exists()
    assert simulator.stats()["batch_requests_paid"] == 0
    status = run_cli("status", str(job), cwd=tmp_path)
    assert "0/10 rows finished" in status.stdout
    assert ": failed" in status.stdout


def test_anthropic_refusing_a_batch_stops_the_job(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    data = reviews(4).with_columns(pl.col("text") + " [[sim:batch_invalid]]")
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(
        tmp_path, simulator, **BATCH, model__provider="anthropic", model__base_url=simulator.url
    )

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 3, result.stderr
    assert "requests.0: params: this request was marked invalid" in result.stderr
    assert simulator.stats()["batches_created"] == 0


def detached_job(workdir: Path, simulator: RunningSimulator, rows: int) -> Path:
    """A batch job run with --detach, its one batch left running at the provider."""
    simulator.configure(batch_turnaround_s=3600)
    reviews(rows).write_csv(workdir / "reviews.csv")
    job = make_job(workdir, simulator, **BATCH)
    assert run_cli("run", str(job), "--detach", cwd=workdir).returncode == 0
    return job


def test_detach_submits_and_exits_then_status_shows_and_a_rerun_collects(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=3600)
    reviews(30).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, **BATCH)

    detached = run_cli("run", str(job), "--detach", cwd=tmp_path)

    assert detached.returncode == 0, detached.stderr
    assert "submitted: 1 batch(es)" in detached.stderr
    assert not (tmp_path / "out" / "result.parquet").exists()
    status = run_cli("status", str(job), cwd=tmp_path)
    assert "0/30 rows finished" in status.stdout
    assert "batch 1 batch_" in status.stdout and "submitted, provider status" in status.stdout

    simulator.configure(batch_turnaround_s=0.1)
    collected = run_cli("run", str(job), cwd=tmp_path)

    assert collected.returncode == 0, collected.stderr
    assert simulator.stats()["batches_created"] == 1
    assert pl.read_parquet(tmp_path / "out" / "result.parquet")["error"].null_count() == 30
    status = run_cli("status", str(job), cwd=tmp_path)
    assert "30/30 rows finished" in status.stdout
    assert "collected, provider status completed, 30/30 answered" in status.stdout


def test_a_detached_rerun_collects_the_batches_that_have_ended_and_writes_the_output(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = detached_job(tmp_path, simulator, 10)
    assert simulator.finish_batches() == 1

    collected = run_cli("run", str(job), "--detach", cwd=tmp_path)

    assert collected.returncode == 0, collected.stderr
    assert "running at the provider" not in collected.stderr
    assert pl.read_parquet(tmp_path / "out" / "result.parquet")["error"].null_count() == 10
    assert simulator.stats()["batches_created"] == 1


def test_a_run_online_is_refused_while_the_jobs_batches_are_open(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=3600)
    reviews(10).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, model__batch_poll_s=0.05)
    assert run_cli("run", str(job), "--batch", "--detach", cwd=tmp_path).returncode == 0

    online = run_cli("run", str(job), cwd=tmp_path)

    assert online.returncode == 2, online.stderr
    assert "1 batch(es) open at the provider" in online.stderr
    assert "rerun with --batch" in online.stderr
    assert simulator.stats()["completions"] == 0, "no row paid for a second time online"
    simulator.finish_batches()
    collected = run_cli("run", str(job), "--batch", cwd=tmp_path)
    assert collected.returncode == 0, collected.stderr
    assert simulator.stats()["batch_requests_paid"] == 10
    assert simulator.stats()["completions"] == 10, "the batch's answers, and only those"


def test_cancel_stops_open_batches_and_a_later_run_sends_the_rows_again(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = detached_job(tmp_path, simulator, 20)

    cancelled = run_cli("cancel", str(job), cwd=tmp_path)

    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancelling" in cancelled.stdout
    assert simulator.stats()["batch_requests_paid"] == 0
    simulator.configure(batch_turnaround_s=0.1)
    rerun = run_cli("run", str(job), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert simulator.stats()["batches_created"] == 2
    assert simulator.stats()["batch_requests_paid"] == 20
    assert run_cli("cancel", str(job), cwd=tmp_path).stdout.endswith("no open batches\n")


def test_ctrl_c_stops_waiting_and_says_the_batches_go_on(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=3600)
    reviews(20).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, model__batch_poll_s=0.1)

    process = start_cli("run", str(job), "--batch", "--quiet", cwd=tmp_path)
    wait_for(lambda: [s for s, _ in chunk_states(tmp_path)] == ["submitted"], process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr
    assert "the submitted batches go on at the provider" in stderr
    assert f"`pipeline run {job} --batch` resumes" in stderr, "the hint keeps --batch"
    assert simulator.stats()["batches_created"] == 1


def test_rows_finished_online_are_reused_by_a_batch_run_and_back(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=0.1)
    reviews(30).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, model__batch_poll_s=0.1)
    assert run_cli("run", str(job), "--limit", "10", cwd=tmp_path).returncode == 0
    assert simulator.stats()["requests"] == 10

    batch = run_cli("run", str(job), "--batch", cwd=tmp_path)

    assert batch.returncode == 0, batch.stderr
    assert simulator.stats()["batch_requests_paid"] == 20  # only the rows not finished online
    online_again = run_cli("run", str(job), cwd=tmp_path)
    assert online_again.returncode == 0, online_again.stderr
    stats = simulator.stats()
    assert stats["requests"] == 10  # nothing sent: the batch results are reused
    assert stats["duplicate_paid"] == 0
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["error"].null_count() == 30
    costs = out["cost_usd"].to_list()
    for row, cost in zip(out.iter_rows(named=True), costs, strict=True):
        full = online_cost(row)
        assert math.isclose(cost, full if row["review_id"] < "R010" else full / 2, rel_tol=1e-9)


def test_structured_output_and_row_errors_work_as_online(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=0.1)
    schema = {"label": {"enum": ["positive", "negative"]}, "stars": "integer"}
    data = reviews(8).with_columns(
        pl.when(pl.int_range(pl.len()) == 2)
        .then(pl.col("text") + " [[sim:status=400]]")
        .when(pl.int_range(pl.len()) == 5)
        .then(pl.col("text") + " [[sim:bad_json]]")
        .otherwise(pl.col("text"))
        .alias("text")
    )
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, **BATCH, output__schema=schema)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 1, result.stderr  # one row ended in error
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.schema["stars"] == pl.Int64
    bad = out.row(2, named=True)
    assert bad["error"].startswith("bad_request (HTTP 400)")
    assert bad["attempts"] == 1
    good = out.filter(pl.col("error").is_null())
    assert good.height == 7
    assert set(good["label"].to_list()) <= {"positive", "negative"}
    assert good["stars"].null_count() == 0


def test_estimate_shows_online_and_batch_cost_side_by_side(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(2000).write_csv(tmp_path / "reviews.csv")  # costs large enough to print exactly
    job = make_job(tmp_path, simulator)

    result = run_cli("estimate", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("online vs batch"))
    online, batch = line.split(" | ")
    low, high = (float(v) for v in re.findall(r"\$([0-9.]+)", online))
    batch_low, batch_high = (float(v) for v in re.findall(r"\$([0-9.]+)", batch))
    assert math.isclose(batch_low, low / 2, rel_tol=1e-2)
    assert math.isclose(batch_high, high / 2, rel_tol=1e-2)
    assert simulator.stats()["requests"] == 0


def test_a_schema_retry_in_a_later_batch_is_counted_and_charged_as_online(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=0.1)
    data = reviews(4).with_columns(
        pl.when(pl.int_range(pl.len()) == 1)
        .then(pl.col("text") + " [[sim:always_bad_json]]")
        .otherwise(pl.col("text"))
        .alias("text")
    )
    data.write_csv(tmp_path / "reviews.csv")
    schema = {"label": {"enum": ["positive", "negative"]}}
    job = make_job(tmp_path, simulator, **BATCH, output__schema=schema, output__schema_retries=1)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    bad = out.row(1, named=True)
    assert bad["error"].startswith("schema_violation") and bad["attempts"] == 2
    one_attempt = estimate_prompt_tokens(messages_for(bad["text"]))
    assert bad["prompt_tokens"] == 2 * one_attempt  # the usage of both paid answers
    # Both paid answers are charged, at the batch price, as online charges every paid attempt.
    assert math.isclose(bad["cost_usd"], online_cost(bad) / 2, rel_tol=1e-9)
    assert simulator.stats()["batch_requests_paid"] == 5


def test_a_rejected_key_on_a_line_stops_the_job_and_leaves_only_that_row_pending(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=0.1)
    data = reviews(6).with_columns(
        pl.when(pl.int_range(pl.len()) == 2)
        .then(pl.col("text") + " [[sim:status=401]]")
        .otherwise(pl.col("text"))
        .alias("text")
    )
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, **BATCH)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 3, result.stderr
    assert "stopped: authentication_error (HTTP 401)" in result.stderr
    assert "check the key in SIM_API_KEY" in result.stderr
    status = run_cli("status", str(job), cwd=tmp_path)
    assert "5/6 rows finished (0 failed), 1 pending" in status.stdout
    assert simulator.stats()["batches_created"] == 1  # no later batch for the stopped row


def test_detach_is_refused_where_the_batches_cannot_outlive_the_process(tmp_path: Path) -> None:
    reviews(10).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, None, model__provider="simulator", model__base_url=None, **BATCH)

    result = run_cli("run", str(job), "--detach", cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert "--detach" in result.stderr and "bundled simulator" in result.stderr
    assert not list(tmp_path.glob("out/**/*")), "refused before anything was sent or written"


def test_a_batch_the_provider_no_longer_knows_is_named_and_only_its_rows_are_resubmitted(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    job = detached_job(tmp_path, simulator, 20)
    simulator.reset()  # the server that held the batch is gone, and the batch with it
    simulator.configure(batch_turnaround_s=0.1)

    lost = run_cli("run", str(job), cwd=tmp_path)

    assert lost.returncode == 3, lost.stderr
    assert "batch not found" in lost.stderr and "pipeline run --batch" in lost.stderr
    assert "model" not in lost.stderr.split("stopped:")[1], "not mistaken for a model name"
    resubmitted = run_cli("run", str(job), "--batch", cwd=tmp_path)
    assert resubmitted.returncode == 0, resubmitted.stderr
    assert simulator.stats()["batches_created"] == 1
    assert simulator.stats()["batch_requests_paid"] == 20
    assert pl.read_parquet(tmp_path / "out" / "result.parquet")["error"].null_count() == 20


def test_a_batch_run_says_when_it_submits_and_each_change_it_polls_and_times_it(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(batch_turnaround_s=0.5)
    reviews(30).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, **BATCH)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    batch = re.search(r"submitted: batch (\S+) \(30 requests\); polling every 0.1 s", result.stderr)
    assert batch, result.stderr
    assert f"batch {batch.group(1)}: completed, 30/30 answered" in result.stderr
    polled = re.findall(rf"batch {batch.group(1)}: (\w+),", result.stderr)
    assert len(polled) == len(set(polled)), "a line per change of state, not per poll"
    span = re.search(r"time: ([\d.]+)s in all, ([\d.]+)s from first request", result.stderr)
    assert span and 0.5 <= float(span.group(2)) <= float(span.group(1)), result.stderr
    assert "in flight" not in result.stderr.split("requests this run:")[1].splitlines()[0]
