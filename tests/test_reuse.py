"""Answers kept when only the generation parameters change (`reuse_across_params`),
through the real CLI against the simulator, which counts every paid answer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import polars as pl
from conftest import make_job, reviews, run_cli

from pipeline.simulator import RunningSimulator

ROWS = 40


def write_reviews(workdir: Path) -> None:
    """Short and long reviews: the simulator's answer repeats the prompt, so a low
    max_tokens cuts the long ones' answers short and leaves the short ones whole."""
    rows = reviews(ROWS).with_columns(
        pl.when(pl.int_range(ROWS) % 3 == 0)
        .then(pl.lit("ok"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    rows.write_csv(workdir / "reviews.csv")


def paid(simulator: RunningSimulator) -> int:
    return int(simulator.stats(full=False)["completions"])


def output(workdir: Path) -> pl.DataFrame:
    return pl.read_parquet(workdir / "out" / "result.parquet")


def run(workdir: Path, simulator: RunningSimulator, max_tokens: int, **more: object) -> int:
    """Run the job with these params; returns the requests it paid for."""
    job = make_job(workdir, simulator, model__params={"max_tokens": max_tokens}, **more)
    before = paid(simulator)
    done = run_cli("run", str(job), "--quiet", cwd=workdir)
    assert done.returncode == 0, done.stderr
    return paid(simulator) - before


def test_raising_max_tokens_resends_only_the_answers_cut_short(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    write_reviews(tmp_path)
    assert run(tmp_path, simulator, 15, reuse_across_params=True) == ROWS
    first = output(tmp_path)
    cut = first.filter(pl.col("finish_reason") == "length").get_column("review_id").to_list()
    assert 0 < len(cut) < ROWS, "the test needs some answers cut short and some whole"

    assert run(tmp_path, simulator, 400, reuse_across_params=True) == len(cut)

    second = output(tmp_path)
    assert second.get_column("finish_reason").to_list() == ["stop"] * ROWS
    kept = first.filter(~pl.col("review_id").is_in(cut)).select("review_id", "response")
    assert kept.equals(second.filter(~pl.col("review_id").is_in(cut)).select(kept.columns))
    # which params gave each kept answer is recorded
    checkpoint = tmp_path / "out" / "result.parquet.run" / "checkpoint.sqlite"
    with sqlite3.connect(checkpoint) as db:
        given = dict(db.execute("SELECT row_key, given_for FROM carried").fetchall())
    assert set(given) == set(kept.get_column("review_id"))
    assert set(given.values()) == {'{"max_tokens":15}'}
    # and the rerun with the same params sends nothing
    assert run(tmp_path, simulator, 400, reuse_across_params=True) == 0


def test_without_the_opt_in_new_params_resend_every_row(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    write_reviews(tmp_path)
    assert run(tmp_path, simulator, 15) == ROWS
    assert run(tmp_path, simulator, 400) == ROWS


def test_rows_keyed_by_request_keep_their_answers_too(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    write_reviews(tmp_path)
    # the short reviews all make one request, sent once
    assert run(tmp_path, simulator, 15, reuse_across_params=True, input__id_column=None) < ROWS
    cut = int((output(tmp_path).get_column("finish_reason") == "length").sum())

    assert run(tmp_path, simulator, 400, reuse_across_params=True, input__id_column=None) == cut
    assert output(tmp_path).get_column("error").null_count() == ROWS


def test_a_step_whose_max_tokens_is_raised_resends_only_its_answers_cut_short(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    write_reviews(tmp_path)

    def run_steps(max_tokens: int) -> int:
        steps = [
            {
                "name": "sentiment",
                "prompt": {"template": "Classify: {{ text }}"},
                "output": {"schema": {"label": {"enum": ["positive", "negative", "neutral"]}}},
            },
            {
                "name": "gist",
                "prompt": {"template": "Gist of this {{ label }} review: {{ text }}"},
                "model": {"params": {"max_tokens": max_tokens}},
            },
        ]
        job = make_job(tmp_path, simulator, prompt=None, steps=steps, reuse_across_params=True)
        before = paid(simulator)
        done = run_cli("run", str(job), "--quiet", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return paid(simulator) - before

    assert run_steps(15) == 2 * ROWS
    first = output(tmp_path)
    cut = first.filter(pl.col("gist_finish_reason") == "length").get_column("review_id")
    assert 0 < cut.len() < ROWS, "the test needs some answers cut short and some whole"

    assert run_steps(400) == cut.len(), "the first step and the whole answers are kept"

    second = output(tmp_path)
    assert second.get_column("gist_finish_reason").to_list() == ["stop"] * ROWS
    assert second.get_column("sentiment_response").equals(first.get_column("sentiment_response"))
    assert run_steps(400) == 0
