"""Operator mistakes that must neither lose data nor pay twice, through the real CLI.

Each test reproduces one mistake (two runs at once, a job run from another
folder, an output pointed at the input, a template that fails on one row, a
column named like a Jinja global, a dropped terminal, closed stdout/stderr, ...)
against the simulator, which counts every answer paid twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest
from conftest import cli_env, make_job, messages_for, reviews, run_cli, start_cli

from pipeline.checkpoint import Checkpoint
from pipeline.simulator import RunningSimulator, expected_response

MODEL = "x-ai-grok-3-mini"


def answer(messages: list[dict[str, str]]) -> str:
    return expected_response(MODEL, messages)


def wait_until(proc: subprocess.Popen[str], condition: Callable[[], bool]) -> None:
    """Poll a state while `proc` runs (never a fixed sleep)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out waiting on the running job"
        time.sleep(0.01)


def recorded(run_dir: Path) -> int:
    path = run_dir / "checkpoint.sqlite"
    if not path.exists():
        return 0
    checkpoint = Checkpoint(path)
    try:
        return checkpoint.totals().rows
    finally:
        checkpoint.close()


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


# --- one run per job ---------------------------------------------------------------------


def test_a_second_run_of_the_same_job_refuses_at_once_and_nothing_is_paid_twice(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    simulator.configure(latency_ms=(100, 200))
    data = reviews(120)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=8)
    first = start_cli("run", str(job), "--quiet", cwd=tmp_path)
    started.append(first)
    lock = tmp_path / "out" / "result.parquet.run" / "run.lock"
    wait_until(first, lambda: lock.exists() and lock.read_text().strip() != "")
    wait_until(first, lambda: simulator.stats(full=False)["completions"] > 0)

    second = run_cli("run", str(job), "--quiet", cwd=tmp_path, timeout=20)
    status = run_cli("status", str(job), cwd=tmp_path, timeout=20)
    export = run_cli("export", str(job), cwd=tmp_path, timeout=20)

    assert second.returncode == 2, second.stderr
    assert f"another run (pid {first.pid}, since " in second.stderr
    assert "is working on this job" in second.stderr
    assert "Traceback" not in second.stderr
    assert status.returncode == 0, status.stderr
    assert "rows finished" in status.stdout
    assert export.returncode == 0, export.stderr
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    stats = simulator.stats(full=False)
    assert stats["duplicate_paid"] == 0
    assert stats["completions"] == data.height
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["response"].to_list() == [answer(messages_for(t)) for t in data["text"]]


def test_two_runs_started_together_pay_nothing_twice(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    simulator.configure(latency_ms=(300, 500))  # the run lasts seconds, past both start-ups
    data = reviews(200)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=16)
    procs = [start_cli("run", str(job), "--quiet", cwd=tmp_path) for _ in range(2)]
    started.extend(procs)

    results = [(proc.communicate(timeout=120)[1], proc.returncode) for proc in procs]

    codes = sorted(code for _, code in results)
    # Whichever takes the lock first runs; the other refuses at once (or, on a machine
    # so slow that it started after the first had finished, finds nothing to send).
    assert codes in ([0, 2], [0, 0]), results
    if codes == [0, 2]:
        refused = next(stderr for stderr, code in results if code == 2)
        assert "another run (pid" in refused
    stats = simulator.stats(full=False)
    assert stats["duplicate_paid"] == 0
    assert stats["completions"] == data.height


def test_a_killed_run_leaves_no_stale_lock(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    simulator.configure(latency_ms=(100, 200))
    reviews(60).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=4)
    first = start_cli("run", str(job), "--quiet", cwd=tmp_path)
    started.append(first)
    run_dir = tmp_path / "out" / "result.parquet.run"
    wait_until(first, lambda: recorded(run_dir) > 0)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)

    simulator.configure(latency_ms=(0, 0))
    rerun = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert rerun.returncode == 0, rerun.stderr


# --- a checkpoint belongs to its job ---------------------------------------------------


