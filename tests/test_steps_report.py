"""`pipeline report job.yaml` for a job with steps: the real CLI on real runs against
the simulator, and the figures on the page checked against the outputs' own columns."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import run_cli
from test_steps import COMPLAINT, outputs, per_label, sentiment, steps_job, write_reviews

from pipeline.simulator import RunningSimulator


def step_row(page: str, step: str) -> str:
    """The summary table's row of one step."""
    found = re.search(rf'<tr data-step="{step}">(.*?)</tr>', page)
    assert found, f"no row for step {step}"
    return found.group(1)


def cost_in(row: str) -> str:
    found = re.search(r'<td class="cost">(\$[\d,.]+)', row)
    assert found, row
    return found.group(1)


def test_the_report_of_a_steps_job_has_each_steps_cost_and_section(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 30
    write_reviews(tmp_path, rows)
    # The token budget splits the groups, so a combining step runs too.
    split = {**per_label(), "reduce": {"by": "label", "max_prompt_tokens": 400}}
    job = steps_job(tmp_path, simulator, [sentiment(), COMPLAINT, split])
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 0

    made = run_cli("report", str(job), cwd=tmp_path)

    assert made.returncode == 0, made.stderr
    page = (tmp_path / "out" / "result.report.html").read_text()
    final, reduced = outputs(tmp_path)
    costs = {
        "sentiment": float(final.get_column("sentiment_cost_usd").sum()),
        "complaint": float(final.get_column("complaint_cost_usd").sum()),
        "per_label": float(reduced.get_column("cost_usd").sum()),
    }
    for step, cost in costs.items():
        assert cost_in(step_row(page, step)) == f"${cost:,.6f}", step
    total = re.search(r'<tr class="total">.*?<td class="cost">(\$[\d,.]+)</td>', page)
    assert total and total.group(1) == f"${sum(costs.values()):,.6f}"
    assert "(counted in per_label)" in step_row(page, "per_label_combine")
    # rows covered and left out by `when`, each step's own
    negative = int((final.get_column("sentiment_label") == "negative").sum())
    assert f"<td>{negative:,} row(s)</td><td>{rows - negative:,}</td>" in step_row(
        page, "complaint"
    )
    assert "<td>reduce by label</td>" in step_row(page, "per_label")
    # a section per step, in order, each with the single-run report's parts
    headings = re.findall(r'<h2 class="step" id="step-(\w+)">', page)
    assert headings == ["sentiment", "complaint", "per_label", "per_label_combine"]
    assert page.count("<h3>Summary</h3>") == page.count("<h3>Sample rows</h3>") == 4
    assert "label: rows per value" in page, "the sentiment step's schema is charted"
    assert "Completions per second" in page, "the time series come from each step's run log"
    for step in headings:
        assert f'id="{step}-sample"' in page and f'id="{step}-find"' in page
    assert f"const samples = {json.dumps([f'{s}-' for s in headings])};" in page


def test_a_stopped_steps_run_reports_what_exists(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    rows = 40
    write_reviews(tmp_path, rows)
    # The first step alone costs about $0.0008 here: the budget stops it inside.
    job = steps_job(
        tmp_path, simulator, [sentiment(), COMPLAINT, per_label()], limits__max_cost_usd=0.0003
    )
    assert run_cli("run", str(job), "--quiet", cwd=tmp_path).returncode == 3

    made = run_cli("report", str(job), "--to", "stopped.html", cwd=tmp_path)

    assert made.returncode == 0, made.stderr
    page = (tmp_path / "stopped.html").read_text()
    assert re.search(rf"<td>unfinished: \d+ of {rows} finished</td>", step_row(page, "sentiment"))
    for step in ("complaint", "per_label"):
        assert "<td>not started</td>" in step_row(page, step)
        assert f"{step}: not started" in page and f"step {step}: not started" in made.stderr
    # the stopped step's section shows the rows its checkpoint finished
    assert 'id="step-sentiment"' in page and "The output is not written yet" in page
    assert not (tmp_path / "out" / "result.parquet").exists()
    assert not (tmp_path / "out" / "result.report.html").exists(), "--to says where"


def test_the_report_of_a_run_made_with_output_reads_that_runs_records(
    tmp_path: Path, simulator: RunningSimulator
) -> None:
    write_reviews(tmp_path, 20)
    job = steps_job(tmp_path, simulator, [sentiment(), per_label()])
    elsewhere = tmp_path / "elsewhere" / "trial.parquet"
    assert (
        run_cli("run", str(job), "--quiet", "--output", str(elsewhere), cwd=tmp_path).returncode
        == 0
    )

    made = run_cli("report", str(job), "--output", str(elsewhere), cwd=tmp_path)

    assert made.returncode == 0, made.stderr
    page = (tmp_path / "elsewhere" / "trial.report.html").read_text()
    assert "not started" not in step_row(page, "sentiment")
    assert "<td>20 row(s)</td>" in step_row(page, "sentiment")
    assert not (tmp_path / "out").exists(), "the job's own output.path was never written"
