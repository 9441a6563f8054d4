"""Rows streaming between consecutive map steps (`steps_stream.py`), through the real CLI
against the simulator: the next step starts on a wave as soon as it is answered, the
steps share the provider's limits and the job's budget, and a stop or a kill anywhere
resumes without paying twice."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from conftest import run_cli, start_cli
from test_steps import (
    COMPLAINT,
    LABELS,
    negatives,
    outputs,
    paid,
    per_label,
    sentiment,
    settle,
    write_reviews,
)
from test_steps import steps_job as make_steps_job

from pipeline.simulator import RunningSimulator

WAVE = "50"  # rows a wave: small, so a few hundred rows make several waves
NO_STREAMING = "1000000"
ANSWERS = ["review_id", "sentiment_label", "sentiment_response", "complaint_response"]


def steps_job(workdir: Path, simulator: RunningSimulator, **more: object) -> Path:
    return make_steps_job(workdir, simulator, [sentiment(), COMPLAINT, per_label()], **more)


def runs_of(workdir: Path, step: str) -> list[tuple[float, float]]:
    """(started, ended) of every run the step's record logged, in order."""
    log = workdir / "out" / "result.parquet.run" / "steps" / step / "output.parquet.run"
    events = [json.loads(line) for line in (log / "events.jsonl").read_text().splitlines()]
    starts = [e["t"] for e in events if e["event"] == "run_started"]
    ends = [e["t"] for e in events if e["event"] in ("run_sent_all", "run_stopped")]
    return list(zip(starts, ends, strict=True))


def test_the_next_step_starts_before_the_first_ends_and_the_rows_are_the_same(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 400
    write_reviews(tmp_path, rows)
    simulator.configure(latency_ms=(5, 15))
    job = steps_job(tmp_path, simulator)

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path, PIPELINE_STEP_WAVE_ROWS=WAVE)

    assert done.returncode == 0, done.stderr
    assert f"streaming steps sentiment, complaint: {rows:,} rows in 8 waves" in done.stderr
    first, second = runs_of(tmp_path, "sentiment"), runs_of(tmp_path, "complaint")
    assert second[0][0] < first[-1][1], "step 2 waited for step 1 to finish"
    final, reduced = outputs(tmp_path)
    stats = simulator.stats(full=False)
    assert stats["completions"] == rows + negatives(final) + len(LABELS)
    assert stats["duplicate_paid"] == 0
    assert "sentiment: 400 row(s), 0 reused, 400 request(s) sent" in done.stderr

    # The same rows as a run that does not stream.
    simulator.reset()
    plain = tmp_path / "plain"
    plain.mkdir()
    write_reviews(plain, rows)
    again = steps_job(plain, simulator)
    undivided = run_cli(
        "run", str(again), "--quiet", cwd=plain, PIPELINE_STEP_WAVE_ROWS=NO_STREAMING
    )
    assert undivided.returncode == 0, undivided.stderr
    assert "streaming" not in undivided.stderr
    plain_final, plain_reduced = outputs(plain)
    assert final.select(ANSWERS).equals(plain_final.select(ANSWERS))
    assert reduced.select("label", "response").equals(plain_reduced.select("label", "response"))


def test_streaming_steps_share_the_providers_limit(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    # Each step alone would pace itself to the whole limit: together, twice it.
    rows = 300
    write_reviews(tmp_path, rows)
    simulator.configure(rpm=6000)
    job = steps_job(tmp_path, simulator, limits__requests_per_minute=6000)

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path, PIPELINE_STEP_WAVE_ROWS=WAVE)

    assert done.returncode == 0, done.stderr
    assert "streaming steps" in done.stderr
    assert simulator.stats(full=False)["rate_limited"] == 0


def test_one_budget_across_streaming_steps(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = 300
    write_reviews(tmp_path, rows)
    # Step 1 alone costs about $0.0058 here, and with step 2 about $0.0077: each step
    # alone keeps within the limit (a pool of 4 reserves little ahead), the two together
    # do not.
    limit = 0.0068
    job = steps_job(tmp_path, simulator, limits__max_cost_usd=limit, limits__concurrency=4)

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path, PIPELINE_STEP_WAVE_ROWS=WAVE)

    assert done.returncode == 3, done.stderr
    assert "budget reached" in done.stderr
    stats = simulator.stats(full=False)
    billed = (
        stats["prompt_tokens"] * 0.30e-6
        + (stats["completion_tokens"] + stats["reasoning_tokens"]) * 0.50e-6
    )
    assert billed <= limit
    assert not (tmp_path / "out" / "result.parquet").exists()


def test_ctrl_c_while_streaming_stops_every_step_and_a_rerun_finishes(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 400
    job, returncode, stderr = _signalled_while_streaming(tmp_path, simulator, rows, signal.SIGINT)
    assert returncode == 130, stderr
    assert "interrupted" in stderr

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path, timeout=300)

    assert done.returncode == 0, done.stderr
    final, _ = outputs(tmp_path)
    stats = simulator.stats(full=False)
    assert stats["duplicate_paid"] == 0, "a gentle stop lets what is in flight land"
    assert stats["distinct_paid"] == rows + negatives(final) + len(LABELS)


