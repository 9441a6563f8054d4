"""Bad jobs and bad inputs are refused with exit 2, a message naming the problem, and
not a single request sent."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import make_job, reviews, run_cli

from pipeline.simulator import RunningSimulator


def refused(result: object, simulator: RunningSimulator) -> str:
    assert result.returncode == 2, result.stderr  # type: ignore[attr-defined]
    assert simulator.stats()["requests"] == 0
    return result.stderr  # type: ignore[attr-defined]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    reviews(5).write_csv(tmp_path / "reviews.csv")
    return tmp_path


@pytest.mark.parametrize("command", ["validate", "run"])
def test_unknown_key_is_named_with_a_hint(
    workdir: Path, simulator: RunningSimulator, command: str
) -> None:
    job = make_job(workdir, simulator, limits__concurency=4)

    message = refused(run_cli(command, str(job), cwd=workdir), simulator)

    assert "limits.concurency" in message
    assert "did you mean 'concurrency'" in message


def test_template_variable_missing_from_columns(workdir: Path, simulator: RunningSimulator) -> None:
    job = make_job(workdir, simulator, prompt__template="Summarize {{ body }}")

    message = refused(run_cli("run", str(job), cwd=workdir), simulator)

    assert "body" in message and "review_id" in message


def test_duplicate_ids(workdir: Path, simulator: RunningSimulator) -> None:
    pl.concat([reviews(5), reviews(2)]).write_csv(workdir / "reviews.csv")
    job = make_job(workdir, simulator)

    message = refused(run_cli("run", str(job), cwd=workdir), simulator)

    assert "review_id" in message and "unique" in message and "R000" in message


def test_missing_input_file(workdir: Path, simulator: RunningSimulator) -> None:
    job = make_job(workdir, simulator, input_path="nope.csv")

    message = refused(run_cli("run", str(job), cwd=workdir), simulator)

    assert "nope.csv" in message


def test_unreadable_parquet(workdir: Path, simulator: RunningSimulator) -> None:
    (workdir / "broken.parquet").write_bytes(b"this is not parquet at all")
    job = make_job(workdir, simulator, input_path="broken.parquet")

    message = refused(run_cli("run", str(job), cwd=workdir), simulator)

    assert "broken.parquet" in message


def test_missing_key_variable(workdir: Path, simulator: RunningSimulator) -> None:
    job = make_job(workdir, simulator)

    message = refused(run_cli("run", str(job), cwd=workdir, key=None), simulator)

    assert "SIM_API_KEY" in message


def test_output_column_collision(workdir: Path, simulator: RunningSimulator) -> None:
    reviews(3).with_columns(pl.lit("x").alias("response")).write_csv(workdir / "reviews.csv")
    job = make_job(workdir, simulator)

    message = refused(run_cli("run", str(job), cwd=workdir), simulator)

    assert "response" in message


def test_unknown_provider_lists_the_known_ones(workdir: Path, simulator: RunningSimulator) -> None:
    job = make_job(workdir, simulator, model__provider="openia")

    message = refused(run_cli("run", str(job), cwd=workdir), simulator)

    assert "openia" in message and "openai" in message


def test_bad_yaml_names_the_file(workdir: Path, simulator: RunningSimulator) -> None:
    job = workdir / "broken.yaml"
    job.write_text("input: [unclosed\n")

    message = refused(run_cli("run", str(job), cwd=workdir), simulator)

    assert "broken.yaml" in message


def test_existing_output_is_untouched_by_a_refused_run(
    workdir: Path, simulator: RunningSimulator
) -> None:
    (workdir / "out").mkdir()
    (workdir / "out" / "result.parquet").write_bytes(b"precious")
    job = make_job(workdir, simulator, prompt__template="{{ missing }}")

    refused(run_cli("run", str(job), cwd=workdir), simulator)

    assert (workdir / "out" / "result.parquet").read_bytes() == b"precious"


def test_validate_accepts_a_good_job(workdir: Path, simulator: RunningSimulator) -> None:
    job = make_job(workdir, simulator)

    result = run_cli("validate", str(job), cwd=workdir)

    assert result.returncode == 0, result.stderr
    assert "5 rows" in result.stdout
    assert simulator.stats()["requests"] == 0
