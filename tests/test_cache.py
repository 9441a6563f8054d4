"""The answer cache shared by jobs (`cache:`, `run --cache DIR`), through the real CLI
against the simulator, which counts every paid answer."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import polars as pl
from conftest import make_job, reviews, run_cli, start_cli

from pipeline.simulator import RunningSimulator

ROWS = 12


def paid(simulator: RunningSimulator) -> int:
    return int(simulator.stats(full=False)["completions"])


def project(root: Path, name: str, simulator: RunningSimulator, **more: object) -> Path:
    """A job of its own in its own folder, over the same rows as every other."""
    folder = root / name
    folder.mkdir()
    reviews(ROWS).write_csv(folder / "reviews.csv")
    return make_job(folder, simulator, name=name, **more)


def cached_answers(folder: Path) -> int:
    with sqlite3.connect(folder / "answers.sqlite") as db:
        return int(db.execute("SELECT count(*) FROM answers").fetchone()[0])


def test_a_second_job_with_the_same_requests_sends_nothing(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    cache = tmp_path / "cache"
    first = project(tmp_path, "first", simulator, cache=str(cache))
    second = project(tmp_path, "second", simulator, cache=str(cache))

    assert run_cli("run", str(first), "--quiet", cwd=tmp_path).returncode == 0
    assert paid(simulator) == ROWS
    done = run_cli("run", str(second), "--quiet", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert paid(simulator) == ROWS, "the second job sent nothing"
    assert f"cache: {ROWS} answer(s) reused" in done.stderr
    one = pl.read_parquet(first.parent / "out" / "result.parquet")
    two = pl.read_parquet(second.parent / "out" / "result.parquet")
    assert one.get_column("response").equals(two.get_column("response"))
    # counted as reused at no cost, not as paid
    assert two.get_column("cost_usd").to_list() == [0.0] * ROWS
    assert two.get_column("attempts").to_list() == [0] * ROWS
    assert cached_answers(cache) == ROWS


def test_the_cache_on_the_command_line_and_a_changed_request_is_sent(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    cache = tmp_path / "cache"
    first = project(tmp_path, "first", simulator)
    other_prompt = {"system": "You are terse.", "template": "Summarise: {{ text }}"}
    second = project(tmp_path, "second", simulator, prompt=other_prompt)
    third = project(tmp_path, "third", simulator)

    assert (
        run_cli("run", str(first), "--cache", str(cache), "--quiet", cwd=tmp_path).returncode == 0
    )
    assert (
        run_cli("run", str(second), "--cache", str(cache), "--quiet", cwd=tmp_path).returncode == 0
    )
    assert paid(simulator) == 2 * ROWS, "another template is another request"
    assert (
        run_cli("run", str(third), "--cache", str(cache), "--quiet", cwd=tmp_path).returncode == 0
    )
    assert paid(simulator) == 2 * ROWS


def test_the_cache_keeps_at_most_max_entries(tmp_path: Path, simulator: RunningSimulator) -> None:
    cache = tmp_path / "cache"
    job = project(tmp_path, "first", simulator, cache={"path": str(cache), "max_entries": 5})

    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0

    assert cached_answers(cache) == 5


def test_jobs_running_at_once_share_the_cache_safely(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    cache = tmp_path / "cache"
    jobs = [project(tmp_path, f"job{n}", simulator, cache=str(cache)) for n in range(3)]

    procs = [start_cli("run", str(job), "--quiet", cwd=tmp_path) for job in jobs]
    results = [(proc.wait(timeout=120), proc.communicate()[1]) for proc in procs]

    assert all(code == 0 for code, _ in results), results
    assert cached_answers(cache) == ROWS
    for job in jobs:
        out = pl.read_parquet(job.parent / "out" / "result.parquet")
        assert out.get_column("error").null_count() == ROWS


def test_a_steps_job_uses_the_cache_for_every_step(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    cache = tmp_path / "cache"
    steps = [
        {"name": "first", "prompt": {"template": "One: {{ text }}"}},
        {"name": "second", "prompt": {"template": "Two: {{ first_response }}"}},
    ]
    jobs = [project(tmp_path, f"job{n}", simulator, prompt=None, steps=steps) for n in range(2)]

    for job in jobs:
        done = run_cli("run", str(job), "--cache", str(cache), "--quiet", cwd=tmp_path)
        assert done.returncode == 0, done.stderr

    assert paid(simulator) == 2 * ROWS
