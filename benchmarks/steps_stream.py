"""Two map steps, streaming into each other or one after the other, against the
simulator in another process: wall time, requests, 429s.

    .venv/bin/python benchmarks/steps_stream.py          # S1-S3
    .venv/bin/python benchmarks/steps_stream.py s3       # some of them

S1: the steps share one model and its request limit (the pacer is shared): streaming
must not go over the limit, and should cost next to nothing. S2: latency-bound, the
second step on another model (paced on its own): streaming overlaps the two steps.
S3: 100,000 rows, no latency, no limits: what streaming costs the client (each wave
plans and writes every row its step has taken so far). A run "after each other" sets
PIPELINE_STEP_WAVE_ROWS above the row count.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl
import yaml
from run import pinned, sim_stats, start_simulator

SCENARIOS: dict[str, dict[str, Any]] = {
    "S1 one model, 6,000 RPM shared": {
        "rows": 1500,
        "simulator": {"latency_ms": [100, 300], "rpm": 6000, "limit_window": "second"},
        "limits": {"concurrency": 64, "requests_per_minute": 6000},
        "second_model": None,
    },
    "S2 latency-bound, second step on another model": {
        "rows": 1500,
        "simulator": {"latency_ms": [300, 900], "accept_any_model": True},
        "limits": {"concurrency": 32},
        "second_model": "sim-model-b",
    },
    "S3 client-bound, 100,000 rows": {
        "rows": 100_000,
        "simulator": {"latency_ms": [0, 0]},
        "limits": {"concurrency": 200},
        "second_model": None,
    },
}


def job_for(workdir: Path, url: str, scenario: dict[str, Any]) -> Path:
    rows = scenario["rows"]
    texts = [f"Review {i}: the product was {'good' if i % 3 else 'bad'}." for i in range(rows)]
    pl.DataFrame({"id": list(range(rows)), "text": texts}).write_parquet(workdir / "in.parquet")
    second: dict[str, Any] = {
        "name": "complaint",
        "when": "label == 'negative'",
        "prompt": {"template": "What is the complaint? {{ text }}"},
    }
    if scenario["second_model"]:
        second["model"] = {"model": scenario["second_model"]}
    spec = {
        "name": "bench-steps",
        "input": {"path": "in.parquet", "id_column": "id"},
        "model": {
            "provider": "openai",
            "model": "sim-model",
            "base_url": f"{url}/v1",
            "api_key_env": "BENCH_KEY",
            "params": {"max_tokens": 50},
        },
        "limits": scenario["limits"],
        "steps": [
            {
                "name": "sentiment",
                "prompt": {"template": "Classify: {{ text }}"},
                "output": {"schema": {"label": {"enum": ["positive", "negative", "neutral"]}}},
            },
            second,
        ],
        "output": {"path": "out/result.parquet"},
    }
    path = workdir / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def one_run(name: str, scenario: dict[str, Any], streaming: bool) -> str:
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        simulator, url = start_simulator({**scenario["simulator"], "api_key": "k"}, workdir)
        try:
            job = job_for(workdir, url, scenario)
            env = {**os.environ, "BENCH_KEY": "k"}
            if not streaming:
                env["PIPELINE_STEP_WAVE_ROWS"] = str(scenario["rows"] * 10)
            command = pinned(0, [sys.executable, "-m", "pipeline", "run", str(job), "--quiet"])
            started = time.perf_counter()
            with (workdir / "stderr.txt").open("w") as stderr:
                process = subprocess.Popen(command, cwd=workdir, env=env, stderr=stderr)
                _, status, usage = os.wait4(process.pid, 0)
            wall = time.perf_counter() - started
            stats = sim_stats(url)
        finally:
            simulator.kill()
        how = "streaming" if streaming else "after each other"
        code = os.waitstatus_to_exitcode(status)
        return (
            f"{name:48} {how:17} exit {code}  {wall:6.1f} s  "
            f"CPU {usage.ru_utime + usage.ru_stime:6.1f} s  peak {usage.ru_maxrss / 1024:,.0f} MB  "
            f"{stats['completions']:,} answers  {stats['rate_limited']:,} x 429"
        )


def main() -> None:
    wanted = {arg.lower() for arg in sys.argv[1:]}
    for name, scenario in SCENARIOS.items():
        if wanted and name.split()[0].lower() not in wanted:
            continue
        for streaming in (False, True):
            print(one_run(name, scenario, streaming), flush=True)


if __name__ == "__main__":
    main()
