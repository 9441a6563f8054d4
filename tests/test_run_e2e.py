"""`pipeline run` end to end: the real CLI, a real simulator, real sockets, real Parquet."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import ROOT, SIM_KEY, make_job, messages_for, reviews, run_cli

from pipeline.columns import RESULT_NAMES
from pipeline.simulator import (
    RunningSimulator,
    estimate_prompt_tokens,
    expected_reasoning,
    expected_response,
)

MODEL = "x-ai-grok-3-mini"
SYSTEM = "You are terse."


def read_output(workdir: Path) -> pl.DataFrame:
    return pl.read_parquet(workdir / "out" / "result.parquet")


def test_csv_job_writes_every_row_with_its_own_answer(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    data = reviews(25)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = read_output(tmp_path)
    assert out.columns == [*data.columns, *RESULT_NAMES]
    assert out["review_id"].to_list() == data["review_id"].to_list()
    for row in out.iter_rows(named=True):
        messages = messages_for(row["text"])
        assert row["response"] == expected_response(MODEL, messages)
        assert row["reasoning"] == expected_reasoning(MODEL, messages)
        assert row["prompt_tokens"] == estimate_prompt_tokens(messages)
        assert row["total_tokens"] == (
            row["prompt_tokens"] + row["completion_tokens"] + row["reasoning_tokens"]
        )
        billed = (
            row["prompt_tokens"] * 0.30
            + (row["completion_tokens"] + row["reasoning_tokens"]) * 0.50
        )
        assert math.isclose(row["cost_usd"], billed / 1e6, rel_tol=1e-9)
        assert row["finish_reason"] == "stop"
        assert row["model"] == MODEL
        assert row["attempts"] == 1
        assert row["latency_s"] >= 0
        assert row["error"] is None
    stats = simulator.stats()
    assert stats["completions"] == 25
    assert stats["duplicate_paid"] == 0
    assert SIM_KEY not in result.stdout + result.stderr


def test_output_has_explicit_arrow_types(tmp_path: Path, simulator: RunningSimulator) -> None:
    reviews(3).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)

    assert run_cli("run", str(job), cwd=tmp_path).returncode == 0

    schema = pq.read_schema(tmp_path / "out" / "result.parquet")
    expected = {
        "response": pa.string(),
        "reasoning": pa.string(),
        "prompt_tokens": pa.int64(),
        "completion_tokens": pa.int64(),
        "reasoning_tokens": pa.int64(),
        "cached_tokens": pa.int64(),
        "total_tokens": pa.int64(),
        "cost_usd": pa.float64(),
        "finish_reason": pa.string(),
        "model": pa.string(),
        "latency_s": pa.float64(),
        "attempts": pa.int64(),
        "error": pa.string(),
    }
    assert {name: schema.field(name).type for name in expected} == expected


def test_parquet_input_without_id_column_keeps_input_order(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    data = reviews(30).drop("review_id")
    data.write_parquet(tmp_path / "reviews.parquet")
    job = make_job(tmp_path, simulator, input_path="reviews.parquet", input__id_column=None)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = read_output(tmp_path)
    assert out["text"].to_list() == data["text"].to_list()
    assert out["response"].to_list() == [
        expected_response(MODEL, messages_for(t)) for t in data["text"]
    ]


def test_glob_input_reads_every_file_in_name_order(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    data = reviews(20)
    (tmp_path / "parts").mkdir()
    data[:7].write_csv(tmp_path / "parts" / "a.csv")
    data[7:].write_csv(tmp_path / "parts" / "b.csv")
    job = make_job(tmp_path, simulator, input_path="parts/*.csv")

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert read_output(tmp_path)["review_id"].to_list() == data["review_id"].to_list()


@pytest.mark.parametrize("style", ["reasoning", "think", "none"])
def test_reasoning_is_found_wherever_the_provider_puts_it(
    tmp_path: Path, simulator: RunningSimulator, style: str
) -> None:
    simulator.configure(reasoning_style=style)
    reviews(4).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)

    assert run_cli("run", str(job), cwd=tmp_path).returncode == 0

    for row in read_output(tmp_path).iter_rows(named=True):
        messages = messages_for(row["text"])
        assert row["response"] == expected_response(MODEL, messages)
        wanted = None if style == "none" else expected_reasoning(MODEL, messages)
        assert row["reasoning"] == wanted


def test_openai_style_usage_bills_reasoning_once(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(usage_style="openai")
    reviews(3).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)

    assert run_cli("run", str(job), cwd=tmp_path).returncode == 0

    for row in read_output(tmp_path).iter_rows(named=True):
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        billed = row["prompt_tokens"] * 0.30 + row["completion_tokens"] * 0.50
        assert math.isclose(row["cost_usd"], billed / 1e6, rel_tol=1e-9)


def test_failed_rows_are_recorded_and_the_job_goes_on(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    data = reviews(6).with_columns(
        pl.when(pl.col("review_id") == "R001")
        .then(pl.lit("always broken [[sim:status=500]]"))
        .when(pl.col("review_id") == "R002")
        .then(pl.lit("invalid [[sim:status=400]]"))
        .when(pl.col("review_id") == "R003")
        .then(pl.lit("flaky [[sim:fail_first=2]]"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__max_attempts=3)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    rows = {r["review_id"]: r for r in read_output(tmp_path).iter_rows(named=True)}
    assert rows["R001"]["error"].startswith("server_error (HTTP 500)")
    assert rows["R001"]["attempts"] == 3
    assert rows["R001"]["response"] is None
    assert rows["R002"]["error"].startswith("bad_request (HTTP 400)")
    assert rows["R002"]["attempts"] == 1, "a bad request must not be retried"
    assert rows["R003"]["error"] is None
    assert rows["R003"]["attempts"] == 3
    assert all(rows[k]["error"] is None for k in ("R000", "R004", "R005"))


def test_rejected_key_stops_the_job_with_exit_3(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(200).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=4)
    wrong_key = "sk-wrong-0123456789abcdef"

    result = run_cli("run", str(job), cwd=tmp_path, key=wrong_key)

    assert result.returncode == 3, result.stderr
    assert "authentication_error" in result.stderr
    assert "API key" in result.stderr
    assert wrong_key not in result.stdout + result.stderr
    assert simulator.stats()["requests"] <= 8, "a job-fatal error must stop sending at once"
    assert not (tmp_path / "out" / "result.parquet").exists()


def test_limit_and_output_override(tmp_path: Path, simulator: RunningSimulator) -> None:
    reviews(10).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)

    result = run_cli(
        "run", str(job), "--limit", "4", "--output", "elsewhere/x.parquet", cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(tmp_path / "elsewhere" / "x.parquet")
    assert out["review_id"].to_list() == ["R000", "R001", "R002", "R003"]
    assert simulator.stats()["completions"] == 4


def test_rerunning_a_finished_job_sends_nothing(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(8).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    assert run_cli("run", str(job), cwd=tmp_path).returncode == 0
    first = read_output(tmp_path)
    simulator.reset()

    again = run_cli("run", str(job), cwd=tmp_path)

    assert again.returncode == 0, again.stderr
    assert simulator.stats()["requests"] == 0
    assert read_output(tmp_path).equals(first)


def test_modelslab_preset_sends_body_key_and_model_id(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(3).write_csv(tmp_path / "reviews.csv")
    job = make_job(
        tmp_path,
        simulator,
        model__provider="modelslab",
        model__base_url=f"{simulator.url}/api/v7/llm",
    )

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert read_output(tmp_path)["error"].null_count() == 3


def test_example_job_runs_on_the_embedded_simulator(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "data", tmp_path / "data")
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")

    result = run_cli("run", "jobs/example.yaml", cwd=tmp_path, key=None)

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "example.parquet")
    source = pl.read_csv(ROOT / "data" / "reviews.csv")
    assert out.height == source.height
    assert out.columns == [*source.columns, *RESULT_NAMES]
    assert out["response"].null_count() == 0
    assert out["reasoning"].null_count() == 0
    assert out["cost_usd"].sum() > 0


def embedded_job(tmp_path: Path, **model: object) -> Path:
    """The example job on the bundled simulator, which the run starts itself."""
    spec = yaml.safe_load((ROOT / "jobs" / "example.yaml").read_text())
    spec["input"]["path"] = "reviews.csv"
    spec["output"]["path"] = "out/example.parquet"
    spec["model"].update(model)
    reviews(40).write_csv(tmp_path / "reviews.csv")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    return job


def assert_every_row_answered(tmp_path: Path) -> None:
    out = pl.read_parquet(tmp_path / "out" / "example.parquet")
    assert out.height == 40
    assert out["error"].null_count() == 40
    assert out["response"].null_count() == 0


def test_batch_job_runs_on_the_embedded_simulator(tmp_path: Path) -> None:
    job = embedded_job(tmp_path, batch=True, batch_poll_s=0.1)

    result = run_cli("run", str(job), "--quiet", cwd=tmp_path, key=None)

    assert result.returncode == 0, result.stderr
    assert_every_row_answered(tmp_path)


def test_cluster_run_reaches_the_embedded_simulator(tmp_path: Path, ray_cluster: str) -> None:
    job = embedded_job(tmp_path)

    result = run_cli(
        "run", str(job), "--ray-address", ray_cluster, "--quiet", cwd=tmp_path, key=None
    )

    assert result.returncode == 0, result.stderr
    assert_every_row_answered(tmp_path)


def test_a_run_does_not_load_pandas_or_the_arrow_dataset_layer(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    # Both are installed alongside (Ray pulls pandas in) and cost half a second of
    # every run when the output is assembled through `pa.array` or `pq.read_table`.
    reviews(5).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)

    result = run_cli("run", str(job), cwd=tmp_path, PYTHONPROFILEIMPORTTIME="1")

    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "pipeline.output" in imported  # the import trace is there to read
    assert "pandas" not in imported
    assert "pyarrow.dataset" not in imported
    assert "pyarrow.compute" not in imported  # 80 ms: result columns are built without it
