"""The Python API: DataFrame in, DataFrame out, same engine and semantics as the CLI."""

from __future__ import annotations

from pathlib import Path

import anyio
import polars as pl
import pytest
from conftest import SIM_KEY, make_job, reviews, run_cli

import pipeline
from pipeline.simulator import RunningSimulator, expected_response

MODEL = "x-ai-grok-3-mini"


@pytest.fixture
def job(
    tmp_path: Path, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> pipeline.Job:
    monkeypatch.setenv("SIM_API_KEY", SIM_KEY)
    monkeypatch.chdir(tmp_path)
    return pipeline.Job.from_yaml(make_job(tmp_path, simulator, input_path="unused.csv"))


def answers(frame: pl.DataFrame) -> list[str]:
    return [
        expected_response(
            MODEL,
            [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": f"Summarize: {text}"},
            ],
        )
        for text in frame["text"]
    ]


def comparable(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.drop("latency_s")


def test_public_api_is_exported() -> None:
    assert sorted(pipeline.__all__) == sorted(dir(pipeline))
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None


def test_run_on_polars_matches_the_cli(
    tmp_path: Path, job: pipeline.Job, simulator: RunningSimulator
) -> None:
    data = reviews(10)
    data.write_csv(tmp_path / "reviews.csv")
    cli_job = make_job(tmp_path, simulator, name="cli", output__path="out/cli.parquet")
    assert run_cli("run", str(cli_job), cwd=tmp_path).returncode == 0

    result = pipeline.run(job, data=data, progress=False)

    assert result["response"].to_list() == answers(data)
    assert comparable(result).equals(comparable(pl.read_parquet(tmp_path / "out" / "cli.parquet")))


def test_run_on_pandas_gives_the_same_rows(job: pipeline.Job) -> None:
    data = reviews(6)

    from_polars = pipeline.run(job, data=data, progress=False, output="out/a.parquet")
    from_pandas = pipeline.run(job, data=data.to_pandas(), progress=False, output="out/b.parquet")

    assert comparable(from_pandas).equals(comparable(from_polars))


def test_job_from_keyword_arguments_is_validated(simulator: RunningSimulator) -> None:
    with pytest.raises(pipeline.SpecError, match="did you mean 'template'"):
        pipeline.Job(model={"provider": "openai", "model": "m"}, prompt={"templte": "x"})


def test_job_from_dicts_runs(
    tmp_path: Path, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INLINE_KEY", SIM_KEY)
    job = pipeline.Job(
        name="inline",
        model={
            "provider": "openai",
            "model": MODEL,
            "base_url": simulator.base_url,
            "api_key_env": "INLINE_KEY",
        },
        prompt={"system": "You are terse.", "template": "Summarize: {{ text }}"},
    )
    data = reviews(3)

    result = pipeline.run(job, data=data, progress=False)

    assert result["response"].to_list() == answers(data)
    assert (tmp_path / "out" / "inline.parquet").exists()


def test_run_inside_a_running_loop_points_to_arun(job: pipeline.Job) -> None:
    async def inside() -> None:
        with pytest.raises(RuntimeError, match="arun"):
            pipeline.run(job, data=reviews(2), progress=False)

    anyio.run(inside)


def test_arun_works_inside_a_running_loop(job: pipeline.Job) -> None:
    seen: list[str] = []

    async def inside() -> pl.DataFrame:
        return await pipeline.arun(
            job, data=reviews(5), progress=False, on_result=lambda r: seen.append(r.key)
        )

    result = anyio.run(inside)

    assert result.height == 5
    assert sorted(seen) == sorted(result["review_id"].to_list())


def test_interrupted_run_resumes_without_resending(
    job: pipeline.Job, simulator: RunningSimulator
) -> None:
    data = reviews(30)
    small = pipeline.Job(
        job.spec.model_copy(
            update={
                "limits": job.spec.limits.model_copy(
                    update={"max_cost_usd": 0.0004, "concurrency": 2}
                )
            }
        )
    )

    with pytest.raises(pipeline.RunFailed, match="max_cost_usd"):
        pipeline.run(small, data=data, progress=False)
    first = simulator.stats()["completions"]
    assert 0 < first < 30

    result = pipeline.run(job, data=data, progress=False)

    stats = simulator.stats()
    assert result["response"].to_list() == answers(data)
    assert stats["completions"] == 30, "finished rows must not be sent again"
    assert stats["duplicate_paid"] == 0
