"""What an operator sees: progress lines when not in a terminal, and never an API key.

The key checks run the real CLI against a server, let the run fail in a way that
could carry the key back (a rejected key, a 5xx body that echoes the request, a
dropped connection), then look for the key in every byte the run left behind: the
run directory (events.jsonl, the SQLite checkpoint and its WAL), the output, the
report, `pipeline show`, and the commands' stdout and stderr.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import SIM_KEY, make_job, reviews, run_cli, start_cli

from pipeline.simulator import RunningSimulator

LEAKY_KEY = "sk-leak-test-9d8c7b6a5f4e3d2c1b0a"


def test_progress_lines_appear_periodically_when_not_a_terminal(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(latency_ms=(60.0, 80.0))
    reviews(60).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=2)

    result = run_cli("run", str(job), cwd=tmp_path, PIPELINE_PROGRESS_EVERY_S="0.2")

    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress:")]
    assert len(lines) >= 3, result.stderr
    done = [int(m.group(1)) for m in map(re.compile(r"progress: (\d+)/60 rows").match, lines) if m]
    assert len(done) == len(lines) and done == sorted(done), lines
    assert all("rows/s" in line and "left" in line for line in lines)


class _EchoHandler(BaseHTTPRequestHandler):
    """A careless server: every answer is a 500 whose message echoes the whole request."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
        message = f"internal error handling {body} with headers {dict(self.headers)}"
        payload = json.dumps({"error": {"message": message, "type": "server_error"}}).encode()
        self.send_response(500)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.send_header("x-echo-authorization", self.headers.get("authorization", ""))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def echo_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def assert_key_nowhere(key: str, workdir: Path, *outputs: str) -> None:
    for text in outputs:
        assert key not in text
    needle = key.encode()
    files = [p for p in workdir.rglob("*") if p.is_file()]
    assert any(p.name == "events.jsonl" for p in files), "the run must have left a log"
    assert any(p.name == "checkpoint.sqlite" for p in files)
    for path in files:
        assert needle not in path.read_bytes(), f"the API key is in {path.relative_to(workdir)}"


def failing_rows() -> pl.DataFrame:
    return reviews(6).with_columns(
        pl.when(pl.col("review_id").is_in(["R001", "R004"]))
        .then(pl.lit("broken [[sim:status=500]]"))
        .otherwise(pl.col("text"))
        .alias("text")
    )


def run_report_and_show(workdir: Path, key: str) -> list[str]:
    report = run_cli("report", "test-job.yaml", cwd=workdir, key=key)
    assert report.returncode == 0, report.stderr
    show = run_cli("show", "test-job.yaml", "--limit", "0", cwd=workdir, key=key)
    assert show.returncode == 0, show.stderr
    return [report.stdout, report.stderr, show.stdout, show.stderr]


def test_a_rejected_key_appears_nowhere(tmp_path: Path, simulator: RunningSimulator) -> None:
    reviews(20).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__concurrency=2)

    result = run_cli("run", str(job), cwd=tmp_path, key=LEAKY_KEY)

    assert result.returncode == 3, result.stderr
    assert "authentication_error" in result.stderr
    # No output yet: the report and show read the rows finished so far.
    seen = run_report_and_show(tmp_path, LEAKY_KEY)
    assert (tmp_path / "out" / "result.report.html").exists()
    assert_key_nowhere(LEAKY_KEY, tmp_path, result.stdout, result.stderr, *seen)


def test_a_key_sent_in_the_body_stays_out_of_5xx_failures(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    """ModelsLab's preset puts the key in the JSON body as well as the header."""
    failing_rows().write_csv(tmp_path / "reviews.csv")
    job = make_job(
        tmp_path,
        simulator,
        model__provider="modelslab",
        model__base_url=f"{simulator.url}/api/v7/llm",
        limits__max_attempts=2,
    )

    result = run_cli("run", str(job), cwd=tmp_path, key=SIM_KEY)

    assert result.returncode == 1, result.stderr
    assert "server_error 2" in result.stderr
    seen = run_report_and_show(tmp_path, SIM_KEY)
    assert_key_nowhere(SIM_KEY, tmp_path, result.stdout, result.stderr, *seen)


@pytest.mark.parametrize("provider", ["openai", "modelslab"])
def test_a_server_that_echoes_the_request_in_its_errors_leaks_no_key(
    tmp_path: Path, provider: str
) -> None:
    reviews(4).write_csv(tmp_path / "reviews.csv")
    with echo_server() as url:
        base = f"{url}/v1" if provider == "openai" else f"{url}/api/v7/llm"
        job = make_job(
            tmp_path,
            None,
            model__provider=provider,
            model__base_url=base,
            limits__max_attempts=2,
        )
        result = run_cli("run", str(job), cwd=tmp_path, key=LEAKY_KEY)

    assert result.returncode == 1, result.stderr
    errors = pl.read_parquet(tmp_path / "out" / "result.parquet")["error"].to_list()
    assert all(e is not None and e.startswith("server_error (HTTP 500)") for e in errors)
    assert any("internal error handling" in e and "***" in e for e in errors), "redacted echo"
    seen = run_report_and_show(tmp_path, LEAKY_KEY)
    assert_key_nowhere(LEAKY_KEY, tmp_path, result.stdout, result.stderr, *seen)


def test_a_dropped_connection_leaks_no_key(tmp_path: Path, simulator: RunningSimulator) -> None:
    simulator.configure(drop_connection=1.0)
    reviews(4).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__max_attempts=1)

    result = run_cli("run", str(job), cwd=tmp_path, key=SIM_KEY)

    assert result.returncode == 1, result.stderr
    errors = pl.read_parquet(tmp_path / "out" / "result.parquet")["error"].to_list()
    assert all(e is not None for e in errors)
    seen = run_report_and_show(tmp_path, SIM_KEY)
    assert_key_nowhere(SIM_KEY, tmp_path, result.stdout, result.stderr, *seen)


