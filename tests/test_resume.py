"""Crash-safe checkpoints and resume: kill -9, Ctrl-C, prompt edits, --fresh, --retry-failed,
budgets, status and export, all through the real CLI in a subprocess against the simulator.

The simulator counts every paid answer per exact request body, so "was this row sent
again?" is measured where the money is spent, not inferred from the pipeline's own report.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import make_job, reviews, run_cli, start_cli

from pipeline.checkpoint import Checkpoint, Totals
from pipeline.simulator import RunningSimulator, expected_response
from pipeline.types import RowResult

MODEL = "x-ai-grok-3-mini"
SYSTEM = "You are terse."
TEMPLATE = "Summarize: {{ text }}"
# x-ai-grok-3-mini in configs/pricing.yaml, USD per token; reasoning is billed as output.
INPUT_PRICE, OUTPUT_PRICE = 0.30e-6, 0.50e-6


def answer(text: str, template: str = TEMPLATE) -> str:
    """The simulator's answer for a row whose `text` is rendered into `template`."""
    user = template.replace("{{ text }}", text)
    return expected_response(
        MODEL, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    )


def output_path(workdir: Path) -> Path:
    return workdir / "out" / "result.parquet"


def read_output(workdir: Path) -> pl.DataFrame:
    return pl.read_parquet(output_path(workdir))


def recorded_rows(workdir: Path, *, recover: bool = False) -> int:
    """Rows the checkpoint holds a result for (since the last --fresh); 0 before any run."""
    path = workdir / "out" / "result.parquet.run" / "checkpoint.sqlite"
    if not path.exists():
        return 0
    checkpoint = Checkpoint(path)
    try:
        if recover:
            checkpoint.recover()  # as the next run will: answers journaled, not yet committed
        return checkpoint.totals().rows
    finally:
        checkpoint.close()


def settle(simulator: RunningSimulator) -> None:
    """Wait until the simulator has answered every request in flight (a killed job's too)."""
    deadline = time.monotonic() + 30
    while simulator.stats(full=False)["in_flight"]:
        assert time.monotonic() < deadline, "the simulator never went idle"
        time.sleep(0.01)


def billed_usd(stats: dict[str, int]) -> float:
    """What the simulator charged for every answer it gave."""
    return (
        stats["prompt_tokens"] * INPUT_PRICE
        + (stats["completion_tokens"] + stats["reasoning_tokens"]) * OUTPUT_PRICE
    )


def assert_complete_output(workdir: Path, data: pl.DataFrame, template: str = TEMPLATE) -> None:
    """Every input row exactly once, in input order, with its own answer and no error."""
    out = read_output(workdir)
    assert out.select(data.columns).equals(data), "input columns must come through unchanged"
    assert out["error"].to_list() == [None] * data.height
    assert out["response"].to_list() == [answer(t, template) for t in data["text"]]


