"""`pipeline estimate` and `pipeline models`: answers before any paid request."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
from conftest import make_job, reviews, run_cli

from pipeline.simulator import RunningSimulator


def estimated_input_tokens(stdout: str) -> int:
    match = re.search(r"input tokens: ([\d,]+)", stdout)
    assert match, stdout
    return int(match.group(1).replace(",", ""))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    reviews(40).write_csv(tmp_path / "reviews.csv")
    return tmp_path


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_estimate_sends_no_completion_and_is_within_ten_percent(
    workdir: Path, simulator: RunningSimulator, protocol: str
) -> None:
    extra = (
        {"model__provider": "anthropic", "model__base_url": simulator.url}
        if protocol == "anthropic"
        else {}
    )
    job = make_job(workdir, simulator, **extra)

    estimated = run_cli("estimate", str(job), cwd=workdir)

    assert estimated.returncode == 0, estimated.stderr
    assert simulator.stats()["completions"] == 0
    assert "cost range" in estimated.stdout and "time at the configured limits" in estimated.stdout
    if protocol == "anthropic":
        assert "count_tokens endpoint" in estimated.stdout
    assert run_cli("run", str(job), "--quiet", cwd=workdir).returncode == 0
    actual = pl.read_parquet(workdir / "out" / "result.parquet")["prompt_tokens"].sum()
    assert abs(estimated_input_tokens(estimated.stdout) - actual) <= 0.1 * actual


def test_a_sample_is_measured_and_reused_by_the_run(
    workdir: Path, simulator: RunningSimulator
) -> None:
    job = make_job(workdir, simulator, limits__requests_per_minute=600)

    estimated = run_cli("estimate", str(job), "--sample", "5", cwd=workdir)

    assert estimated.returncode == 0, estimated.stderr
    assert simulator.stats()["completions"] == 5
    assert "measured on 5 sampled row(s)" in estimated.stdout
    assert "expected cost: $" in estimated.stdout
    assert re.search(r"about 4s \(requests_per_minute\)", estimated.stdout), estimated.stdout
    assert not (workdir / "out" / "result.parquet").exists(), "a sample writes no output"
    assert run_cli("run", str(job), "--quiet", cwd=workdir).returncode == 0
    assert simulator.stats()["completions"] == 40, "the sampled rows are not paid for twice"


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
def test_models_lists_what_the_server_serves(
    simulator: RunningSimulator, tmp_path: Path, protocol: str
) -> None:
    base = simulator.base_url if protocol == "openai" else simulator.url
    result = run_cli(
        "models",
        "--provider",
        protocol,
        "--base-url",
        base,
        "--api-key-env",
        "SIM_API_KEY",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert "x-ai-grok-3-mini" in result.stdout.split()
    assert simulator.stats()["completions"] == 0


def test_models_with_a_rejected_key_exits_3(simulator: RunningSimulator, tmp_path: Path) -> None:
    result = run_cli(
        "models",
        "--provider",
        "openai",
        "--base-url",
        simulator.base_url,
        "--api-key-env",
        "SIM_API_KEY",
        cwd=tmp_path,
        key="sk-wrong",
    )

    assert result.returncode == 3
    assert "sk-wrong" not in result.stderr


def test_estimate_prices_only_rows_left_and_a_sample_on_a_finished_job_reads_its_answers(
    workdir: Path, simulator: RunningSimulator
) -> None:
    job = make_job(workdir, simulator)
    whole = estimated_input_tokens(run_cli("estimate", str(job), cwd=workdir).stdout)
    reviews(30).write_csv(workdir / "reviews.csv")  # 30 rows answered, then 10 more arrive
    assert run_cli("run", str(job), "--quiet", cwd=workdir).returncode == 0
    reviews(40).write_csv(workdir / "reviews.csv")

    left = run_cli("estimate", str(job), cwd=workdir)

    assert left.returncode == 0, left.stderr
    assert "rows: 10 to send (30 answered by earlier runs are paid for" in left.stdout
    assert estimated_input_tokens(left.stdout) < whole / 3
    assert run_cli("run", str(job), "--quiet", cwd=workdir).returncode == 0
    paid = simulator.stats()["completions"]

    finished = run_cli("estimate", str(job), "--sample", "5", cwd=workdir)

    assert finished.returncode == 0, finished.stderr
    assert simulator.stats()["completions"] == paid, "answered rows are measured, not bought"
    assert "rows: 0 to send" in finished.stdout
    assert "measured on 5 sampled row(s) (answered earlier: nothing sent): " in finished.stdout
    assert "expected cost: $0.0000" in finished.stdout
