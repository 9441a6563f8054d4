"""The last line of defence: an unexpected error stops sending, keeps what finished,
says so in one line and exits 4; the Python API raises RunFailed with the cause."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from conftest import SIM_KEY, make_job, reviews

import pipeline
from pipeline.checkpoint import Checkpoint
from pipeline.cli import main
from pipeline.providers.openai import OpenAIChat
from pipeline.simulator import RunningSimulator
from pipeline.types import ChatRequest, Completion


class Boom(Exception):
    pass


@pytest.fixture
def crash_on_row_40(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the adapter that only one row triggers."""
    real = OpenAIChat.complete

    async def complete(self: OpenAIChat, request: ChatRequest) -> Completion:
        if request.key == "R040":
            raise Boom("a bug nobody expected")
        return await real(self, request)

    monkeypatch.setattr(OpenAIChat, "complete", complete)


def test_an_unexpected_error_exits_4_with_one_line_and_keeps_finished_rows(
    tmp_path: Path,
    simulator: RunningSimulator,
    monkeypatch: pytest.MonkeyPatch,
    crash_on_row_40: None,
) -> None:
    reviews(400).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=4)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIM_API_KEY", SIM_KEY)
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)

    result = CliRunner().invoke(main, ["run", str(job), "--quiet"])

    assert result.exit_code == 4, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    line = lines[0]
    assert "Boom: a bug nobody expected" in line
    assert "events.jsonl" in line and f"pipeline run {job}" in line
    assert "Traceback" not in result.output
    assert simulator.stats()["requests"] < 400, "sending stopped"
    checkpoint = Checkpoint(tmp_path / "out" / "result.parquet.run" / "checkpoint.sqlite")
    try:
        assert checkpoint.totals().rows >= 30, "rows finished before the crash were committed"
    finally:
        checkpoint.close()


def test_pipeline_debug_shows_the_traceback(
    tmp_path: Path,
    simulator: RunningSimulator,
    monkeypatch: pytest.MonkeyPatch,
    crash_on_row_40: None,
) -> None:
    reviews(60).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIM_API_KEY", SIM_KEY)
    monkeypatch.setenv("PIPELINE_DEBUG", "1")

    result = CliRunner().invoke(main, ["run", str(job), "--quiet"])

    assert result.exit_code == 4
    assert "Traceback" in result.output and "Boom" in result.output


def test_the_python_api_raises_run_failed_with_the_cause_chained(
    tmp_path: Path,
    simulator: RunningSimulator,
    monkeypatch: pytest.MonkeyPatch,
    crash_on_row_40: None,
) -> None:
    monkeypatch.setenv("SIM_API_KEY", SIM_KEY)
    job = pipeline.Job(
        name="crash",
        model={
            "provider": "openai",
            "model": "x-ai-grok-3-mini",
            "base_url": simulator.base_url,
            "api_key_env": "SIM_API_KEY",
        },
        prompt={"template": "Summarize: {{ text }}"},
        input={"path": "unused", "id_column": "review_id"},
        output={"path": str(tmp_path / "out.parquet")},
    )
    data = reviews(60)

    with pytest.raises(pipeline.RunFailed) as failure:
        pipeline.run(job, data, progress=False)

    assert isinstance(failure.value.__cause__, Boom)
    assert failure.value.summary is None
    monkeypatch.undo()
    monkeypatch.setenv("SIM_API_KEY", SIM_KEY)
    done = pipeline.run(job, data, progress=False)
    assert isinstance(done, pl.DataFrame) and done.height == 60


def test_any_command_answers_an_unexpected_error_with_one_line_and_exit_4(
    tmp_path: Path, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    reviews(3).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)

    def broken(*args: object, **kwargs: object) -> None:
        raise Boom("status broke")

    monkeypatch.setattr("pipeline.cli.resolve_job", broken)

    result = CliRunner().invoke(main, ["status", str(job)])

    assert result.exit_code == 4
    assert "Boom: status broke" in result.output and "Traceback" not in result.output
