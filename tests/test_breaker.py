"""The breaker: systematic failure stops the job; failures now and then never do."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import make_job, reviews, run_cli

from pipeline import errors
from pipeline.breaker import Breaker, default_stall_s, what_to_check
from pipeline.config import ProviderPreset, ProviderSettings
from pipeline.simulator import RunningSimulator


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def bad_request() -> errors.BadRequest:
    return errors.BadRequest("No connected db.", status=400)


def test_the_same_row_error_on_consecutive_rows_stops() -> None:
    breaker = Breaker(same_error_rows=5)
    stops = [breaker.row_failed(bad_request()) for _ in range(5)]
    assert stops[:4] == [None] * 4
    stop = stops[4]
    assert isinstance(stop, errors.SystematicFailure)
    assert "bad_request (HTTP 400)" in str(stop) and "fix and rerun" in stop.advice


def test_a_success_in_between_starts_the_count_afresh() -> None:
    breaker = Breaker(same_error_rows=5)
    for _ in range(10):
        for _ in range(4):
            assert breaker.row_failed(bad_request()) is None
        breaker.succeeded()


def test_different_errors_do_not_add_up() -> None:
    breaker = Breaker(same_error_rows=3)
    for i in range(12):
        error = bad_request() if i % 2 else errors.ServerError("x", status=500)
        assert breaker.row_failed(error) is None


def test_content_filtered_rows_never_stop_the_job() -> None:
    breaker = Breaker(same_error_rows=2)
    for _ in range(5):
        assert breaker.row_failed(errors.ContentFiltered("no", status=400)) is None


def test_nothing_but_overload_for_too_long_stops() -> None:
    clock = Clock()
    breaker = Breaker(stall_s=60, clock=clock)
    for second in range(60):
        clock.now = float(second)
        assert breaker.answered_with(errors.RateLimited("slow down", status=429)) is None
    clock.now = 60.0
    stop = breaker.answered_with(errors.ServerError("down", status=503))
    assert isinstance(stop, errors.SystematicFailure)
    assert "no request has succeeded for 60s" in str(stop)


def test_overload_with_successes_in_between_never_stops() -> None:
    clock = Clock()
    breaker = Breaker(stall_s=60, clock=clock)
    for second in range(600):
        clock.now = float(second)
        assert breaker.answered_with(errors.RateLimited("slow down", status=429)) is None
        if second % 50 == 0:
            breaker.succeeded()


def test_other_errors_are_left_to_the_row_count() -> None:
    clock = Clock()
    breaker = Breaker(stall_s=10, clock=clock)
    breaker.answered_with(errors.RateLimited("slow", status=429))
    breaker.answered_with(bad_request())
    clock.now = 100.0
    assert breaker.answered_with(errors.RateLimited("slow", status=429)) is None


# -- end to end: the real CLI against the simulator ----------------------------------------


def test_a_gateway_answering_every_request_with_the_same_400_stops_within_a_few_dozen(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(1000).write_csv(tmp_path / "reviews.csv")
    job = make_job(
        tmp_path,
        simulator,
        prompt__template="Summarize: {{ text }} [[sim:status=400]]",
        limits__concurrency=None,
    )

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 3, result.stderr
    assert "bad_request (HTTP 400)" in result.stderr and "fix and rerun" in result.stderr
    assert simulator.stats()["requests"] <= 48
    assert not (tmp_path / "out" / "result.parquet").exists()


def test_a_model_answering_every_request_with_429_stops(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(200).write_csv(tmp_path / "reviews.csv")
    job = make_job(
        tmp_path,
        simulator,
        prompt__template="Summarize: {{ text }} [[sim:status=429]]",
        limits__stall_timeout_s=1,
        limits__max_attempts=100,
    )

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 3, result.stderr
    assert "no request has succeeded" in result.stderr


@pytest.mark.parametrize("every", [3, 10])
def test_rows_that_fail_now_and_then_finish_with_exit_1(
    tmp_path: Path, simulator: RunningSimulator, every: int
) -> None:
    data = reviews(120)
    texts = [
        f"{t} [[sim:status=400]]" if i % every else t for i, t in enumerate(data["text"].to_list())
    ]
    data.with_columns(text=pl.Series(texts)).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 1, result.stderr
    assert pl.read_parquet(tmp_path / "out" / "result.parquet").height == 120


def test_after_a_wrong_key_behind_a_gateway_the_plain_rerun_finishes_every_row_once(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    # A LiteLLM gateway without its key database answers every request with the same
    # 400, which does not say it is about the key: only the breaker can stop it.
    simulator.configure(auth_error_style="litellm")
    reviews(200).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)

    stopped = run_cli("run", str(job), cwd=tmp_path, key="sk-wrong-key")

    assert stopped.returncode == 3, stopped.stderr
    assert simulator.stats()["requests"] <= 48
    cause = stopped.stderr.split("stopped: ", 1)[1]
    assert cause.startswith("bad_request (HTTP 400): Authentication Error, No connected db.")
    assert "SIM_API_KEY" in cause and "`pipeline models --provider openai" in cause
    assert "sk-wrong-key" not in stopped.stderr

    rerun = run_cli("run", str(job), cwd=tmp_path)

    assert rerun.returncode == 0, rerun.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.height == 200 and out["error"].null_count() == 200
    assert out["attempts"].to_list() == [1] * 200
    assert simulator.stats()["completions"] == 200  # every row answered, and paid, once


def test_a_rejected_key_stops_at_once_naming_the_variable_and_the_command_to_check(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(100).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)

    stopped = run_cli("run", str(job), cwd=tmp_path, key="sk-wrong-key")

    assert stopped.returncode == 3, stopped.stderr
    cause = stopped.stderr.split("stopped: ", 1)[1]
    assert cause.startswith("authentication_error (HTTP 401)")
    advice = cause.split("what to do: ", 1)[1]
    assert advice.startswith("check the key in SIM_API_KEY and model.model: `pipeline models")
    assert "sk-wrong-key" not in stopped.stderr


def test_what_to_check_is_a_command_to_paste_and_never_shows_the_key() -> None:
    preset = ProviderPreset(protocol="openai")
    settings = ProviderSettings(
        "openai",
        preset,
        "gpt-4o-mini",
        "https://gw.example/v1?key=sk-secret-1&x=1",
        "GW_KEY",
        {},
        None,
        api_key="sk-secret-1",
    )
    advice = what_to_check(settings)
    assert advice == (
        "check the key in GW_KEY and model.model: `pipeline models --provider openai "
        "--base-url 'https://gw.example/v1?key=***&x=1' --api-key-env GW_KEY` must list "
        "gpt-4o-mini"
    )


def test_unless_the_job_says_a_stall_lasts_three_of_the_servers_own_waits() -> None:
    clock = Clock()
    breaker = Breaker(clock=clock)  # the job set no stall_timeout_s
    for second in range(0, 180, 60):  # LiteLLM passing on an upstream's `retry-after: 60`
        clock.now = float(second)
        assert breaker.answered_with(errors.RateLimited("busy", status=429, retry_after=60)) is None
    clock.now = 180.0
    stop = breaker.answered_with(errors.RateLimited("busy", status=429, retry_after=60))
    assert isinstance(stop, errors.SystematicFailure)
    assert "no request has succeeded for 180s" in str(stop) and "asking 60s" in str(stop)


@pytest.mark.parametrize(
    ("retry_after", "stall_s"), [(1.0, 120.0), (60.0, 180.0), (3600.0, 600.0), (None, 300.0)]
)
def test_the_default_stall_is_minutes_never_ten_and_never_a_burst(
    retry_after: float | None, stall_s: float
) -> None:
    assert default_stall_s(retry_after) == stall_s


def test_a_stall_timeout_the_job_sets_wins_over_the_servers_waits() -> None:
    clock = Clock()
    breaker = Breaker(stall_s=900, clock=clock)
    for second in (0.0, 300.0, 899.0):  # past three of the server's waits, within the job's
        clock.now = second
        assert breaker.answered_with(errors.RateLimited("busy", status=429, retry_after=60)) is None
    clock.now = 900.0
    assert breaker.answered_with(errors.RateLimited("busy", status=429, retry_after=60))