def timed_lines(process: subprocess.Popen[str]) -> list[tuple[float, str]]:
    """Each line of the process's stderr with the moment it arrived (read to the end)."""
    assert process.stderr is not None
    return [(time.monotonic(), line.rstrip("\n")) for line in process.stderr]


def test_a_heartbeat_says_why_nothing_finishes_while_the_server_holds_the_run_back(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    # Every request gets a 429 with the same retry-after for 4 s, then all is well.
    simulator.configure(throttle_s=4.0, throttle_retry_after_s=2.0)
    reviews(20).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__max_attempts=8)
    every_s = 0.5

    with start_cli(
        "run", str(job), cwd=tmp_path, PIPELINE_PROGRESS_EVERY_S=str(every_s)
    ) as process:
        lines = timed_lines(process)
    assert process.returncode == 0, lines

    progress = [(at, line) for at, line in lines if line.startswith("progress:")]
    assert len(progress) >= 6, lines
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(progress)]
    # A line at least every interval, whether or not rows finish (slack for a busy machine).
    assert max(gaps) <= every_s * 2.5, gaps
    paused = [line for _, line in progress if "paused" in line]
    assert paused, "the lines while held back say so"
    assert all("the server asked (retry-after 2)" in line for line in paused), paused
    assert all(re.search(r"\bpaused \d+\.\d s more: ", line) for line in paused), paused
    assert re.match(r"progress: 0/20 rows", paused[0]), "said while nothing had finished"
    stats = simulator.stats()
    assert stats["rate_limited"] > 0
    # Every request the server saw is counted once, and every one past a row's first as a retry.
    sent = re.search(
        r"requests this run: (\d+) sent \((\d+) of them retries\)",
        "\n".join(line for _, line in lines),
    )
    assert sent, lines
    assert int(sent.group(1)) == stats["requests"] and int(sent.group(2)) == stats["requests"] - 20
    assert pl.read_parquet(tmp_path / "out" / "result.parquet")["error"].null_count() == 20


def test_paths_are_printed_normalised(tmp_path: Path, simulator: RunningSimulator) -> None:
    (tmp_path / "jobs").mkdir()
    reviews(5).write_csv(tmp_path / "reviews.csv")
    job = make_job(
        tmp_path / "jobs",
        simulator,
        input_path="../reviews.csv",
        output__path="../out/result.parquet",
    )

    result = run_cli("run", str(job.relative_to(tmp_path)), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "output: out/result.parquet" in result.stderr
    assert "`pipeline report out/result.parquet`" in result.stderr
    assert ".." not in result.stderr.split("rows: ")[1]


def test_a_limit_learned_from_headers_is_in_the_summary_the_run_log_and_the_report(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    simulator.configure(rpm=3000)  # it says so in x-ratelimit-limit-requests
    reviews(20).write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator)

    result = run_cli("run", str(job), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "limit learned: 3,000 requests a minute from the server's headers" in result.stderr
    events = [
        json.loads(line)
        for line in (tmp_path / "out" / "result.parquet.run" / "events.jsonl")
        .read_text()
        .splitlines()
    ]
    learned = [e for e in events if e["event"] == "limit_learned"]
    assert [(e["dimension"], e["per_minute"]) for e in learned] == [("requests", 3000.0)]
    assert events[-1]["learned_limits"] == {"requests": 3000.0}
    assert run_cli("report", "test-job.yaml", cwd=tmp_path).returncode == 0
    page = (tmp_path / "out" / "result.report.html").read_text()
    assert "<th>limit learned: requests</th><td>3,000 a minute" in page
