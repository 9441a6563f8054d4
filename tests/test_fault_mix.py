"""A 20% fault mix over 1,000 rows on every wire path: exit 0, every row correct.

The faults are the ones met on real servers and gateways: 500, a proxy's 502 HTML
page, 503, dropped connections, JSON cut off halfway, well-formed JSON of the wrong
shape with HTTP 200, and an HTML page with HTTP 200 (plus streams cut midway when
streaming). Every one must end as a retry, never as a crash or a wrong row.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import make_job, messages_for, reviews, run_cli

from pipeline.simulator import RunningSimulator, expected_response

ROWS = 1000
MIX = {
    "fail_500": 0.03,
    "fail_502_html": 0.03,
    "fail_503": 0.03,
    "drop_connection": 0.03,
    "malformed": 0.03,
    "wrong_shape_200": 0.03,
    "html_200": 0.02,
}
PATHS = {
    "openai": {},
    "anthropic": {"model__provider": "anthropic"},
    "modelslab": {"model__provider": "modelslab"},
    "openai-stream": {"model__stream": True},
    "anthropic-stream": {"model__provider": "anthropic", "model__stream": True},
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_20_percent_fault_mix_ends_with_every_row_correct(
    path: str, tmp_path: Path, simulator: RunningSimulator
) -> None:
    mix = dict(MIX)
    if path.endswith("stream"):
        mix["truncate_stream"] = 0.03
        mix["fail_500"] = 0.0
    simulator.configure(seed=11, **mix)
    data = reviews(ROWS)
    data.write_csv(tmp_path / "reviews.csv")
    base_url = {
        "anthropic": simulator.url,
        "modelslab": f"{simulator.url}/api/v7/llm",
    }.get(PATHS[path].get("model__provider", ""), simulator.base_url)
    job = make_job(
        tmp_path,
        simulator,
        model__base_url=base_url,
        limits__concurrency=64,
        limits__max_attempts=10,
        **PATHS[path],
    )

    result = run_cli("run", str(job), "--quiet", cwd=tmp_path, timeout=300)

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    faults = simulator.stats()["faults"]
    assert sum(faults.values()) >= ROWS * 0.15, faults
    out = pl.read_parquet(tmp_path / "out" / "result.parquet")
    assert out.height == ROWS and out["error"].null_count() == ROWS
    model = "x-ai-grok-3-mini"
    for text, response in zip(data["text"], out.sort("review_id")["response"], strict=True):
        assert response == expected_response(model, messages_for(text))