def test_a_job_run_from_another_folder_reads_and_writes_its_own_files(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    project_a, project_b = tmp_path / "projA", tmp_path / "projB"
    for project, n in ((project_a, 5), (project_b, 7)):
        project.mkdir()
        reviews(n).write_csv(project / "reviews.csv")
        make_job(project, simulator, name="job")
    assert run_cli("run", "job.yaml", "--quiet", cwd=project_a).returncode == 0
    a_output = (project_a / "out" / "result.parquet").read_bytes()
    before = simulator.stats(full=False)["completions"]

    result = run_cli("run", "../projB/job.yaml", "--quiet", cwd=project_a)

    assert result.returncode == 0, result.stderr
    assert pl.read_parquet(project_b / "out" / "result.parquet").height == 7
    assert (project_a / "out" / "result.parquet").read_bytes() == a_output
    assert simulator.stats(full=False)["completions"] - before == 7
    assert run_cli("run", "job.yaml", "--quiet", cwd=project_a).returncode == 0
    assert simulator.stats(full=False)["completions"] - before == 7, "projA pays nothing again"


def test_a_different_job_pointed_at_a_checkpoint_is_refused(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(6).write_csv(tmp_path / "reviews.csv")
    first = make_job(tmp_path, simulator, name="first")
    second = make_job(tmp_path, simulator, name="second")  # same output.path
    assert run_cli("run", str(first), "--quiet", cwd=tmp_path).returncode == 0
    before = simulator.stats(full=False)["completions"]

    refused = run_cli("run", str(second), "--quiet", cwd=tmp_path)

    assert refused.returncode == 2, refused.stderr
    assert "holds the results of job 'first'" in refused.stderr
    assert "--output" in refused.stderr and "--fresh" in refused.stderr
    assert simulator.stats(full=False)["completions"] == before
    elsewhere = run_cli("run", str(second), "--quiet", "--output", "b.parquet", cwd=tmp_path)
    assert elsewhere.returncode == 0, elsewhere.stderr
    fresh = run_cli("run", str(second), "--quiet", "--fresh", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    again = run_cli("run", str(first), "--quiet", cwd=tmp_path)
    assert again.returncode == 2, "the checkpoint now serves 'second'"


@pytest.mark.parametrize("target", ["reviews.csv", "job.yaml"])
def test_the_output_may_not_be_the_input_or_the_job_file(
    tmp_path: Path, simulator: RunningSimulator, target: str
) -> None:
    reviews(4).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, name="job", output__path=target)
    before = (tmp_path / target).read_bytes()

    for command in ("validate", "run"):
        result = run_cli(command, str(job), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert "output.path" in result.stderr and "choose another output path" in result.stderr
    assert (tmp_path / target).read_bytes() == before
    assert simulator.stats(full=False)["requests"] == 0


# --- templates ---------------------------------------------------------------------------


def test_a_row_whose_template_fails_is_that_rows_error_and_validate_lists_it(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    data = pl.DataFrame(
        {
            "review_id": ["a", "b", "c", "d"],
            "text": ["one", None, "three", "four"],
            "tags": [["x", "y"], ["z"], None, ["w"]],
        }
    )
    data.write_parquet(tmp_path / "reviews.parquet")
    template = "{{ text | length }} chars, tags {{ tags | join(', ') }}: {{ text }}"
    job = make_job(tmp_path, simulator, input_path="reviews.parquet", prompt__template=template)

    validate = run_cli("validate", str(job), cwd=tmp_path)
    result = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert validate.returncode == 2, validate.stderr
    assert "fails to render for 2 of 4 row(s)" in validate.stderr
    assert "row 1 (key b): template_error: TypeError" in validate.stderr
    assert "row 2 (key c): template_error: TypeError" in validate.stderr
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    errors = out["error"].to_list()
    assert errors[0] is None and errors[3] is None
    assert errors[1].startswith("template_error: TypeError")
    assert errors[2].startswith("template_error: TypeError")
    assert simulator.stats(full=False)["completions"] == 2
    rerun = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert rerun.returncode == 1 and "Traceback" not in rerun.stderr
    assert simulator.stats(full=False)["completions"] == 2


def test_columns_named_like_jinja_globals_are_the_columns(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    data = pl.DataFrame({"review_id": ["a", "b"], "range": ["wide", "narrow"], "dict": ["x", "y"]})
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, prompt__template="{{ range }} / {{ dict }}")

    result = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    expected = [
        answer([{"role": "system", "content": "You are terse."}, {"role": "user", "content": u}])
        for u in ("wide / x", "narrow / y")
    ]
    assert out["response"].to_list() == expected


def test_a_column_jinja_reads_as_a_constant_is_refused(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    pl.DataFrame({"review_id": ["a"], "true": ["yes"]}).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, prompt__template="Answer: {{ true }}")

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert "true" in result.stderr and "rename the column" in result.stderr
    assert simulator.stats(full=False)["requests"] == 0


# --- the terminal ------------------------------------------------------------------------


def test_sighup_stops_like_sigterm_and_the_rerun_pays_nothing_twice(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    simulator.configure(latency_ms=(200, 400))
    data = reviews(150)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=8)
    proc = start_cli("run", str(job), "--quiet", cwd=tmp_path)
    started.append(proc)
    run_dir = tmp_path / "out" / "result.parquet.run"
    wait_until(proc, lambda: recorded(run_dir) > 0)

    proc.send_signal(signal.SIGHUP)
    _, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    deadline = time.monotonic() + 30
    while simulator.stats(full=False)["in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    simulator.configure(latency_ms=(0, 0))
    rerun = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    stats = simulator.stats(full=False)
    assert stats["duplicate_paid"] == 0
    assert stats["completions"] == data.height


def ctrl_c_after_starting(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Send SIGINT the moment the run says "starting:"; returns (exit code, all of stderr)."""
    assert proc.stderr is not None
    seen = [proc.stderr.readline()]
    while not seen[-1].startswith("starting:"):
        assert seen[-1], f"the run ended before it started: {seen}"
        seen.append(proc.stderr.readline())
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=30)
    return proc.returncode, "".join(seen) + rest


def test_ctrl_c_right_after_starting_exits_130_with_a_summary_and_keeps_every_answer(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    simulator.configure(latency_ms=(300, 500))
    data = reviews(100)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=16)
    proc = start_cli("run", str(job), cwd=tmp_path)
    started.append(proc)

    code, stderr = ctrl_c_after_starting(proc)

    assert code == 130, stderr
    assert "Aborted" not in stderr and "Traceback" not in stderr
    assert "rows: 100 (" in stderr and "requests this run:" in stderr, "a summary"
    assert "interrupted: finished rows are saved" in stderr
    deadline = time.monotonic() + 30
    while simulator.stats(full=False)["in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    answered = simulator.stats(full=False)["completions"]
    assert recorded(tmp_path / "out" / "result.parquet.run") == answered, (
        "every answer that came in the grace period is recorded"
    )
    simulator.configure(latency_ms=(0, 0))
    rerun = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    stats = simulator.stats(full=False)
    assert stats["duplicate_paid"] == 0 and stats["completions"] == data.height


def test_ctrl_c_with_nothing_in_flight_stops_without_waiting_out_the_grace(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    # Every request is held back with a 30 s retry-after: the pool sleeps, nothing in flight.
    simulator.configure(throttle_s=3600.0, throttle_retry_after_s=30.0)
    reviews(20).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    proc = start_cli("run", str(job), "--quiet", cwd=tmp_path)
    started.append(proc)
    wait_until(
        proc,
        lambda: (
            simulator.stats(full=False)["rate_limited"] > 0
            and not simulator.stats(full=False)["in_flight"]
        ),
    )

    proc.send_signal(signal.SIGINT)
    interrupted_at = time.monotonic()
    _, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 130, stderr
    assert time.monotonic() - interrupted_at < 5, "the grace period is 10 s: it was not waited"
    assert "waiting up to" not in stderr, "nothing in flight: nothing to wait for"
    assert "interrupted" in stderr


def test_closed_stdout_and_stderr_do_not_crash_the_run(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(20).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    command = f"{sys.executable} -m pipeline run {job} >&- 2>&-"

    result = subprocess.run(
        ["/bin/sh", "-c", command], cwd=tmp_path, env=cli_env(), timeout=120, check=False
    )

    assert result.returncode == 0
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.height == 20 and out["error"].null_count() == 20
    checkpoint = tmp_path / "out" / "result.parquet.run" / "checkpoint.sqlite"
    assert Checkpoint(checkpoint).totals().rows == 20, "nothing printed into the checkpoint"
    assert os.path.getsize(checkpoint) > 0


# --- the machine's limits ----------------------------------------------------------------


def _limited(resource_id: int, value: int) -> Callable[[], None]:
    def apply() -> None:
        import resource

        resource.setrlimit(resource_id, (value, value))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead

    return apply


def test_concurrency_above_the_open_file_limit_is_capped_and_said(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    import resource

    data = reviews(400)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=2000)

    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(job), "--quiet"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limited(resource.RLIMIT_NOFILE, 256),
    )

    assert result.returncode == 0, result.stderr
    assert "concurrency capped at" in result.stderr and "open-file limit is 256" in result.stderr
    assert "Traceback" not in result.stderr
    assert simulator.stats(full=False)["completions"] == data.height


def test_a_failed_write_stops_sending_keeps_what_is_durable_and_exits_3(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    import resource

    simulator.configure(latency_ms=(5, 10))
    data = reviews(3000)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=16)

    # Real writes failing at a size limit (EFBIG), the way a full disk fails them (ENOSPC).
    # The limit leaves room for the first half-second's answer journal (about 800 rows
    # here on a quiet machine), so some rows are committed before the failure.
    full = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(job), "--quiet"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_limited(resource.RLIMIT_FSIZE, 512 * 1024),
    )

    assert full.returncode == 3, full.stderr
    assert "free space and rerun" in full.stderr
    assert "Traceback" not in full.stderr
    paid = simulator.stats(full=False)["completions"]
    assert paid < data.height, "sending stopped at the failure"
    kept = recorded(tmp_path / "out" / "result.parquet.run")
    assert kept > 0
    simulator.configure(latency_ms=(0, 0))
    rerun = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    stats = simulator.stats(full=False)
    # The rerun finds every committed row, and the journaled ones the database missed.
    recovered = data.height - (stats["completions"] - paid)
    assert recovered >= kept
    # At most the answers that could not be written are paid again.
    assert stats["duplicate_paid"] == paid - recovered < 2000


def test_a_full_disk_during_the_final_write_exits_3_and_the_rerun_pays_nothing(
    tmp_path: Path, simulator: RunningSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from pipeline import output
    from pipeline.executor import execute
    from pipeline.resolve import resolve_job as prepare
    from pipeline.runs import RunEnd, RunOptions

    data = reviews(30)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIM_API_KEY", "sk-test-4f9c2d1e8b7a6350")
    monkeypatch.setenv("PIPELINE_CONFIG_DIR", cli_env()["PIPELINE_CONFIG_DIR"])

    def no_space(path: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    with monkeypatch.context() as patched:
        patched.setattr(output, "_fsync", no_space)
        summary = execute(prepare(job), RunOptions(show_progress=False))
    assert summary.end is RunEnd.STOPPED
    assert summary.fatal is not None and "No space left on device" in summary.fatal.describe()
    assert "free space and rerun" in summary.fatal.advice
    assert not (tmp_path / "out" / "result.parquet").exists()

    again = execute(prepare(job), RunOptions(show_progress=False))
    assert again.end is RunEnd.ALL_OK
    assert simulator.stats(full=False)["completions"] == data.height


# --- the checkpoint ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["random bytes", "truncated"])
def test_a_damaged_checkpoint_is_reported_in_one_line(
    tmp_path: Path, simulator: RunningSimulator, damage: str
) -> None:
    reviews(300).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    path = tmp_path / "out" / "result.parquet.run" / "checkpoint.sqlite"
    size = path.stat().st_size
    if damage == "random bytes":
        path.write_bytes(os.urandom(size))
    else:
        with path.open("r+b") as handle:
            handle.truncate(size // 2)
    before = simulator.stats(full=False)["completions"]

    for command in ("run", "status"):
        result = run_cli(command, str(job), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "is damaged" in result.stderr and "--fresh" in result.stderr
    assert simulator.stats(full=False)["completions"] == before
    fresh = run_cli("run", str(job), "--quiet", "--fresh", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert list(path.parent.glob("checkpoint.sqlite.damaged-*")), "the damaged file is kept"


def test_results_after_the_clock_stepped_back_still_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.types import RowResult

    now = [2_000_000.0]
    monkeypatch.setattr(time, "time", lambda: now[0])
    checkpoint = Checkpoint(tmp_path / "checkpoint.sqlite")
    checkpoint.write([RowResult(0, "a", "h1", 1, None)])
    checkpoint.start_fresh()
    now[0] -= 3600  # the clock steps back an hour after --fresh
    checkpoint.write([RowResult(1, "b", "h2", 1, None)])
    checkpoint.close()

    reopened = Checkpoint(tmp_path / "checkpoint.sqlite")
    assert set(reopened.finished(["a", "b"])) == {"b"}
    assert reopened.totals().rows == 1
    # A second --fresh on the stepped-back clock still hides everything before it.
    reopened.start_fresh()
    reopened.write([RowResult(2, "c", "h3", 1, None)])
    assert set(reopened.finished(["a", "b", "c"])) == {"c"}


# --- input types -------------------------------------------------------------------------


def test_csv_ids_are_text_so_001_1_and_01_are_three_rows(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    (tmp_path / "reviews.csv").write_text("review_id,text\n001,first\n1,second\n01,third\n")
    job = make_job(tmp_path, simulator)

    result = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["review_id"].to_list() == ["001", "1", "01"]
    assert out["response"].to_list() == [
        answer(messages_for(t)) for t in ("first", "second", "third")
    ]


def test_input_types_give_a_csv_column_its_type(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    codes = [str(10000 + i) for i in range(10_050)]
    codes[10_020] = "AB-12"  # after the rows the type is guessed from
    data = pl.DataFrame(
        {"review_id": [f"r{i}" for i in range(10_050)], "text": ["t"] * 10_050, "code": codes}
    )
    data.write_csv(tmp_path / "reviews.csv")
    guessed = make_job(tmp_path, simulator, name="guessed", prompt__template="{{ code }}")
    typed = make_job(
        tmp_path,
        simulator,
        name="typed",
        prompt__template="{{ code }}",
        input__types={"code": "string"},
    )

    refused = run_cli("validate", str(guessed), cwd=tmp_path)
    accepted = run_cli("validate", str(typed), cwd=tmp_path)

    assert refused.returncode == 2, refused.stderr
    assert "input.types" in refused.stderr
    assert accepted.returncode == 0, accepted.stderr
    assert simulator.stats(full=False)["requests"] == 0


# --- rows without an id ------------------------------------------------------------------


def test_rows_without_an_id_are_matched_by_content_and_identical_requests_sent_once(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    texts = [f"text {i % 30}" for i in range(40)]  # 10 rows repeat an earlier request
    pl.DataFrame({"text": texts}).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, input__id_column=None)

    first = run_cli("run", str(job), cwd=tmp_path)

    assert first.returncode == 0, first.stderr
    assert "deduplicated: 10 row(s)" in first.stderr
    assert simulator.stats(full=False)["completions"] == 30
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["response"].to_list() == [answer(messages_for(t)) for t in texts]

    edited = ["new a", "new b", *texts[5:20], *texts[25:], "new c"]  # 3 inserted, 10 deleted
    pl.DataFrame({"text": edited}).write_csv(tmp_path / "reviews.csv")
    second = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert second.returncode == 0, second.stderr
    stats = simulator.stats(full=False)
    assert stats["completions"] == 33, "only the three new rows are sent"
    assert stats["duplicate_paid"] == 0
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["text"].to_list() == edited
    assert out["response"].to_list() == [answer(messages_for(t)) for t in edited]


# --- the input changes under a running job -----------------------------------------------


def _start_slow_run(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]], rows: int
) -> tuple[Path, subprocess.Popen[str], pl.DataFrame]:
    simulator.configure(latency_ms=(100, 200))
    data = reviews(rows)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=8)
    proc = start_cli("run", str(job), "--quiet", cwd=tmp_path)
    started.append(proc)
    wait_until(proc, lambda: recorded(tmp_path / "out" / "result.parquet.run") > 0)
    return job, proc, data


def test_an_input_rewritten_during_the_run_is_planned_again_never_mixed(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    _, proc, data = _start_slow_run(tmp_path, simulator, started, 120)
    rewritten = data.with_columns(pl.format("rewritten: {}", pl.col("text")).alias("text"))
    rewritten.write_csv(tmp_path / "reviews.csv.new")
    os.replace(tmp_path / "reviews.csv.new", tmp_path / "reviews.csv")
    simulator.configure(latency_ms=(0, 5))

    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 0, stderr
    assert "changed during the run" in stderr
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["text"].to_list() == rewritten["text"].to_list()
    assert out["response"].to_list() == [answer(messages_for(t)) for t in rewritten["text"]]
    assert simulator.stats(full=False)["duplicate_paid"] == 0


@pytest.mark.parametrize("change", ["deleted", "column renamed"])
def test_an_input_deleted_or_renamed_during_the_run_stops_without_a_traceback(
    tmp_path: Path,
    simulator: RunningSimulator,
    started: list[subprocess.Popen[str]],
    change: str,
) -> None:
    job, proc, data = _start_slow_run(tmp_path, simulator, started, 400)
    if change == "deleted":
        (tmp_path / "reviews.csv").unlink()
    else:
        data.rename({"text": "body"}).write_csv(tmp_path / "reviews.csv")

    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr
    assert "changed during the run" in stderr and "Finished rows are kept" in stderr
    kept = recorded(tmp_path / "out" / "result.parquet.run")
    assert kept > 0
    if change == "column renamed":
        assert "text" in stderr
    data.write_csv(tmp_path / "reviews.csv")
    simulator.configure(latency_ms=(0, 0))
    rerun = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert simulator.stats(full=False)["duplicate_paid"] == 0


def test_a_deleted_checkpoint_beside_a_complete_output_reuses_the_output(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    import shutil

    data = reviews(50)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    shutil.rmtree(tmp_path / "out" / "result.parquet.run")
    edited = data.with_columns(
        pl.when(pl.int_range(pl.len()) < 5)
        .then(pl.lit("edited"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    edited.write_csv(tmp_path / "reviews.csv")

    result = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "no checkpoint was found; 50 answered row(s)" in result.stderr
    stats = simulator.stats(full=False)
    assert stats["completions"] == 50 + 5, "only the five edited rows are sent"
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["response"].to_list() == [answer(messages_for(t)) for t in edited["text"]]


# --- the output format -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["result.csv", "result.jsonl"])
def test_the_output_format_follows_the_extension(
    tmp_path: Path, simulator: RunningSimulator, name: str
) -> None:
    data = reviews(12)
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, output__path=f"out/{name}")

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    path = tmp_path / "out" / name
    if name.endswith(".csv"):
        assert path.read_text().startswith("review_id,product,rating,text,response,")
        out = pl.read_csv(path)
    else:
        out = pl.read_ndjson(path)
    assert out["review_id"].to_list() == data["review_id"].to_list()
    assert out["response"].to_list() == [answer(messages_for(t)) for t in data["text"]]
    assert out["error"].null_count() == out.height
    again = run_cli("run", str(job), "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert simulator.stats(full=False)["completions"] == data.height


def test_an_output_extension_without_a_format_is_refused(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(3).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, output__path="out/result.txt")

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    assert ".parquet, .csv or .jsonl" in result.stderr
    assert simulator.stats(full=False)["requests"] == 0


def test_a_checkpoint_keyed_by_position_is_rekeyed_not_paid_again(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    import sqlite3

    texts = [f"text {i}" for i in range(20)]
    pl.DataFrame({"text": texts}).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, input__id_column=None)
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    path = tmp_path / "out" / "result.parquet.run" / "checkpoint.sqlite"
    with sqlite3.connect(path) as db:  # as an earlier version left it: keyed by row number
        hashes = [row[0] for row in db.execute("SELECT request_hash FROM results")]
        for position, request_hash in enumerate(hashes):
            db.execute(
                "UPDATE results SET row_key = ? WHERE request_hash = ?",
                (str(position), request_hash),
            )
        db.execute("DELETE FROM meta WHERE name = 'keyed_by_request'")
    (tmp_path / "out" / "result.parquet").unlink()

    rerun = run_cli("run", str(job), "--quiet", cwd=tmp_path)

    assert rerun.returncode == 0, rerun.stderr
    assert simulator.stats(full=False)["completions"] == 20
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out["response"].to_list() == [answer(messages_for(t)) for t in texts]
