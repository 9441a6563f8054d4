"""A million-row job: peak memory, resume latency after a kill, checkpoint cost.

    .venv/bin/python benchmarks/million.py [--rows N]

1. Runs `pipeline run` over N rows (default 1,000,000) against the zero-latency
   simulator, SIGKILLs it once about half the rows are in the checkpoint, and
   reports the killed run's peak RSS.
2. Reruns the same command and reports how long the resumed run took to send its
   first request (process start to the simulator's first request), its peak RSS,
   the rows it re-sent, and whether every output row is correct.
3. Times the checkpoint alone: writing N results in the recorder's batch size, as
   a share of the time an S4-speed run needs for the same rows.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml
from run import pinned, sim_stats, start_simulator

from pipeline.checkpoint import Checkpoint
from pipeline.simulator import expected_response
from pipeline.types import Completion, RowResult, Usage

S4_COMPLETIONS_PER_S = 2500  # docs/BENCHMARKS.md, S4


def make_input(rows: int, path: Path) -> None:
    ids = pl.int_range(0, rows, eager=True).alias("id")
    frame = pl.DataFrame([ids]).with_columns(
        text=pl.format("Row {}: please summarise this short customer note.", pl.col("id"))
    )
    frame.write_parquet(path)


def write_job(
    workdir: Path,
    url: str,
    *,
    name: str = "million",
    output: str = "out/million.parquet",
    max_tokens: int = 50,
    limits: dict[str, int] | None = None,
) -> Path:
    """A job over `input.parquet` against the simulator at `url` (shared by the benchmarks)."""
    job = workdir / "job.yaml"
    spec = {
        "name": name,
        "input": {"path": "input.parquet", "id_column": "id"},
        "model": {
            "provider": "openai",
            "model": "sim-model",
            "base_url": f"{url}/v1",
            "api_key_env": None,
            "params": {"max_tokens": max_tokens},
        },
        "prompt": {"template": "{{ text }}"},
        "limits": {"concurrency": 200} if limits is None else limits,
        "output": {"path": output},
    }
    job.write_text(yaml.safe_dump(spec))
    return job


def finished_rows(checkpoint: Path) -> int:
    if not checkpoint.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{checkpoint}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT count(*) FROM results").fetchone()[0]
    except sqlite3.Error:
        return 0


# The client is started by a slim launcher, which reports the client's own peak RSS.
# wait4 from this process would not: a forked child's peak counts the image it was
# forked from, and this process holds polars and the million-row input (240-310 MB),
# which hid the killed run's real figure.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
print(pid, flush=True)
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, os.waitstatus_to_exitcode(status), flush=True)
"""


@dataclass
class Client:
    launcher: subprocess.Popen[str]
    pid: int

    def wait(self) -> tuple[float, int]:
        """(peak RSS in MB, exit code) of the client once it has ended."""
        assert self.launcher.stdout is not None
        maxrss_kb, code = self.launcher.stdout.readline().split()
        self.launcher.wait()
        return int(maxrss_kb) / 1024, int(code)


def start_client(job: Path, workdir: Path) -> Client:
    command = pinned(0, [sys.executable, "-m", "pipeline", "run", str(job), "--quiet"])
    launcher = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", LAUNCHER, *command],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert launcher.stdout is not None
    return Client(launcher, int(launcher.stdout.readline()))


def reset(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{url}/_sim/reset", method="POST"), timeout=10)


def killed_run(job: Path, workdir: Path, rows: int) -> tuple[float, int]:
    """Peak RSS (MB) of a run killed at half way, and the rows it had checkpointed."""
    checkpoint = workdir / "out" / "million.parquet.run" / "checkpoint.sqlite"
    client = start_client(job, workdir)
    while finished_rows(checkpoint) < rows // 2:
        time.sleep(0.5)
        if client.launcher.poll() is not None:
            raise RuntimeError("the run ended before half way")
    os.kill(client.pid, signal.SIGKILL)
    peak, _ = client.wait()
    return peak, finished_rows(checkpoint)


def resumed_run(job: Path, workdir: Path, url: str) -> tuple[float, float, float, int]:
    """(seconds to first request, wall seconds, peak RSS MB, exit code) of the rerun."""
    reset(url)
    started_wall = time.time()
    started = time.perf_counter()
    peak, code = start_client(job, workdir).wait()
    wall = time.perf_counter() - started
    first = sim_stats(url)["first_request_at"]
    to_first = (first - started_wall) if first else float("nan")
    return to_first, wall, peak, code


def check_output(path: Path, rows: int) -> tuple[int, int]:
    """(correct, wrong-or-missing) rows, checked in streaming slices."""
    out = pl.scan_parquet(path).select("id", "text", "response")
    correct = 0
    for batch in out.collect_batches(chunk_size=100_000):
        for text, response in zip(batch["text"], batch["response"], strict=True):
            messages = [{"role": "user", "content": text}]
            correct += response == expected_response("sim-model", messages)
    return correct, rows - correct


def checkpoint_cost(rows: int, workdir: Path) -> tuple[float, float]:
    """(rows per second the checkpoint writes, share of an S4-speed run's time)."""
    store = Checkpoint(workdir / "cost" / "checkpoint.sqlite")
    usage = Usage(40, 20, 30, 0, 90)
    completion = Completion(
        "Answer abcdef: " + "x" * 80, "Reasoning " + "y" * 60, usage, "stop", "m"
    )
    batch_size = 2000
    started = time.perf_counter()
    for start in range(0, rows, batch_size):
        batch = [
            RowResult(i, str(i), f"{i:032x}", 1, 0.01, completion=completion, cost_usd=1e-5)
            for i in range(start, min(rows, start + batch_size))
        ]
        store.write(batch)
    elapsed = time.perf_counter() - started
    store.close()
    rate = rows / elapsed
    return rate, S4_COMPLETIONS_PER_S / rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    rows = parser.parse_args().rows
    with tempfile.TemporaryDirectory(prefix="pipeline-million-") as tmp:
        workdir = Path(tmp)
        make_input(rows, workdir / "input.parquet")
        simulator, url = start_simulator({}, workdir)
        try:
            job = write_job(workdir, url)
            killed_rss, done_at_kill = killed_run(job, workdir, rows)
            to_first, wall, resumed_rss, code = resumed_run(job, workdir, url)
            stats = sim_stats(url)
            correct, bad = check_output(workdir / "out" / "million.parquet", rows)
        finally:
            simulator.terminate()
            simulator.wait(timeout=10)
        write_rate, share = checkpoint_cost(min(rows, 200_000), workdir)
    print(
        f"million: rows {rows}, killed at {done_at_kill} checkpointed rows, "
        f"peak RSS {killed_rss:.0f} MB (killed run), {resumed_rss:.0f} MB (resumed run); "
        f"resumed run: first request after {to_first:.2f}s, wall {wall:.1f}s, exit {code}, "
        f"sent {stats['completions']} ({stats['completions'] - (rows - done_at_kill)} more than "
        f"the unfinished rows), rows correct {correct}, wrong or missing {bad}; "
        f"checkpoint alone writes {write_rate:,.0f} rows/s = {100 * share:.1f}% of an S4-speed run"
    )


if __name__ == "__main__":
    main()
