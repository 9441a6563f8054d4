"""`pipeline report`: the real CLI on a real run, and the HTML opened in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from conftest import SIM_KEY, make_job, reviews, run_cli

from pipeline.simulator import RunningSimulator, SimulatorConfig

# Debian names it chromium, Ubuntu's snap and other distributions chromium-browser.
CHROMIUM = next(
    (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs headless Chromium on PATH (apt-get install -y chromium); .ci/run installs it",
)
CHARTS_WITH_LOG = 5  # throughput, in flight, errors over time, latency, tokens and cost
CHARTS_WITHOUT_LOG = 2  # latency, tokens and cost
NASTY = "<script>alert('x')</script> & <b>bold</b>"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, _shared_simulator: RunningSimulator) -> Path:
    """A finished run of 40 rows: two fail (a 400 with HTML in its text, a 500), one is retried.

    One run for the module: the tests only read it.
    """
    simulator = _shared_simulator
    simulator.configure(**SimulatorConfig(api_key=SIM_KEY, latency_ms=(5, 30)).model_dump())
    simulator.reset()
    workdir = tmp_path_factory.mktemp("report")
    data = reviews(40).with_columns(
        pl.when(pl.col("review_id") == "R002")
        .then(pl.lit(f"{NASTY} [[sim:status=400]]"))
        .when(pl.col("review_id") == "R005")
        .then(pl.lit("broken [[sim:status=500]]"))
        .when(pl.col("review_id") == "R007")
        .then(pl.lit("flaky [[sim:fail_first=1]]"))
        .otherwise(pl.col("text"))
        .alias("text")
    )
    data.write_csv(workdir / "reviews.csv")
    job = make_job(workdir, simulator, limits__max_attempts=2, limits__concurrency=4)
    result = run_cli("run", str(job), cwd=workdir)
    assert result.returncode == 1, result.stderr
    return workdir


def charts_in(page: str) -> list[str]:
    return re.findall(r"<svg\b[^>]*>", page)


def test_report_from_a_job_writes_one_self_contained_html(finished: Path) -> None:
    result = run_cli("report", "test-job.yaml", cwd=finished)

    assert result.returncode == 0, result.stderr
    path = finished / "out" / "result.report.html"
    assert f"wrote {Path('out') / 'result.report.html'} (5 charts)" in result.stdout
    page = path.read_text()
    assert len(charts_in(page)) == CHARTS_WITH_LOG
    # Nothing to fetch: one inline script, no stylesheets or images from anywhere else.
    assert len(re.findall(r"<script\b", page)) == 1 and "<script>" in page
    assert not re.search(r"<(link|iframe)\b|<script [^>]*src", page)
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    # The summary: rows by error class, retries and the other facts.
    for fact in ("bad_request", "server_error", "tokens cached", "latency p99", "429s"):
        assert fact in page
    assert re.search(r"<th>retries</th><td>2</td>", page), "R005 once, R007 once, R002 never"
    # Requests as the run counted them: 40 rows, R005 and R007 sent twice.
    assert "<th>requests sent</th><td>42</td>" in page
    # Sample rows: failing first, the row's text escaped, never interpreted.
    assert page.index("R002 · row 2") < page.index("R005 · row 5") < page.index("R000 · row 0")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;" in page
    assert "<script>alert" not in page
    # Who ran what: the header from the run log.
    for fact in (
        "<dt>model</dt><dd><code>x-ai-grok-3-mini</code>",
        "<dt>provider</dt><dd><code>openai</code>",
        "<dt>params</dt><dd><code>{&quot;max_tokens&quot;: 200}</code>",
        "<dt>prompt template</dt><dd><code>Summarize: {{ text }}</code>",
        "<dt>prompt system</dt><dd><code>You are terse.</code>",
    ):
        assert fact in page, fact
    assert re.search(r"<dt>command</dt><dd><code>pipeline run \S*test-job.yaml</code>", page)
    assert re.search(r"<dt>started</dt><dd><code>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", page)
    # The sample says why each row is in it: failures, the slowest, the most retried.
    for why in ("picked: failed", "picked: slowest", "picked: most retried"):
        assert why in page, why
    assert "R007 · row 7</b> · ok · picked: most retried" in page


def test_report_from_a_parquet_without_its_run_log_skips_the_time_charts(finished: Path) -> None:
    alone = finished / "copied"
    alone.mkdir(exist_ok=True)
    shutil.copy(finished / "out" / "result.parquet", alone / "results.parquet")

    result = run_cli("report", "copied/results.parquet", "--to", "elsewhere/r.html", cwd=finished)

    assert result.returncode == 0, result.stderr
    assert "events.jsonl" in result.stderr, "say why the time-series charts are missing"
    page = (finished / "elsewhere" / "r.html").read_text()
    assert len(charts_in(page)) == CHARTS_WITHOUT_LOG
    assert "No run log (events.jsonl)" in page
    assert "R002 · row 2" not in page, "a bare Parquet has no known id column in the report"
    assert "row 2" in page


def test_report_of_a_missing_file_is_an_argument_error(finished: Path) -> None:
    result = run_cli("report", "nothing.parquet", cwd=finished)

    assert result.returncode == 2
    assert "nothing.parquet" in result.stderr


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={cwd / 'chromium-profile'}",
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_chromium
def test_report_charts_render_in_a_browser(finished: Path, tmp_path: Path) -> None:
    made = run_cli("report", "test-job.yaml", "--to", str(tmp_path / "r.html"), cwd=finished)
    assert made.returncode == 0, made.stderr
    page = (tmp_path / "r.html").read_text()
    # Record each chart's laid-out size in the DOM, to read it back from --dump-dom.
    probe = (
        "<script>for (const s of document.querySelectorAll('figure svg')) {"
        "const r = s.getBoundingClientRect();"
        "s.setAttribute('data-drawn', Math.round(r.width) + 'x' + Math.round(r.height));}"
        "</script></body>"
    )
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe))

    dom = chromium(
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        (tmp_path / "probe.html").as_uri(),
        cwd=tmp_path,
    )

    assert dom.returncode == 0, dom.stderr
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # no script error, no failed load
    assert 'id="count">24 of 24 shown<' in dom.stdout or re.search(
        r'id="count">(\d+) of \1 shown<', dom.stdout
    ), "the filter script ran"
    svgs = charts_in(dom.stdout)
    assert len(svgs) == CHARTS_WITH_LOG
    for tag in svgs:
        width, height = (float(v) for v in re.findall(r'\b(?:width|height)="([\d.]+)pt"', tag))
        assert width > 0 and height > 0, tag
        drawn = re.search(r'data-drawn="(\d+)x(\d+)"', tag)
        assert drawn, tag
        assert int(drawn.group(1)) >= 500 and int(drawn.group(2)) >= 150, tag

    shot = tmp_path / "shot.png"
    taken = chromium(
        f"--screenshot={shot}",
        "--window-size=1200,3000",
        (tmp_path / "r.html").as_uri(),
        cwd=tmp_path,
    )

    assert taken.returncode == 0, taken.stderr
    assert shot.stat().st_size > 100_000
    from matplotlib.image import imread

    pixels = imread(shot)[:, :, :3]  # floats in [0, 1]
    ink = (pixels < 0.9).any(axis=2).mean()
    assert ink > 0.05, f"the page is almost blank ({ink:.1%} of pixels drawn)"
    bars = np.abs(pixels - np.array([0x3B, 0x6F, 0xB6]) / 255).max(axis=2) < 0.08
    assert bars.mean() > 0.01, "the charts' blue bars are not on the page"


@needs_chromium
def test_the_sample_filter_narrows_the_cards_in_a_browser(finished: Path, tmp_path: Path) -> None:
    made = run_cli("report", "test-job.yaml", "--to", str(tmp_path / "r.html"), cwd=finished)
    assert made.returncode == 0, made.stderr
    page = (tmp_path / "r.html").read_text()
    # Type into the filter as a person would, then record what is left visible.
    probe = (
        "<script>const box = document.getElementById('find'); box.value = 'R005';"
        "box.dispatchEvent(new Event('input'));"
        "document.body.dataset.visible = [...document.querySelectorAll('#sample .card')]"
        ".filter(c => !c.hidden).length;"
        "const s = document.getElementById('status'); box.value = ''; s.value = 'failed';"
        "s.dispatchEvent(new Event('change'));"
        "document.body.dataset.failed = [...document.querySelectorAll('#sample .card')]"
        ".filter(c => !c.hidden).length;</script></body>"
    )
    (tmp_path / "probe.html").write_text(page.replace("</body>", probe))

    dom = chromium(
        "--enable-logging=stderr",
        "--v=0",
        "--dump-dom",
        (tmp_path / "probe.html").as_uri(),
        cwd=tmp_path,
    )

    assert dom.returncode == 0, dom.stderr
    assert not [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert 'data-visible="1"' in dom.stdout
    assert 'data-failed="2"' in dom.stdout  # R002 and R005


@pytest.fixture(scope="module")
def classified(
    tmp_path_factory: pytest.TempPathFactory, _shared_simulator: RunningSimulator
) -> Path:
    """A finished schema job: a label enum and a confidence number per row."""
    simulator = _shared_simulator
    simulator.configure(**SimulatorConfig(api_key=SIM_KEY).model_dump())
    simulator.reset()
    workdir = tmp_path_factory.mktemp("classified")
    reviews(30).write_csv(workdir / "reviews.csv")
    schema = {"label": {"enum": ["positive", "negative", "neutral"]}, "confidence": "number"}
    job = make_job(workdir, simulator, output__schema=schema)
    result = run_cli("run", str(job), "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return workdir


def test_a_schema_jobs_report_counts_labels_and_draws_numbers(classified: Path) -> None:
    result = run_cli("report", "test-job.yaml", cwd=classified)
    assert result.returncode == 0, result.stderr
    page = (classified / "out" / "result.report.html").read_text()
    labels = pl.read_parquet(classified / "out" / "result.parquet")["label"].value_counts()

    assert len(charts_in(page)) == CHARTS_WITH_LOG - 1 + 2  # no errors chart; label, confidence
    assert "label: rows per value" in page and "confidence: distribution over rows" in page
    for label, count in labels.iter_rows():
        assert f"> {count:,}<" in page or f">{label}<" in page
    assert "<th>schema violations</th><td>0 (0.0% of rows)</td>" in page
    # One sample row per label, with the typed values shown rather than raw JSON.
    for label in labels["label"]:
        assert f"<b>label</b>{label}" in page
    # A label's row may have been picked for another reason first (the slowest, say).
    assert 1 <= page.count("picked: label") <= labels.height


def test_run_markers_that_would_overprint_share_one_label() -> None:
    from pipeline.report import run_labels

    marks = run_labels([0.0, 50.0, 51.0, 52.0, 90.0], span=100.0)

    assert marks == [(50.0, "runs 2-4"), (51.0, ""), (52.0, ""), (90.0, "run 5")]


def test_a_constant_distribution_is_stated_not_drawn() -> None:
    from matplotlib import rc_context

    from pipeline.report import _STYLE, _distribution_chart

    frame = pl.DataFrame(
        {
            "error": [None] * 5,
            "prompt_tokens": [10, 12, 14, 16, 18],
            "completion_tokens": [22] * 5,
            "reasoning_tokens": [0] * 5,
            "cost_usd": [0.5] * 5,
        },
        schema_overrides={"error": pl.String},
    )
    with rc_context(_STYLE):
        svg = _distribution_chart(frame)
    assert "every row: 22" in svg and "every row: 0" in svg and "every row: $0.500000" in svg
    assert "21.6" not in svg and "22.4" not in svg


def test_the_sample_header_counts_the_cards_shown(finished: Path) -> None:
    result = run_cli("report", "test-job.yaml", cwd=finished)
    assert result.returncode == 0, result.stderr
    page = (finished / "out" / "result.report.html").read_text()

    header = re.search(r'<p class="meta">(\d+) of 40 rows, picked', page)
    cards = len(re.findall(r'<div class="card', page))
    assert header and int(header.group(1)) == cards == 24


def test_no_legend_covers_its_title_and_every_percentile_line_is_inside_its_chart(
    finished: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import pipeline.report as report

    figures: list[Any] = []
    draw = report._svg
    monkeypatch.setattr(report, "_svg", lambda figure: figures.append(figure) or draw(figure))
    with report.locate(finished / "test-job.yaml") as target:
        report.write_report(target, tmp_path / "r.html")

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    legends = 0
    for figure in figures:
        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        renderer = canvas.get_renderer()
        for axes in figure.axes:
            legend = axes.get_legend()
            if legend is None:
                continue
            legends += 1
            title = axes.title if axes.get_title() else axes._left_title
            title_box = title.get_window_extent(renderer)
            legend_box = legend.get_window_extent(renderer)
            assert not title_box.overlaps(legend_box), title.get_text()
            assert legend_box.y1 <= figure.bbox.y1 and title_box.y1 <= figure.bbox.y1, "clipped"
            for line in axes.get_lines():
                xs = line.get_xdata()
                if line.get_label().startswith("p") and len(set(xs)) == 1:  # p50/p95/p99
                    assert xs[0] < axes.get_xlim()[1], f"{line.get_label()} on the edge"
    assert legends >= 3  # throughput, errors by class, latency
