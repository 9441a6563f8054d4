"""Rows whose prompt renders empty: `validate` warns, `prompt.skip_empty` skips them."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from conftest import make_job, reviews, run_cli

from pipeline.simulator import RunningSimulator


def with_blanks(rows: int, blank: set[int]) -> pl.DataFrame:
    data = reviews(rows)
    texts = [None if i in blank else t for i, t in enumerate(data["text"])]
    return data.with_columns(pl.Series("text", texts, dtype=pl.String))


def test_validate_warns_about_empty_prompts_and_names_the_key(tmp_path: Path) -> None:
    with_blanks(10, {2, 7}).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, None, prompt__system=None, prompt__template="{{ text }}")

    result = run_cli("validate", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "warning: 2 row(s) render an empty prompt (review_id R002, R007)" in result.stderr
    assert "skip_empty: true" in result.stderr


def test_skip_empty_sends_nothing_for_them_and_keeps_each_row_once(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    with_blanks(10, {2, 7}).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, prompt__template="{{ text }}", prompt__skip_empty=True)
    assert "note: 2 row(s)" in run_cli("validate", str(job), cwd=tmp_path).stderr

    result = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "results: 10 ok (2 of them skipped: empty prompt), 0 failed" in result.stderr
    assert simulator.stats(full=False)["requests"] == 8
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["review_id"].to_list() == [f"R{i:03d}" for i in range(10)]
    skipped = out.filter(pl.col("finish_reason") == "skipped")
    assert skipped["review_id"].to_list() == ["R002", "R007"]
    assert skipped["error"].null_count() == 2 and skipped["attempts"].to_list() == [0, 0]

    # A rerun reuses them; turning the key off sends them.
    simulator.reset()
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    assert simulator.stats(full=False)["requests"] == 0
    job = make_job(tmp_path, simulator, prompt__template="{{ text }}")
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    assert simulator.stats(full=False)["requests"] == 2
