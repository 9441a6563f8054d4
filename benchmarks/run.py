"""Benchmarks: the real CLI against the simulator in another process, one line each.

    .venv/bin/python benchmarks/run.py            # every scenario
    .venv/bin/python benchmarks/run.py s1 s4      # some of them

The simulator runs pinned to core 1 and the client to core 0 where `taskset`
exists. Each line reports the client process's wall time, CPU time and peak RSS
(from wait4), what the simulator counted, and whether every output row carries
its own correct answer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from pipeline.simulator import expected_response

ROOT = Path(__file__).resolve().parent.parent
PROMPT_CHARS = 400
MAX_TOKENS = 200
# The simulator charges TPM for its prompt count plus max_tokens: 3 + (3 + 100) + 200.
TOKENS_PER_REQUEST = 3 + 3 + PROMPT_CHARS // 4 + MAX_TOKENS


@dataclass
class Scenario:
    name: str
    rows: int
    simulator: dict[str, Any]
    limits: dict[str, Any]
    allowed_per_s: float | None = None
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


SCENARIOS = {
    "s1": Scenario(
        "S1 request-bound",
        3000,
        {"latency_ms": [300, 900], "rpm": 9000, "limit_window": "second"},
        {"concurrency": 200, "requests_per_minute": 9000},
        allowed_per_s=150,
    ),
    "s2": Scenario(
        "S2 token-bound",
        3000,
        {"latency_ms": [300, 900], "tpm": TOKENS_PER_REQUEST * 100 * 60, "limit_window": "second"},
        {"concurrency": 200, "tokens_per_minute": TOKENS_PER_REQUEST * 100 * 60},
        allowed_per_s=100,
    ),
    "s3": Scenario(
        "S3 limits unknown",
        3000,
        {"latency_ms": [300, 900], "rpm": 9000, "limit_window": "second"},
        {},
        allowed_per_s=150,
    ),
    # W1-W3: S1-S3 against a server that reports remaining/reset from its one-second
    # enforcement window (remaining near 0, reset in milliseconds at steady state).
    "w1": Scenario(
        "W1 request-bound, window-reporting server",
        3000,
        {"latency_ms": [300, 900], "rpm": 9000, "limit_window": "second", "report_window": True},
        {"concurrency": 200, "requests_per_minute": 9000},
        allowed_per_s=150,
    ),
    "w2": Scenario(
        "W2 token-bound, window-reporting server",
        3000,
        {
            "latency_ms": [300, 900],
            "tpm": TOKENS_PER_REQUEST * 100 * 60,
            "limit_window": "second",
            "report_window": True,
        },
        {"concurrency": 200, "tokens_per_minute": TOKENS_PER_REQUEST * 100 * 60},
        allowed_per_s=100,
    ),
    "w3": Scenario(
        "W3 limits unknown, window-reporting server",
        3000,
        {"latency_ms": [300, 900], "rpm": 9000, "limit_window": "second", "report_window": True},
        {"concurrency": 200},
        allowed_per_s=150,
    ),
    # A LiteLLM-style per-key limiter: fixed minute, scoped headers, retry-after 60.
    "l1": Scenario(
        "L1 LiteLLM-style limiter, limits unknown",
        1500,
        {"latency_ms": [300, 900], "rpm": 1200, "limiter_style": "litellm"},
        {"concurrency": 200},
        allowed_per_s=20,
    ),
    "s4": Scenario("S4 client overhead", 20000, {}, {"concurrency": 200}),
    "s5": Scenario(
        "S5 faults",
        2000,
        {"fail_503": 0.05, "fail_500": 0.02, "drop_connection": 0.01, "seed": 5},
        {"concurrency": 200, "max_attempts": 10},
    ),
}

# W1 ten times longer: how much of the whole-process gap is fixed start-up cost.
SCENARIOS["w1x10"] = dataclasses.replace(
    SCENARIOS["w1"], name="W1 x10 request-bound, window-reporting server", rows=30000
)


def pinned(core: int, command: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(core), *command] if taskset and os.cpu_count() >= 2 else command


def start_simulator(config: dict[str, Any], workdir: Path) -> tuple[subprocess.Popen[str], str]:
    config_path = workdir / "simulator.yaml"
    config_path.write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        "-m",
        "pipeline.simulator",
        "--port",
        "0",
        "--config",
        str(config_path),
    ]
    process = subprocess.Popen(pinned(1, command), stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"simulator did not start: {line!r}")
    return process, line.rsplit(" ", 1)[-1].strip()


def sim_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=10) as response:
        return json.load(response)


def make_input(rows: int, path: Path) -> pl.DataFrame:
    texts = [(f"Row {i}: please summarise this. " * 40)[:PROMPT_CHARS] for i in range(rows)]
    frame = pl.DataFrame({"id": list(range(rows)), "text": texts})
    frame.write_parquet(path)
    return frame


def run_client(
    job: Path, workdir: Path, extra: list[str] | None = None, *, pin: bool = True
) -> tuple[float, float, float, int, float]:
    """Wall seconds, CPU seconds, peak RSS in MB, exit code of `pipeline run`, and the
    seconds from its first request to its last answer (from its summary)."""
    command = [sys.executable, "-m", "pipeline", "run", str(job), "--quiet", *(extra or [])]
    started = time.perf_counter()
    command = pinned(0, command) if pin else command
    process = subprocess.Popen(command, cwd=workdir, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    stderr = process.stderr.read() if process.stderr else ""
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        print(stderr, file=sys.stderr)
    active = re.search(r"([\d.]+)s from first request to last answer", stderr)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024, code, float(active.group(1)) if active else wall


def check_rows(frame: pl.DataFrame, output: Path) -> tuple[int, int, int]:
    """(correct, wrong, missing) rows in the output."""
    if not output.exists():
        return 0, 0, frame.height
    out = pl.read_parquet(output, columns=["id", "response"])
    answers = dict(zip(out["id"].to_list(), out["response"].to_list(), strict=True))
    correct = wrong = missing = 0
    for row_id, text in zip(frame["id"].to_list(), frame["text"].to_list(), strict=True):
        if row_id not in answers or answers[row_id] is None:
            missing += 1
        elif answers[row_id] == expected_response("sim-model", [{"role": "user", "content": text}]):
            correct += 1
        else:
            wrong += 1
    return correct, wrong, missing


def run(key: str) -> str:
    scenario = SCENARIOS[key]
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        workdir = Path(tmp)
        frame = make_input(scenario.rows, workdir / "input.parquet")
        simulator, url = start_simulator(scenario.simulator, workdir)
        try:
            job = workdir / "job.yaml"
            spec = {
                "name": key,
                "input": {"path": "input.parquet", "id_column": "id"},
                "model": {
                    "provider": "openai",
                    "model": "sim-model",
                    "base_url": f"{url}/v1",
                    "api_key_env": None,
                    "params": {"max_tokens": MAX_TOKENS},
                },
                "prompt": {"template": "{{ text }}"},
                "limits": scenario.limits,
                "output": {"path": "out.parquet"},
            }
            job.write_text(yaml.safe_dump(spec))
            wall, cpu, rss, code, active = run_client(job, workdir)
            stats = sim_stats(url)
            correct, wrong, missing = check_rows(frame, workdir / "out.parquet")
        finally:
            simulator.terminate()
            simulator.wait(timeout=10)
    figures = describe(scenario, stats, wall, active, cpu, rss, code, (correct, wrong, missing))
    return figures


def describe(
    scenario: Scenario,
    stats: dict[str, Any],
    wall: float,
    active: float,
    cpu: float,
    rss: float,
    code: int,
    rows: tuple[int, int, int],
) -> str:
    completions = stats["completions"]
    requests = stats["requests"]
    figures = [
        f"{scenario.name}: rows {scenario.rows}",
        f"exit {code}",
        f"wall {wall:.2f}s",
    ]
    if scenario.allowed_per_s:
        ideal = scenario.rows / scenario.allowed_per_s
        figures += [
            f"ideal {ideal:.1f}s",
            f"first request to last answer {active:.2f}s",
            f"efficiency {ideal / max(active, 1e-9):.3f} (run), {ideal / wall:.3f} (whole process)",
        ]
    else:
        figures.append(f"{completions / wall:.0f} completions/s (whole process)")
    figures += [
        f"429s {stats['rate_limited']} "
        f"({100 * stats['rate_limited'] / max(requests, 1):.2f}% of {requests} requests)",
        f"CPU {cpu:.2f}s = {1000 * cpu / max(completions, 1):.3f} s/1k completions",
        f"peak RSS {rss:.0f} MB",
        f"rows correct {rows[0]}, wrong {rows[1]}, missing {rows[2]}",
        f"duplicate paid {stats['duplicate_paid']}",
    ]
    return ", ".join(figures)


def main(argv: list[str]) -> None:
    keys = [k.lower() for k in argv] or list(SCENARIOS)
    for key in keys:
        if key not in SCENARIOS:
            raise SystemExit(f"unknown scenario {key!r}; choose from {', '.join(SCENARIOS)}")
    for key in keys:
        print(run(key), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
