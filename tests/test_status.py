"""`pipeline status`: readable numbers, whether a run is active, honest pending counts."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_job, reviews, run_cli, start_cli

from pipeline.checkpoint import Checkpoint
from pipeline.simulator import RunningSimulator


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def recorded(workdir: Path, output: str = "result.parquet") -> int:
    path = workdir / "out" / f"{output}.run" / "checkpoint.sqlite"
    if not path.exists():
        return 0
    checkpoint = Checkpoint(path)
    try:
        return checkpoint.totals().rows
    finally:
        checkpoint.close()


def test_a_finished_job_says_done_with_separators_and_no_rate(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(1200).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=32)
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0

    out = run_cli("status", str(job), cwd=tmp_path).stdout

    assert "test-job: 1,200/1,200 rows finished (0 failed), 0 pending" in out
    assert re.search(r"tokens: \d{1,3}(,\d{3})+ in, \d{1,3}(,\d{3})+ out", out), out
    assert "run: none active; done" in out
    assert "rows/s" not in out and "left" not in out


def test_status_during_a_limited_run_counts_that_run_and_says_it_is_active(
    tmp_path: Path, simulator: RunningSimulator, started: list[subprocess.Popen[str]]
) -> None:
    # 60 rows, two at a time, 0.4-0.5 s each: the run lasts long enough to be seen running.
    simulator.configure(latency_ms=(400, 500))
    reviews(200).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=2)
    proc = start_cli("run", str(job), "--quiet", "--limit", "60", cwd=tmp_path)
    started.append(proc)
    deadline = time.monotonic() + 30
    while recorded(tmp_path, "result.first-60.parquet") < 4:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)

    out = run_cli("status", str(job), cwd=tmp_path).stdout

    done = int(re.search(r"test-job: (\d+)/200 rows finished", out)[1])  # type: ignore[index]
    assert f"{200 - done} pending" in out
    assert f"run: active with --limit 60 (pid {proc.pid})" in out
    left = int(re.search(r"(\d+) of its 60 rows left", out)[1])  # type: ignore[index]
    assert 0 < left <= 60 - 4

    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    after = run_cli("status", str(job), cwd=tmp_path).stdout
    assert "run: none active (the last one sent" in after
    assert f"`pipeline run {job}` resumes" in after
