"""Cluster benchmarks: the shared rate limit over Ray workers, and the limiter actor's capacity.

    .venv/bin/python benchmarks/cluster.py efficiency   # 20,000 rows, 4 workers, 6,000 RPM
    .venv/bin/python benchmarks/cluster.py leases       # lease calls a second the actor serves
    .venv/bin/python benchmarks/cluster.py kill         # 12,000 rows at 9,000 RPM, a worker killed

`efficiency` runs the real CLI (`pipeline run --ray --ray-workers 4`) on a local Ray
cluster against the simulator in another process, enforcing 6,000 RPM per second
(100 requests in any one-second window). It reports the rate achieved from the first
request to the last answer against the limit, the 429s, and whether every row carries
its own answer. `leases` starts the limiter actor and calls `lease` from several
client processes as fast as they can, for the actor's calls a second. `kill` runs
KILL_ROWS rows against a server enforcing KILL_RPM per second, SIGKILLs one worker
once its journal holds answers it has not committed yet, and reports the same rate
and 429 figures, whether every row is there exactly once, and what was paid twice
against what was in flight at the kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from million import write_job
from run import check_rows, make_input, run_client, sim_stats, start_simulator

ROWS = int(os.environ.get("BENCH_ROWS", "20000"))
KILL_ROWS = int(os.environ.get("BENCH_KILL_ROWS", "12000"))
KILL_RPM = 9000
KILL_AT_JOURNALED = 20  # answers landed but not committed when the worker is killed
WORKERS = 4
RPM = 6000


@contextmanager
def cluster_job(name: str, rows: int, rpm: int = RPM) -> Iterator[tuple[Path, Any, str, Path]]:
    """A workdir with `rows` of input, a simulator enforcing `rpm` per second, and the
    job: (workdir, input frame, simulator URL, job file)."""
    with tempfile.TemporaryDirectory(prefix=f"pipeline-{name}-") as tmp:
        workdir = Path(tmp)
        frame = make_input(rows, workdir / "input.parquet")
        simulator, url = start_simulator(
            {"latency_ms": [50, 150], "rpm": rpm, "limit_window": "second"}, workdir
        )
        try:
            job = write_job(
                workdir,
                url,
                name=name,
                output="out.parquet",
                max_tokens=200,
                limits={"requests_per_minute": rpm, "concurrency": 64},
            )
            yield workdir, frame, url, job
        finally:
            simulator.terminate()
            simulator.wait(timeout=10)


def efficiency() -> str:
    with cluster_job("cluster-efficiency", ROWS) as (workdir, frame, url, job):
        wall, cpu, rss, code, _ = run_client(
            # Ray's processes inherit the driver's CPU affinity: leave them unpinned.
            job,
            workdir,
            extra=["--ray", "--ray-workers", str(WORKERS)],
            pin=False,
        )
        stats = sim_stats(url)
        correct, wrong, missing = check_rows(frame, workdir / "out.parquet")
    return (
        f"{ROWS} rows, {WORKERS} workers, {RPM} RPM enforced per second: exit {code}, "
        f"wall {wall:.1f}s (driver CPU {cpu:.1f}s, peak RSS {rss:.0f} MB), "
        f"{_server_saw(stats, RPM)}, duplicate paid {stats['duplicate_paid']}, "
        f"rows correct {correct}, wrong {wrong}, missing {missing}"
    )


def _server_saw(stats: dict[str, Any], rpm: int) -> str:
    """The rate the server saw from the first request to the last against its limit,
    and the 429s."""
    span = stats["last_request_at"] - stats["first_request_at"]
    achieved = (stats["requests"] - 1) / span if span > 0 else 0.0
    rejected = stats["rate_limited"]
    return (
        f"first to last request {span:.1f}s = {achieved:.1f} req/s = "
        f"{achieved / (rpm / 60):.3f} of the limit, 429s {rejected} "
        f"({100 * rejected / stats['requests']:.2f}% of {stats['requests']})"
    )


def leases(callers: int = 4, seconds: float = 10.0) -> str:
    import ray

    from pipeline.cluster.limiter import ClusterLimiter, WorkerReport

    ray.init(num_cpus=callers, include_dashboard=False, logging_level="ERROR")
    try:
        limiter = (
            ray.remote(ClusterLimiter)
            .options(num_cpus=0)
            .remote(6_000_000, None, concurrency=10_000)
        )

        @ray.remote(num_cpus=1)
        def caller(index: int) -> int:
            calls, stop = 0, time.time() + seconds
            while time.time() < stop:
                ray.get(limiter.lease.remote(WorkerReport(f"w{index}"), 10.0))
                calls += 1
            return calls

        started = time.perf_counter()
        total = sum(ray.get([caller.remote(i) for i in range(callers)]))
        elapsed = time.perf_counter() - started
    finally:
        ray.shutdown()
    return (
        f"limiter actor: {total} lease calls from {callers} callers in {elapsed:.1f}s "
        f"= {total / elapsed:.0f} calls/s"
    )


def kill() -> str:
    command = [sys.executable, "-m", "pipeline", "run", "--quiet", "--ray"]
    with cluster_job("cluster-kill", KILL_ROWS, KILL_RPM) as (workdir, frame, url, job):
        driver = subprocess.Popen(
            [*command, "--ray-workers", str(WORKERS), str(job)],
            cwd=workdir,
            stderr=subprocess.PIPE,
            text=True,
        )
        victim, journaled = _victim(workdir / "out.parquet.cluster", driver)
        before = sim_stats(url)["in_flight"]
        os.kill(victim, signal.SIGKILL)
        gauge = max(before, sim_stats(url)["in_flight"])
        _, stderr = driver.communicate(timeout=1800)
        stats = sim_stats(url)
        correct, wrong, missing = check_rows(frame, workdir / "out.parquet")
        once = _exactly_once(frame, workdir / "out.parquet")
        log = workdir / "out.parquet.run" / "events.jsonl"
        events = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    recovered = sum(e.get("recovered", 0) for e in events if e["event"] == "shard_started")
    ended = ("shard_finished", "shard_stopped")
    leases = sum(e.get("leases", 0) for e in events if e["event"] in ended)
    attempts = [e for e in events if e["event"] == "attempt"]
    first = min((e["t"] for e in attempts), default=0.0)
    seconds = Counter(round(e["t"] - first) for e in attempts if e["status"] == 429)
    rejected = ", ".join(f"{n} at {s}s" for s, n in sorted(seconds.items())) or "none"
    window = 64 // WORKERS
    failure = "" if driver.returncode == 0 else f" ({stderr[-300:]})"
    return (
        f"{KILL_ROWS} rows, {WORKERS} workers, {KILL_RPM} RPM enforced per second, one "
        f"SIGKILLed with {journaled} answers in its journal: exit {driver.returncode}{failure}, "
        f"{_server_saw(stats, KILL_RPM)}, journaled answers recovered {recovered}, "
        f"duplicate paid {stats['duplicate_paid']} (in flight at the kill: simulator gauge "
        f"{gauge}, the worker's window {window}), distinct paid {stats['distinct_paid']}, "
        f"rows correct {correct}, wrong {wrong}, missing {missing}, each row exactly once: "
        f"{once}; 429s by second of the run: {rejected}; lease calls of the workers that "
        f"finished {leases}"
    )


def _exactly_once(frame: Any, output: Path) -> bool:
    """Whether the output holds every input row once and no other."""
    import polars as pl

    if not output.exists():
        return False
    ids = pl.read_parquet(output, columns=["id"])["id"]
    return ids.len() == frame.height and ids.n_unique() == frame.height


def _victim(state: Path, driver: subprocess.Popen[str]) -> tuple[int, int]:
    """A worker's pid once its shard's journal holds KILL_AT_JOURNALED answers, and how
    many it held then."""
    from pipeline.checkpoint import Journal

    while driver.poll() is None:
        for log in state.glob("shards/*/*.jsonl"):
            for line in log.read_bytes().splitlines():
                event = orjson.loads(line)
                if event["event"] != "shard_started":
                    continue
                folder = state / "journal" / log.parent.name
                journaled = len(Journal(folder, "landed").replay())
                if journaled >= KILL_AT_JOURNALED:
                    return int(event["pid"]), journaled
        time.sleep(0.005)
    raise SystemExit(f"the run ended before a worker was killed: {driver.communicate()}")


if __name__ == "__main__":
    benchmarks = {"efficiency": efficiency, "leases": leases, "kill": kill}
    for name in sys.argv[1:] or ["leases", "efficiency"]:
        print(benchmarks[name](), flush=True)
