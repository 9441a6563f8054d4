"""Shared fixtures: a real simulator on loopback and the real CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from pipeline.simulator import RunningSimulator, SimulatorConfig, start_in_thread

ROOT = Path(__file__).resolve().parent.parent
# Every Ray service on loopback (the switch a local `--ray` run sets), before any
# test module imports ray; the CLI subprocesses that join the test cluster inherit it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
SIM_KEY = "sk-test-4f9c2d1e8b7a6350"
KEY_VARIABLES = ("OPENAI_API_KEY", "MODELSLAB_API_KEY", "XAI_API_KEY", "OPENROUTER_API_KEY")


@pytest.fixture(autouse=True)
def _no_real_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*KEY_VARIABLES, "SIM_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def _shared_simulator() -> Iterator[RunningSimulator]:
    with start_in_thread(SimulatorConfig(api_key=SIM_KEY)) as simulator:
        yield simulator


@pytest.fixture
def simulator(_shared_simulator: RunningSimulator) -> RunningSimulator:
    """The session's simulator, with default behaviour and zeroed counters."""
    _shared_simulator.configure(**SimulatorConfig(api_key=SIM_KEY).model_dump())
    _shared_simulator.reset()
    return _shared_simulator


def reviews(n: int = 12) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "review_id": [f"R{i:03d}" for i in range(n)],
            "product": [["kettle", "lamp", "shoes"][i % 3] for i in range(n)],
            "rating": [1 + i % 5 for i in range(n)],
            "text": [
                f"Review number {i}: the product was {'good' if i % 2 else 'bad'}."
                for i in range(n)
            ],
        }
    )


def messages_for(text: str) -> list[dict[str, str]]:
    """The messages a job made by `make_job` sends for a row with this text."""
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"Summarize: {text}"},
    ]


def make_job(
    workdir: Path,
    simulator: RunningSimulator | None,
    *,
    input_path: str = "reviews.csv",
    name: str = "test-job",
    **overrides: Any,
) -> Path:
    """Write a job spec into `workdir` that targets the simulator; returns its path."""
    spec: dict[str, Any] = {
        "name": name,
        "input": {"path": input_path, "id_column": "review_id"},
        "model": {
            "provider": "openai",
            "model": "x-ai-grok-3-mini",
            "base_url": simulator.base_url if simulator else "http://127.0.0.1:9/v1",
            "api_key_env": "SIM_API_KEY",
            "params": {"max_tokens": 200},
        },
        "prompt": {"system": "You are terse.", "template": "Summarize: {{ text }}"},
        "limits": {"concurrency": 8, "max_attempts": 4, "timeout_s": 20},
        "output": {"path": "out/result.parquet"},
    }
    for dotted, value in overrides.items():
        _set(spec, dotted.split("__"), value)
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _set(spec: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        spec = spec.setdefault(key, {})
    if value is None:
        spec.pop(keys[-1], None)
    else:
        spec[keys[-1]] = value


def cli_env(key: str | None = SIM_KEY, **env: str) -> dict[str, str]:
    """The environment the CLI runs in: no real keys, `key` as SIM_API_KEY, the repo's configs."""
    environment = {k: v for k, v in os.environ.items() if k not in KEY_VARIABLES}
    environment.pop("SIM_API_KEY", None)
    if key is not None:
        environment["SIM_API_KEY"] = key
    environment["PIPELINE_CONFIG_DIR"] = str(ROOT / "configs")
    environment.update(env)
    return environment


def run_cli(
    *args: str, cwd: Path, key: str | None = SIM_KEY, timeout: float = 120, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `pipeline ARGS` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=cli_env(key, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_cli(
    *args: str, cwd: Path, key: str | None = SIM_KEY, **env: str
) -> subprocess.Popen[str]:
    """Start `pipeline ARGS` as a real subprocess and return at once (to signal or kill it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        env=cli_env(key, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server on a free loopback port; yields the environment that reaches it."""
    pytest.importorskip("moto.server", reason="needs moto[server]: pip install -e '.[dev]'")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    environment = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    try:
        yield environment
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process and the CLIs it starts talk to moto's S3 server; one fresh bucket per test."""
    import uuid

    import boto3

    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return {**s3_server, "BUCKET": bucket}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One small local Ray cluster for the whole session; yields its address for subprocesses."""
    ray = pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[dev]'")
    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
        object_store_memory=100 * 1024 * 1024,
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