def test_a_kill_while_streaming_resumes_without_paying_twice(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 400
    job, returncode, _ = _signalled_while_streaming(tmp_path, simulator, rows, signal.SIGKILL)
    assert returncode == -signal.SIGKILL
    # `status` counts every row a step took, not only its current wave's.
    status = run_cli("status", str(job), cwd=tmp_path)
    line = next(x for x in status.stdout.splitlines() if x.strip().startswith("sentiment: "))
    finished, taken = (int(n) for n in line.split(": ")[1].split(" ")[0].split("/"))
    assert int(WAVE) < taken <= rows and int(WAVE) <= finished <= taken, line
    assert ", stopped;" in line

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path, timeout=300)

    assert done.returncode == 0, done.stderr
    final, _ = outputs(tmp_path)
    stats = simulator.stats(full=False)
    # Both steps send at once, one pool of 8 between them: at most 8 were in flight.
    assert stats["duplicate_paid"] <= 8
    assert stats["distinct_paid"] == rows + negatives(final) + len(LABELS)


def test_fresh_sets_each_steps_record_aside_once(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 200
    write_reviews(tmp_path, rows)
    job = steps_job(tmp_path, simulator)
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    first = paid(simulator)

    done = run_cli(
        "run", str(job), "--fresh", "--quiet", cwd=tmp_path, PIPELINE_STEP_WAVE_ROWS=WAVE
    )

    assert done.returncode == 0, done.stderr
    assert "streaming steps" in done.stderr
    assert paid(simulator) == 2 * first, "every request sent again, once"
    for step in ("sentiment", "complaint"):
        run_dir = tmp_path / "out" / "result.parquet.run" / "steps" / step / "output.parquet.run"
        assert len(list((run_dir / "set-aside").iterdir())) == 1, "set aside once, not per wave"
    final, _ = outputs(tmp_path)
    assert final.height == rows


def _signalled_while_streaming(
    workdir: Path, simulator: RunningSimulator, rows: int, signum: int
) -> tuple[Path, int, str]:
    """Run a streaming job, send it `signum` once both steps send, and wait for the
    simulator to go idle: (the job, the exit code, what the run printed)."""
    write_reviews(workdir, rows)
    simulator.configure(latency_ms=(20, 60))
    job = steps_job(workdir, simulator, limits__concurrency=8)
    proc = start_cli("run", str(job), "--quiet", cwd=workdir, PIPELINE_STEP_WAVE_ROWS=WAVE)
    try:
        _wait_for_both_steps(proc, workdir, simulator)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    settle(simulator)
    return job, proc.returncode, stderr


def _wait_for_both_steps(
    proc: subprocess.Popen[str], workdir: Path, simulator: RunningSimulator
) -> None:
    """Until step 2 has started while step 1 still has rows to send."""
    deadline = time.monotonic() + 120
    complaint = (
        workdir / "out" / "result.parquet.run" / "steps" / "complaint" / "output.parquet.run"
    )
    while not (complaint / "events.jsonl").exists() or paid(simulator) < 150:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "step 2 never started"
        time.sleep(0.005)
    assert paid(simulator) < 400, "step 1 finished before step 2 started: nothing streamed"


def test_a_when_that_fails_while_streaming_stops_with_exit_2_and_keeps_the_answers(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 300
    write_reviews(tmp_path, rows)
    # Fails on the first row rated 5 that step 1 labels negative.
    failing = {**COMPLAINT, "when": "label == 'negative' and rating / (rating - 5) < 9"}
    job = make_steps_job(tmp_path, simulator, [sentiment(), failing])

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path, PIPELINE_STEP_WAVE_ROWS=WAVE)

    assert done.returncode == 2, done.stderr
    assert "steps.complaint.when: fails on row" in done.stderr
    assert "Traceback" not in done.stderr
    # Step 2 sent nothing: its first wave stopped it; step 1's answers are recorded.
    assert 0 < paid(simulator) <= rows
    status = run_cli("status", str(job), cwd=tmp_path)
    assert "sentiment: " in status.stdout and "complaint: not started" in status.stdout


def test_a_when_the_first_streamed_step_fails_on_is_refused_before_sending(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    write_reviews(tmp_path, 300)
    failing = {**sentiment(), "when": "rating / (rating - 5) < 1"}
    job = make_steps_job(tmp_path, simulator, [failing, COMPLAINT])

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path, PIPELINE_STEP_WAVE_ROWS=WAVE)

    assert done.returncode == 2, done.stderr
    assert "steps.sentiment.when: fails on row 4" in done.stderr
    assert paid(simulator) == 0


def test_progress_lines_come_while_the_waves_run(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 400
    write_reviews(tmp_path, rows)
    simulator.configure(latency_ms=(20, 60))
    job = steps_job(tmp_path, simulator, limits__concurrency=8)

    done = run_cli(
        "run",
        str(job),
        cwd=tmp_path,
        PIPELINE_STEP_WAVE_ROWS=WAVE,
        PIPELINE_PROGRESS_EVERY_S="0.2",
    )

    assert done.returncode == 0, done.stderr
    lines = [x for x in done.stderr.splitlines() if "rows into sentiment" in x]
    assert lines, done.stderr
    assert "rows answered of those taken: sentiment " in lines[-1]
    assert ", complaint " in lines[-1]
    assert "this run" in lines[-1]


def test_steps_one_after_another_keep_the_providers_limit_at_the_boundary(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    # Step 2's run starts while step 1's last second is still the server's window: a
    # pacer of its own would send a whole second's share into it.
    rows = 300
    write_reviews(tmp_path, rows)
    simulator.configure(rpm=6000, limit_window="second")
    job = steps_job(tmp_path, simulator, limits__requests_per_minute=6000)

    done = run_cli("run", str(job), "--quiet", cwd=tmp_path, PIPELINE_STEP_WAVE_ROWS=NO_STREAMING)

    assert done.returncode == 0, done.stderr
    assert "streaming" not in done.stderr
    assert simulator.stats(full=False)["rate_limited"] == 0