def wait_until(
    proc: subprocess.Popen[str], condition: Callable[[], bool], timeout: float, poll: float
) -> bool:
    """Poll `condition` while `proc` runs; True when it held, False when `proc` exited first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "timed out waiting on the running job"
        time.sleep(poll)
    return True


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    """Wait for `proc` to exit; returns (exit code, stderr)."""
    _, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stderr


def sigkill(proc: subprocess.Popen[str]) -> None:
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.communicate()}"
    proc.send_signal(signal.SIGKILL)
    code, _ = finish(proc)
    assert code == -signal.SIGKILL


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test started; any still running at the end (a failed test) are killed."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def test_sigkill_at_random_points_loses_no_row_and_pays_little_twice(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    rng = random.Random(20240611)
    rows, concurrency = 600, 16
    simulator.configure(latency_ms=(20, 80))
    # A wide column the prompt never uses: it makes the final Parquet write last long
    # enough (a few ms) to kill the job in the middle of it.
    notes = [rng.randbytes(1000).hex() for _ in range(rows)]
    data = reviews(rows).with_columns(pl.Series("notes", notes))
    source = tmp_path / "reviews.csv"
    data.write_csv(source)
    job = make_job(tmp_path, simulator, limits__concurrency=concurrency)
    output = output_path(tmp_path)

    def completions() -> int:
        return int(simulator.stats(full=False)["completions"])

    def run() -> subprocess.Popen[str]:
        proc = start_cli("run", str(job), "--quiet", cwd=tmp_path)
        started.append(proc)
        return proc

    def assert_output_whole_or_absent() -> None:
        if output.exists():
            table = pq.read_table(output)
            assert table.num_rows == rows
            assert table.column("response").null_count == 0

    # Kills at random moments: one during start-up (loading, planning, opening the
    # checkpoint), one after answers have flowed for over a second (longer than the
    # durability promise, so rows must have been committed on the way), two shortly after
    # answers start. Each is capped short of the rows still to do, so it lands mid-run.
    plan = [  # (wait for answers first?, seconds from then, at most this share of what is left)
        (False, (0.2, 1.0), 1.0),
        (True, (1.3, 1.8), 0.9),
        (True, (0.05, 0.6), 0.5),
        (True, (0.05, 0.6), 0.5),
    ]
    allowance = 0  # duplicates a kill may cost: the requests in flight, no answer that landed
    kills: list[tuple[float, int, int]] = []  # (s after start, answers, rows recorded after)
    for after_answers, (low, high), share in plan:
        remaining = rows - recorded_rows(tmp_path, recover=True)  # journaled answers count
        if remaining == 0:
            break  # the last kill came after every answer had landed
        proc = run()
        spawned = time.monotonic()
        base = completions()
        if after_answers:
            answering = partial(lambda n: completions() > n, base)
            assert wait_until(proc, answering, timeout=60, poll=0.005), proc.communicate()
        kill_at = time.monotonic() + rng.uniform(low, high)
        while time.monotonic() < kill_at and completions() - base < remaining * share:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.005)
        now = completions()
        allowance += concurrency
        sigkill(proc)
        settle(simulator)  # the killed job's requests in flight are answered (and paid)
        kills.append((round(time.monotonic() - spawned, 2), now - base, recorded_rows(tmp_path)))
        assert not output.exists(), "the output must only appear once every row is done"
        assert kills[-1][2] >= rows - remaining, "a kill never loses rows already committed"

    # A kill aimed at the final assembly: once it has started writing its temporary file,
    # or as soon as anything at the output path changes. Until the job is killed while
    # writing, touch the input and go again: the next run rewrites the output (sending
    # nothing), which is another chance, now with a previous output to keep intact.
    def output_stat() -> tuple[int, int] | None:
        with contextlib.suppress(FileNotFoundError):
            stat = output.stat()
            return stat.st_size, stat.st_mtime_ns
        return None

    def writing(proc: subprocess.Popen[str], before: tuple[int, int] | None) -> bool:
        with contextlib.suppress(FileNotFoundError):
            if output.with_name(f".{output.name}.{proc.pid}.tmp").stat().st_size > 0:
                return True
        return output_stat() != before

    for _ in range(5):
        before = output_stat()
        proc = run()
        if not wait_until(proc, partial(writing, proc, before), timeout=60, poll=0.0005):
            code, stderr = finish(proc)  # the job won the race
            assert code == 0, stderr
        else:
            sigkill(proc)
            assert_output_whole_or_absent()
            if output_stat() == before:
                break  # killed in the middle of writing a new output
        os.utime(source)
    else:
        pytest.fail("never killed the job while it was writing its output")
    assert recorded_rows(tmp_path) == rows, "every row is committed before the output is written"

    before = simulator.stats(full=False)
    final = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    after = simulator.stats(full=False)

    assert final.returncode == 0, final.stderr
    assert after["requests"] == before["requests"], "nothing left to send after finalize"
    assert_complete_output(tmp_path, data)
    assert after["distinct_paid"] == rows
    assert after["duplicate_paid"] <= allowance, (after["duplicate_paid"], allowance, kills)


def test_only_rows_whose_request_changed_are_sent_again(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    data = reviews(30)
    csv = tmp_path / "reviews.csv"
    data.write_csv(csv)
    job = make_job(tmp_path, simulator)
    assert run_cli("run", str(job), cwd=tmp_path).returncode == 0
    assert simulator.stats()["completions"] == 30

    # A template edit changes every row's request: all are sent again.
    edited = "Summarize briefly: {{ text }}"
    make_job(tmp_path, simulator, prompt__template=edited)
    simulator.reset()
    result = run_cli("run", str(job), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert simulator.stats()["completions"] == 30
    assert_complete_output(tmp_path, data, edited)
    previous = read_output(tmp_path)

    # New text in 3 rows: exactly those 3 are sent. A new value in a column the prompt
    # does not use sends nothing but shows up in the output.
    changed = {"R003", "R010", "R027"}
    data = data.with_columns(
        pl.when(pl.col("review_id").is_in(changed))
        .then(pl.col("text") + " Edited.")
        .otherwise(pl.col("text"))
        .alias("text"),
        (pl.col("rating") + 10).alias("rating"),
    )
    data.write_csv(csv)
    simulator.reset()
    result = run_cli("run", str(job), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    stats = simulator.stats()
    assert stats["requests"] == 3
    assert stats["completions"] == 3
    assert_complete_output(tmp_path, data, edited)
    out = read_output(tmp_path)
    kept = ~out["review_id"].is_in(changed)
    result_columns = ["response", "reasoning", "cost_usd", "latency_s", "attempts"]
    assert (
        out.filter(kept).select(result_columns).equals(previous.filter(kept).select(result_columns))
    ), "unchanged rows must be reused as they were, not sent again"

    # Rows removed from the input leave the output; nothing is sent.
    data = data.filter(~pl.col("review_id").is_in(["R000", "R004", "R029"]))
    data.write_csv(csv)
    simulator.reset()
    result = run_cli("run", str(job), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert simulator.stats()["requests"] == 0
    assert_complete_output(tmp_path, data, edited)


def test_retry_failed_sends_only_the_failed_rows_again(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    # Each flaky row gets 503 on its first two attempts and an answer on the third; the
    # simulator counts attempts per exact request across runs, so it is not reset here.
    flaky = ["R002", "R005", "R007"]
    data = reviews(10).with_columns(
        pl.when(pl.col("review_id").is_in(flaky))
        .then(pl.format("flaky {} [[sim:fail_first=2]]", pl.col("review_id")))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__max_attempts=2)

    first = run_cli("run", str(job), cwd=tmp_path)

    assert first.returncode == 1, first.stderr
    assert "--retry-failed" in first.stderr
    out = read_output(tmp_path)
    failed = out.filter(pl.col("error").is_not_null())
    assert set(failed["review_id"]) == set(flaky)
    assert all(e.startswith("server_error (HTTP 503)") for e in failed["error"])
    assert failed["attempts"].to_list() == [2, 2, 2]
    before = simulator.stats(full=False)

    again = run_cli("run", str(job), cwd=tmp_path)

    assert again.returncode == 1, again.stderr
    assert simulator.stats(full=False)["requests"] == before["requests"], (
        "a plain rerun must not send failed rows again"
    )

    retried = run_cli("run", str(job), "--retry-failed", cwd=tmp_path)

    assert retried.returncode == 0, retried.stderr
    after = simulator.stats(full=False)
    assert after["requests"] - before["requests"] == 3
    assert after["completions"] - before["completions"] == 3
    assert after["duplicate_paid"] == 0
    assert_complete_output(tmp_path, data)
    final = read_output(tmp_path)
    ok = ~final["review_id"].is_in(flaky)
    assert final.filter(ok).equals(out.filter(ok)), "rows that succeeded are not sent again"


def test_fresh_resends_everything_and_keeps_the_old_output_until_it_is_done(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    rows, concurrency = 160, 8
    data = reviews(rows)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=concurrency)
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    output = output_path(tmp_path)
    old_bytes, old_mtime = output.read_bytes(), output.stat().st_mtime_ns

    # A fresh run, killed part-way: the old output must be untouched.
    simulator.configure(latency_ms=(100, 200))
    base = simulator.stats(full=False)["completions"]
    proc = start_cli("run", str(job), "--quiet", "--fresh", cwd=tmp_path)
    started.append(proc)

    def answering() -> bool:
        return simulator.stats(full=False)["completions"] - base >= 20

    assert wait_until(proc, answering, timeout=30, poll=0.01), proc.communicate()
    time.sleep(0.3)
    second_before_kill = simulator.stats(full=False)["completions"]
    time.sleep(1.0)  # past two checkpoint commits
    at_kill = simulator.stats(full=False)["completions"]
    sigkill(proc)
    settle(simulator)

    assert output.read_bytes() == old_bytes
    assert output.stat().st_mtime_ns == old_mtime
    fresh_done = recorded_rows(tmp_path, recover=True)
    assert 0 < fresh_done < rows

    simulator.configure(latency_ms=(0, 0))
    before = simulator.stats(full=False)["completions"]
    result = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert simulator.stats(full=False)["completions"] - before == rows - fresh_done, (
        "the rerun sends exactly the rows the fresh run had not finished"
    )
    assert_complete_output(tmp_path, data)
    # Every row was paid for again after --fresh (none reused from the first run), and
    # rows paid twice since then are at most those in flight at the kill plus the
    # answers of its last second.
    paid = simulator.stats()["paid_by_digest"]
    assert len(paid) == rows
    assert min(paid.values()) >= 2
    assert sum(n - 2 for n in paid.values()) <= concurrency + at_kill - second_before_kill


def budget_stopped_run(
    workdir: Path, simulator: RunningSimulator, rows: int
) -> tuple[Path, pl.DataFrame, subprocess.CompletedProcess[str]]:
    """A job whose budget covers only part of its rows, run once."""
    simulator.configure(latency_ms=(50, 100))
    data = reviews(rows)
    data.write_csv(workdir / "reviews.csv")
    # About $0.000028 a row, so $0.001 buys a few dozen of these rows.
    job = make_job(workdir, simulator, limits__concurrency=4, limits__max_cost_usd=0.001)
    return job, data, run_cli("run", str(job), "--quiet", cwd=workdir)


def test_budget_stops_the_job_and_a_larger_budget_resumes_it(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 100
    job, data, first = budget_stopped_run(tmp_path, simulator, rows)

    assert first.returncode == 3, first.stderr
    assert "max_cost_usd" in first.stderr
    assert not output_path(tmp_path).exists()
    done = recorded_rows(tmp_path)
    assert 0 < done < rows
    settle(simulator)
    stats = simulator.stats(full=False)
    assert billed_usd(stats) <= 0.001, "the budget is a limit on what is actually spent"

    make_job(tmp_path, simulator, limits__concurrency=4, limits__max_cost_usd=1.0)
    second = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert second.returncode == 0, second.stderr
    stats = simulator.stats(full=False)
    assert stats["completions"] == rows
    assert stats["duplicate_paid"] == 0
    assert_complete_output(tmp_path, data)


def test_ctrl_c_stops_within_bounds_and_keeps_finished_rows(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    rows, concurrency = 200, 8
    simulator.configure(latency_ms=(300, 600))
    data = reviews(rows)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=concurrency)
    proc = start_cli("run", str(job), "--quiet", cwd=tmp_path)
    started.append(proc)

    def answering() -> bool:
        return simulator.stats(full=False)["completions"] > 0

    assert wait_until(proc, answering, timeout=30, poll=0.01), proc.communicate()
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    interrupted_at = time.monotonic()
    code, stderr = finish(proc, timeout=30)

    assert time.monotonic() - interrupted_at < 15
    assert code == 130, stderr
    assert "interrupted" in stderr
    assert f"pipeline run {job}" in stderr and "resumes" in stderr
    assert "Traceback" not in stderr
    assert not output_path(tmp_path).exists()
    done = recorded_rows(tmp_path)
    assert 0 < done < rows
    settle(simulator)
    assert simulator.stats(full=False)["completions"] == done, (
        "requests in flight at Ctrl-C land and are recorded: no paid answer is lost"
    )

    simulator.configure(latency_ms=(0, 0))
    before = simulator.stats(full=False)["completions"]
    result = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    stats = simulator.stats(full=False)
    assert stats["completions"] - before == rows - done
    assert stats["duplicate_paid"] <= concurrency
    assert_complete_output(tmp_path, data)


def test_second_ctrl_c_stops_at_once_and_leaves_a_consistent_store(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    rows, concurrency = 60, 8
    # Answers take 3-4 s: the first Ctrl-C alone would wait for them.
    simulator.configure(latency_ms=(3000, 4000))
    data = reviews(rows)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=concurrency)
    proc = start_cli("run", str(job), "--quiet", cwd=tmp_path)
    started.append(proc)

    def in_flight() -> bool:
        return simulator.stats(full=False)["in_flight"] >= concurrency

    assert wait_until(proc, in_flight, timeout=30, poll=0.01), proc.communicate()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None, "the first Ctrl-C waits for requests in flight"
    proc.send_signal(signal.SIGINT)
    second_at = time.monotonic()
    code, stderr = finish(proc, timeout=30)

    assert time.monotonic() - second_at < 2.0
    assert code == 130, stderr
    assert f"waiting up to 10s for {concurrency} request(s) in flight" in stderr
    assert "Ctrl-C again abandons them" in stderr
    # Abandoned requests were sent all the same, and are counted as sent.
    sent = simulator.stats(full=False)["requests"]
    assert f"requests this run: {sent} sent" in stderr
    assert f"at most {concurrency} in flight at once" in stderr
    assert f"abandoned: {concurrency} request(s) in flight at the second Ctrl-C" in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert not output_path(tmp_path).exists()

    simulator.configure(latency_ms=(0, 0))
    result = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert_complete_output(tmp_path, data)
    assert simulator.stats(full=False)["duplicate_paid"] <= concurrency


def test_rerun_of_a_finished_job_sends_nothing_and_leaves_the_output_alone(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    data = reviews(20)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    output = output_path(tmp_path)
    before = output.stat()
    content = output.read_bytes()
    simulator.reset()

    again = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert again.returncode == 0, again.stderr
    assert simulator.stats()["requests"] == 0
    after = output.stat()
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)
    assert output.read_bytes() == content


def test_status_and_export_after_a_partial_run(tmp_path: Path, simulator: RunningSimulator) -> None:
    rows = 100
    job, data, first = budget_stopped_run(tmp_path, simulator, rows)
    assert first.returncode == 3, first.stderr
    done = recorded_rows(tmp_path)
    assert 0 < done < rows
    simulator.reset()

    status = run_cli("status", str(job), cwd=tmp_path)

    assert status.returncode == 0, status.stderr
    assert f"test-job: {done}/{rows} rows finished (0 failed), {rows - done} pending" in (
        status.stdout
    )

    export = run_cli("export", str(job), cwd=tmp_path)

    assert export.returncode == 0, export.stderr
    exported = tmp_path / "out" / "result.partial.parquet"
    assert f"wrote {done} finished row(s) to {exported.relative_to(tmp_path)}" in export.stdout
    out = pl.read_parquet(exported)
    assert out.height == done
    assert out["error"].null_count() == done
    ids = out["review_id"].to_list()
    assert ids == [i for i in data["review_id"] if i in set(ids)], "in input order"
    assert out["response"].to_list() == [answer(t) for t in out["text"]]
    assert not output_path(tmp_path).exists(), "an export is not the job's output"
    assert simulator.stats()["requests"] == 0, "status and export send nothing"


def test_two_kills_mid_run_pay_again_only_for_requests_in_flight(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    """Every answer that arrived is kept through kill -9: it is journaled as it lands."""
    rows, concurrency = 3000, 32
    simulator.configure(latency_ms=(50, 150))
    data = reviews(rows)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=concurrency)
    kills = (0.25, 0.6)  # when this share of the rows has been answered
    for share in kills:
        proc = start_cli("run", str(job), "--quiet", cwd=tmp_path)
        started.append(proc)
        answered = partial(lambda n: simulator.stats(full=False)["completions"] >= n, rows * share)
        assert wait_until(proc, answered, timeout=120, poll=0.002), proc.communicate()
        sigkill(proc)
        settle(simulator)

    final = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    assert_complete_output(tmp_path, data)
    stats = simulator.stats(full=False)
    assert stats["distinct_paid"] == rows
    # The job keeps `concurrency` requests in flight (sent, not yet answered and journaled):
    # those, and only those, are paid again after a kill.
    assert stats["duplicate_paid"] <= len(kills) * concurrency, stats


def test_answers_landed_but_never_committed_are_replayed_on_the_next_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "checkpoint.sqlite"
    killed = Checkpoint(path)
    killed.recover()
    for i in range(3):
        killed.land(RowResult(i, f"K{i}", f"h{i}", 1, 0.1, error=f"bad_request: row {i}"))
    [segment] = tmp_path.glob("checkpoint.landed.*.jsonl")
    with open(segment, "ab") as handle:
        handle.write(b'["K9", "h9", "torn by the kill')  # never committed, never closed

    reopened = Checkpoint(path)
    assert reopened.totals().rows == 0  # a reader sees only committed rows
    assert reopened.recover() == 3
    assert reopened.totals() == Totals(rows=3, failed=3)
    assert set(reopened.finished(["K0", "K1", "K2", "K9"])) == {"K0", "K1", "K2"}
    segments = list(tmp_path.glob("checkpoint.landed.*.jsonl"))
    assert [p.read_bytes().strip(b"\0") for p in segments] == [b""], "replayed rows leave"
    reopened.land(RowResult(3, "K3", "h3", 1, 0.1, error="bad_request: row 3"))
    reopened.commit(reopened.seal(), {})
    assert reopened.totals().rows == 4
    assert list(tmp_path.glob("checkpoint.landed.*.jsonl")) != []  # the open segment
    assert all(not p.read_bytes().strip(b"\0") for p in tmp_path.glob("checkpoint.landed.*"))
    killed.close()
    reopened.close()
