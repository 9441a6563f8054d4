"""A million-row batch job: planning, writing and uploading its request files.

    .venv/bin/python benchmarks/batch_million.py [--rows N]

Runs `pipeline run JOB --batch --detach` over N rows (default 1,000,000) against the
simulator in its own process (its batches never end within the run: only planning,
writing, uploading and creating are measured), and reports the client's peak RSS,
wall time, the number of batches and files the simulator received, their largest
request count, and that no chat completion was requested.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import million
from million import make_input
from run import pinned, sim_stats, start_simulator


def write_job(workdir: Path, url: str) -> Path:
    return million.write_job(
        workdir, url, name="batch-million", output="out/batch-million.parquet", limits={}
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="batch-million-") as folder:
        workdir = Path(folder)
        make_input(args.rows, workdir / "input.parquet")
        simulator, url = start_simulator(
            {"accept_any_model": True, "batch_turnaround_s": 86400}, workdir
        )
        try:
            job = write_job(workdir, url)
            command = [sys.executable, "-m", "pipeline", "run", str(job), "--batch", "--detach"]
            started = time.perf_counter()
            process = subprocess.Popen(
                pinned(0, [*command, "--quiet"]), cwd=workdir, stderr=subprocess.PIPE, text=True
            )
            _, status, usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - started
            stderr = process.stderr.read() if process.stderr else ""
            code = os.waitstatus_to_exitcode(status)
            stats = sim_stats(url)
        finally:
            simulator.kill()
            simulator.wait()
    if code != 0:
        raise SystemExit(f"pipeline run exited {code}:\n{stderr}")
    print(f"rows: {args.rows:,}")
    print(f"exit code: {code}")
    print(f"wall: {wall:.1f} s (plan, write, upload and create every batch)")
    print(f"peak RSS: {usage.ru_maxrss / 1024:.0f} MB")
    print(f"files uploaded: {stats['files_uploaded']}, batches created: {stats['batches_created']}")
    print(f"chat-completion requests: {stats['requests']}")


if __name__ == "__main__":
    main()
