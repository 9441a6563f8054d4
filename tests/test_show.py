"""`pipeline show`: the real CLI on the output of a real run against the simulator."""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl
import pytest
from conftest import SIM_KEY, make_job, reviews, run_cli

from pipeline.simulator import RunningSimulator, SimulatorConfig, expected_response

MODEL = "x-ai-grok-3-mini"
WIDTH = 60
HEADER = re.compile(r"^(R\d{3}) \(row (\d+)\) · (ok|FAILED) · ", re.MULTILINE)


def response_for(text: str) -> str:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": f"Summarize: {text}"},
    ]
    return expected_response(MODEL, messages)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, _shared_simulator: RunningSimulator) -> Path:
    """A finished run of 8 rows: R002 is a bad request, R005 always gets a 500.

    One run for the module: `pipeline show` only reads it.
    """
    simulator = _shared_simulator
    simulator.configure(**SimulatorConfig(api_key=SIM_KEY).model_dump())
    simulator.reset()
    tmp_path = tmp_path_factory.mktemp("show")
    data = reviews(8).with_columns(
        pl.when(pl.col("review_id") == "R002")
        .then(pl.lit("rejected [[sim:status=400]]"))
        .when(pl.col("review_id") == "R005")
        .then(pl.lit("broken [[sim:status=500]]"))
        .otherwise(pl.col("text") + " It arrived quickly and works exactly as described.")
        .alias("text")
    )
    data.write_csv(tmp_path / "reviews.csv")
    job = make_job(tmp_path, simulator, limits__max_attempts=2)
    result = run_cli("run", str(job), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    return tmp_path


def show(workdir: Path, *args: str) -> str:
    result = run_cli("show", *args, cwd=workdir, COLUMNS=str(WIDTH))
    assert result.returncode == 0, result.stderr
    return result.stdout


def unwrapped(text: str) -> str:
    return " ".join(text.split())


def test_show_wraps_each_response_to_the_terminal_width(finished: Path) -> None:
    out = show(finished, "out/result.parquet")

    assert [m.group(1) for m in HEADER.finditer(out)] == [f"R{i:03d}" for i in range(8)]
    assert all(len(line) <= WIDTH for line in out.splitlines()), out
    rows = pl.read_parquet(finished / "out" / "result.parquet")
    answer = response_for(rows["text"][0])
    assert len(answer) > WIDTH, "the test needs a response longer than one line"
    assert answer not in out, "a long response must be wrapped, not printed on one line"
    assert answer in unwrapped(out)
    assert "  reasoning:\n    Reasoning " in out
    assert "  response:\n    Answer " in out


def test_show_errors_lists_only_failing_rows_with_their_error(finished: Path) -> None:
    out = show(finished, "out/result.parquet", "--errors")

    assert [(m.group(1), m.group(3)) for m in HEADER.finditer(out)] == [
        ("R002", "FAILED"),
        ("R005", "FAILED"),
    ]
    assert "bad_request (HTTP 400)" in unwrapped(out)
    assert "server_error (HTTP 500)" in unwrapped(out)
    assert "2 attempts" in out, "R005 was tried twice"


def test_show_id_selects_one_row_and_columns_adds_inputs(finished: Path) -> None:
    out = show(finished, "out/result.parquet", "--id", "R004", "--columns", "product,rating")

    assert [m.group(1) for m in HEADER.finditer(out)] == ["R004"]
    text = pl.read_parquet(finished / "out" / "result.parquet")["text"][4]
    assert response_for(text) in unwrapped(out)
    assert "  product: lamp\n" in out
    assert "  rating: 5\n" in out


def test_show_reads_a_job_yaml_and_its_id_column(finished: Path) -> None:
    out = show(finished, "test-job.yaml", "--id", "R007", "--limit", "1")

    assert [m.group(1) for m in HEADER.finditer(out)] == ["R007"]


def test_show_limit_says_how_many_rows_are_left_out(finished: Path) -> None:
    out = show(finished, "out/result.parquet", "--limit", "3")

    assert len(HEADER.findall(out)) == 3
    assert "showing 3 of 8 rows" in out


def test_show_rejects_an_unknown_id_or_column(finished: Path) -> None:
    missing = run_cli("show", "out/result.parquet", "--id", "R999", cwd=finished)
    assert missing.returncode == 2
    assert "R999" in missing.stderr and "review_id" in missing.stderr

    column = run_cli("show", "out/result.parquet", "--columns", "nope", cwd=finished)
    assert column.returncode == 2
    assert "nope" in column.stderr and "the input columns are" in column.stderr


def test_show_id_takes_a_row_number_too(finished: Path) -> None:
    out = show(finished, "out/result.parquet", "--id", "5")

    assert [(m.group(1), m.group(2)) for m in HEADER.finditer(out)] == [("R005", "5")]


def test_failed_rows_show_their_final_attempts_latency_not_zero(finished: Path) -> None:
    out = show(finished, "out/result.parquet", "--errors")
    rows = pl.read_parquet(finished / "out" / "result.parquet").filter(
        pl.col("error").is_not_null()
    )

    assert rows["latency_s"].null_count() == 0 and (rows["latency_s"] > 0).all()
    assert "0.00s" not in out
    assert len(re.findall(r" · (?:\d+\.\d ms|\d+\.\d\ds) · ", out)) == 2, out


def test_show_prints_a_schema_jobs_typed_columns(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    reviews(3).write_csv(tmp_path / "reviews.csv")
    schema = {"label": {"enum": ["positive", "negative"]}, "confidence": "number"}
    job = make_job(tmp_path, simulator, output__schema=schema)
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0
    rows = pl.read_parquet(tmp_path / "out" / "result.parquet")

    out = show(tmp_path, "test-job.yaml")

    for label, confidence in zip(rows["label"], rows["confidence"], strict=True):
        assert f"  label: {label}\n" in out
        assert f"  confidence: {confidence}\n" in out
    assert "response:" not in out and '{"label"' not in out
