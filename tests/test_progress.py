"""The progress display: fits the terminal, starts where a resume starts, counts what it says.

The end-to-end tests run the real CLI in a pseudo-terminal of a given width and read
back everything it drew.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios
from pathlib import Path

import pytest
from conftest import cli_env, make_job, reviews, run_cli

from pipeline.counters import RunCounters
from pipeline.progress import Snapshot, layout, needs_two_lines, waits
from pipeline.simulator import RunningSimulator

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BIG = Snapshot(
    done=1_234_567,
    total=2_000_000,
    failed=12_345,
    cost=1234.5678,
    projected=2345.6789,
    eta_s=3 * 3600 + 25 * 60,
    sent=1_300_000,
    in_flight=256,
    retries=45_678,
    rpm=30_000,
    tokens=123_456_789,
    tokens_per_s=98_765,
)


def run_in_terminal(args: list[str], cwd: Path, columns: int, timeout: float = 60) -> list[str]:
    """Run `pipeline ARGS` in a pseudo-terminal `columns` wide; returns every line drawn.

    A "line" is what the program wrote between carriage returns, newlines and
    cursor moves, with colour codes removed: each starts at column 0, so its length
    is the width it takes on the screen.
    """
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI, with the pty as its terminal
        os.chdir(cwd)
        os.execve(sys.executable, [sys.executable, "-m", "pipeline", *args], cli_env())
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    out = b""
    while True:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            os.kill(pid, 9)
            raise AssertionError(f"no output for {timeout}s: {out[-2000:]!r}")
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    os.waitpid(pid, 0)
    os.close(fd)
    text = out.decode()
    return [ANSI.sub("", part) for part in re.split(r"\r|\n|\x1b\[A", text)]


def bar_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if re.match(r"[\d,]+/[\d,]+ +\d+%\|", line)]


@pytest.mark.parametrize("width", [60, 80, 100, 160, 240])
def test_every_line_fits_and_keeps_the_essentials(width: int) -> None:
    two = needs_two_lines(width, BIG.total)
    tail, second = layout(BIG, width, two_lines=two)
    frame = len(f"{BIG.done:,}/{BIG.total:,} 100%||")
    assert frame + 10 + len(tail) <= width  # a bar of at least 10 columns still fits
    assert len(second) < width
    if width >= 80:
        assert "ETA 3:25:00" in tail and "12,345" in tail
        assert "$1,235/~$2,346" in tail or "$1,234.57 of ~$2,345.68" in tail
    if width < 160:
        assert two and second.startswith("sent 1,300,000 · in flight 256")


def test_at_160_columns_a_usual_job_shows_everything_on_one_line() -> None:
    usual = dataclasses.replace(BIG, done=1_248, total=3_000, failed=3, sent=1_300, retries=12)
    usual = dataclasses.replace(usual, cost=0.0123, projected=0.0300, tokens=45_200)
    assert not needs_two_lines(160, usual.total)
    tail, second = layout(usual, 160, two_lines=False)
    assert second == ""
    assert len("1,248/3,000 100%||") + 10 + len(tail) <= 160
    for part in ("ETA 3:25:00", "failed 3", "$0.0123 of ~$0.0300", "sent 1,300", "in flight 256"):
        assert part in tail
    assert "tok/s" in tail


def test_projected_cost_and_eta_count_only_what_this_run_sends() -> None:
    from pipeline.progress import Progress

    counters = RunCounters(rows_finished=10, requests_sent=12, cost_usd=0.10, priced=True)
    progress = Progress(110, reused=60, enabled=False)
    snapshot = progress._snap(counters, 60, None, 2, 600.0, progress._started + 5.0)
    assert snapshot.done == 70
    assert snapshot.projected == pytest.approx(0.50)  # 10 sent + 40 left, at $0.01 a row
    assert snapshot.eta_s == pytest.approx(20.0)  # 40 rows left at 2 rows/s


@pytest.mark.parametrize("width", [80, 160])
def test_the_bar_fits_a_terminal_and_shows_cost_eta_and_failures(
    tmp_path: Path, simulator: RunningSimulator, width: int
) -> None:
    simulator.configure(latency_ms=(20, 60))
    reviews(400).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=8)

    lines = run_in_terminal(["run", str(job)], tmp_path, width)

    assert lines[0] == "starting: 400 rows to send"
    drawn = lines[: next(i for i, line in enumerate(lines) if line.startswith("rows: "))]
    assert max(len(line) for line in drawn) <= width, max(drawn, key=len)
    bars = bar_lines(lines)
    assert len(bars) >= 2, lines
    final = bars[-1]
    assert final.startswith("400/400 100%|")
    assert "ETA 0:00" in final and "failed 0" in final and re.search(r"\$[\d.]+ of ~\$", final)
    details = [line for line in drawn if "in flight" in line]
    if width >= 160:
        assert "in flight" in final and "rpm" in final  # everything on one line
    else:
        # The second line: what the run waits for, if anything, then the counters.
        assert details and all(re.match(r"(.* · )?sent ", line) for line in details)
    summary = "\n".join(lines)
    # The summary wraps between words at the terminal's width, never inside one.
    told = lines[next(i for i, line in enumerate(lines) if line.startswith("rows: ")) :]
    assert all(len(line) < width for line in told), max(told, key=len)
    assert "at most 8 in flight at once" in " ".join(" ".join(told).split())
    sent = int(re.search(r"requests this run: ([\d,]+) sent", summary)[1].replace(",", ""))  # type: ignore[index]
    assert sent == simulator.stats(full=False)["requests"]


def test_a_resumed_run_says_what_it_reuses_and_starts_the_bar_there(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    data = reviews(300)
    data.head(100).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    data.write_csv(tmp_path / "reviews.csv")  # 200 new rows
    simulator.reset()

    lines = run_in_terminal(["run", str(job)], tmp_path, 80)

    assert lines[0] == "resuming: 100 of 300 rows reused from earlier runs, 200 to send"
    bars = bar_lines(lines)
    assert bars[0].startswith("100/300 ")
    assert all(int(b.split("/")[0].replace(",", "")) >= 100 for b in bars)
    assert simulator.stats(full=False)["requests"] == 200
    assert "rows: 300 (100 reused from earlier runs, 200 finished this run" in "\n".join(lines)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rpm_counts_requests_sent_in_the_last_minute_never_a_moments_rate() -> None:
    clock = Clock()
    counters = RunCounters(clock=clock)
    for _ in range(5):  # a burst at the start: 5 requests, not 5 a millisecond
        with counters.sending():
            pass
    assert counters.requests_per_minute() == 5, "a young run: every request so far"
    for _ in range(90):  # then one a second for 90 s
        clock.now += 1
        with counters.sending():
            pass
    assert counters.requests_per_minute() == 60
    clock.now += 30
    assert counters.requests_per_minute() == 30, "half a minute of silence halves it"
    clock.now += 60
    assert counters.requests_per_minute() == 0
    assert counters.requests_sent == 95


def test_the_waits_say_what_the_run_waits_for_in_words() -> None:
    clock = Clock()
    counters = RunCounters(clock=clock)
    assert waits(counters) == ()
    counters.paused_s, counters.pause_why = 58.2, "the server asked (retry-after 60)"
    counters.in_flight = 32
    counters.learned_limits = {"requests": 300.0}
    assert waits(counters) == (
        "paused 58 s more: the server asked (retry-after 60)",
        "no answer yet from 32 requests",
        "limit learned: 300 rpm from the server's headers",
    )
    counters.paused_s, counters.last_answer_at = 0.0, clock.now
    clock.now += 12
    assert waits(counters)[0] == "no answer for 12 s from 32 requests"
    clock.now -= 11  # answers came a second ago: nothing to explain
    assert waits(counters) == ("limit learned: 300 rpm from the server's headers",)
