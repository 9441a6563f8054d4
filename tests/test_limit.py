"""`run --limit N`: a partial run never replaces the job's output, and its rows are kept."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from conftest import make_job, reviews, run_cli

from pipeline.simulator import RunningSimulator


def test_limit_writes_beside_a_complete_output_and_leaves_it_alone(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(12).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    full = tmp_path / "out" / "result.parquet"
    before = full.read_bytes()
    simulator.reset()

    limited = run_cli("run", str(job), "--quiet", "--limit", "5", cwd=tmp_path)

    assert limited.returncode == 0, limited.stderr
    assert full.read_bytes() == before and pl.read_parquet(full).height == 12
    partial = tmp_path / "out" / "result.first-5.parquet"
    assert pl.read_parquet(partial)["review_id"].to_list() == [f"R{i:03d}" for i in range(5)]
    assert f"the first 5 rows are in {Path('out/result.first-5.parquet')}" in limited.stderr
    assert "out/result.parquet (the whole job's output) is left as it was" in limited.stderr
    assert simulator.stats(full=False)["requests"] == 0  # the job's checkpoint had them


def test_rows_of_a_limited_run_are_reused_by_the_full_run(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(12).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    assert run_cli("run", str(job), "--quiet", "--limit", "5", cwd=tmp_path).returncode == 0
    assert not (tmp_path / "out" / "result.parquet").exists()
    assert simulator.stats(full=False)["requests"] == 5

    full = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert full.returncode == 0, full.stderr
    assert simulator.stats(full=False)["requests"] == 12
    assert pl.read_parquet(tmp_path / "out" / "result.parquet").height == 12
    assert "5 reused from earlier runs" in full.stderr


def test_limit_with_output_writes_exactly_there(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(12).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    args = ("run", str(job), "--quiet", "--limit", "3", "--output", "mine.parquet")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert pl.read_parquet(tmp_path / "mine.parquet").height == 3
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.parquet"))


def test_a_fresh_limited_run_sets_nothing_of_the_full_run_aside(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(12).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    simulator.reset()

    limited = run_cli("run", str(job), "--quiet", "--limit", "5", "--fresh", cwd=tmp_path)

    assert limited.returncode == 0, limited.stderr
    assert simulator.stats(full=False)["requests"] == 5  # --fresh: the 5 are asked again
    status = run_cli("status", str(job), cwd=tmp_path).stdout
    assert "test-job: 12/12 rows finished" in status, status
    again = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert simulator.stats(full=False)["requests"] == 5  # the full run sends nothing


def test_fresh_says_what_it_sets_aside_and_keeps_a_copy(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(6).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0

    fresh = run_cli("run", str(job), "--fresh", cwd=tmp_path)

    assert fresh.returncode == 0, fresh.stderr
    assert "--fresh: the 6 row(s) recorded so far" in fresh.stderr
    copies = list((tmp_path / "out" / "result.parquet.run" / "set-aside").glob("*/*.sqlite"))
    assert len(copies) == 1
