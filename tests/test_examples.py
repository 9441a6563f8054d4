"""Every example in jobs/ runs as shipped, on the bundled simulator."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import ROOT, run_cli

from pipeline.columns import RESULT_NAMES
from pipeline.spec import load_spec

SIMULATED = [
    path.name
    for path in sorted((ROOT / "jobs").glob("*.yaml"))
    if load_spec(path).model.provider == "simulator"
]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "data", tmp_path / "data")
    shutil.copytree(ROOT / "jobs", tmp_path / "jobs")
    return tmp_path


def test_every_simulated_example_is_covered() -> None:
    assert {"example.yaml", "summarize.yaml", "classify.yaml", "extract.yaml"} <= set(SIMULATED)


@pytest.mark.parametrize("name", SIMULATED)
def test_example_job_runs(project: Path, name: str) -> None:
    result = run_cli("run", f"jobs/{name}", "--quiet", cwd=project, key=None)

    assert result.returncode == 0, result.stderr
    spec = load_spec(project / "jobs" / name)
    out = pl.read_parquet(project / spec.output_path)
    if spec.steps is not None:  # each map step's columns, prefixed with its name
        for step in (s for s in spec.steps if s.reduce is None):
            assert f"{step.name}_response" in out.columns
            errors = out[f"{step.name}_error"]
            assert errors.null_count() == out.height > 0
        return
    start = out.columns.index("response")
    assert out.columns[start : start + len(RESULT_NAMES)] == list(RESULT_NAMES)
    if spec.output.schema_:
        assert out.columns[-len(spec.output.schema_) :] == list(spec.output.schema_)
    assert out["error"].null_count() == out.height > 0


def test_python_api_example_runs(project: Path) -> None:
    result = subprocess.run(
        [sys.executable, "jobs/python_api_example.py"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert "a1" in result.stdout and "Answer" in result.stdout
