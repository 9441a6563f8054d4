"""`pipeline report`: one self-contained HTML file about a run, readable offline.

Everything comes from two files the run leaves behind: the output Parquet (one row
per input row, with tokens, cost, latency, attempts and error) and the run log
`<output>.run/events.jsonl` (one line per request attempt). The log gives the time
series (throughput, requests in flight, errors over time); without it the report
still has the summary, the distributions and the sample rows, and says what is
missing. Charts are drawn with matplotlib's object API (no pyplot, no GUI backend)
and inlined as SVG, so the file needs no network and no other file.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.columns import RESULT_NAMES
from pipeline.job import ResolvedJob, RunDir
from pipeline.output import scan_output
from pipeline.runlog import read_events

SAMPLE_ROWS = 24
CELL_CHARS = 3000
MAX_RESULT_CHARTS = 6  # charts of schema properties
MAX_CATEGORIES = 30  # a text property with more distinct values is not charted
MAX_TIME_BINS = 120
_ERROR_CLASS = r"(?s)( \(|:).*$"  # the class is the text before the first " (" or ":"


@dataclass(frozen=True)
class Target:
    """Where a run's results are, and what the job says about them when it is known."""

    name: str
    output_path: Path  # the job's output: the report is written beside it
    log_path: Path | None
    id_column: str | None
    prompt_columns: tuple[str, ...] | None = None
    concurrency: int | None = None
    partial_of: int | None = None  # rows in the job when output_path is a partial export
    from_job: bool = False  # found through a job YAML (else a bare .parquet)
    results: Path | None = None  # the Parquet to read, when not output_path (a partial export)

    @property
    def source(self) -> Path:
        return self.results or self.output_path

    @property
    def default_report(self) -> Path:
        return report_beside(self.output_path)


def report_beside(output: Path) -> Path:
    """Where a report is written by default: `out/x.parquet` -> `out/x.report.html`."""
    return output.with_name(f"{output.stem}.report.html")


@contextmanager
def locate(target: Path, output: Path | None = None) -> Iterator[Target]:
    """Resolve a job YAML (whose run wrote `output`, for a `run --output` run) or a
    results .parquet to its output and run log.

    A job whose output is not written yet (still running, or stopped) is read from
    a partial export of its checkpoint, made in a temporary folder.
    """
    if target.suffix.lower() == ".parquet":
        if not target.is_file():
            raise FileNotFoundError(f"{target} does not exist")
        beside = RunDir.beside(target).log
        yield Target(target.stem, target, beside if beside.exists() else None, None)
        return
    from pipeline.resolve import resolve_job

    with locate_job(resolve_job(target, output=output, read_key=False)) as found:
        yield found


@contextmanager
def locate_job(job: ResolvedJob, name: str | None = None) -> Iterator[Target]:
    """A resolved job's output and run log (a partial export while it is unfinished);
    `name` heads the report instead of the job's."""
    from pipeline.results import export_partial

    log = job.log_path if job.log_path.exists() else None
    found = Target(
        name or job.spec.name,
        job.output_path,
        log,
        job.spec.input.id_column,
        job.renderer.variables,
        job.spec.limits.concurrency,
        from_job=True,
    )
    if job.output_path.exists():
        yield found
        return
    with tempfile.TemporaryDirectory(prefix="pipeline-report-") as folder:
        partial = Path(folder) / job.output_path.name
        export_partial(job, partial)
        yield dataclasses.replace(found, results=partial, partial_of=job.rows)


def input_columns(frame: pl.DataFrame) -> list[str]:
    """The input's columns: they come first, before the output columns."""
    first = next((i for i, c in enumerate(frame.columns) if c in RESULT_NAMES), None)
    columns = frame.columns if first is None else frame.columns[:first]
    return [c for c in columns if c not in RESULT_NAMES]


def result_columns(frame: pl.DataFrame) -> list[str]:
    """Columns made from the answer beyond the fixed ones: schema properties, tool calls."""
    inputs = set(input_columns(frame))
    return [c for c in frame.columns if c not in RESULT_NAMES and c not in inputs]


def error_classes(errors: pl.Series) -> list[tuple[str, int]]:
    """(class, rows) for the failing rows, most frequent first."""
    classes = errors.drop_nulls().str.replace(_ERROR_CLASS, "").str.strip_chars()
    counts = classes.value_counts(sort=True, name="rows")
    return [(str(c), int(n)) for c, n in counts.iter_rows()]


def _sum(frame: pl.DataFrame, column: str) -> int:
    return int(frame.get_column(column).sum() or 0) if column in frame.columns else 0


@dataclass
class OutputStats:
    """What the output Parquet says about a run, independent of any log."""

    rows: int
    failed: list[tuple[str, int]]
    prompt_tokens: int
    output_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    cost_usd: float | None
    latency: dict[str, float]  # p50, p95, p99 of the final attempts, when any
    attempts: int
    retries: int
    finish_reasons: list[tuple[str, int]]
    typed: bool = False  # the output has typed answer columns (an output.schema job)

    @property
    def failed_rows(self) -> int:
        return sum(n for _, n in self.failed)

    @classmethod
    def of(cls, frame: pl.DataFrame) -> OutputStats:
        latency = frame.get_column("latency_s").drop_nulls()
        quantiles = (
            {
                f"p{q}": float(latency.quantile(q / 100, interpolation="linear") or 0.0)
                for q in (50, 95, 99)
            }
            if latency.len()
            else {}
        )
        cost = frame.get_column("cost_usd")
        attempts = frame.get_column("attempts").drop_nulls()
        finish = frame.get_column("finish_reason").drop_nulls().value_counts(sort=True)
        return cls(
            rows=frame.height,
            failed=error_classes(frame.get_column("error")),
            prompt_tokens=_sum(frame, "prompt_tokens"),
            output_tokens=_sum(frame, "completion_tokens"),
            reasoning_tokens=_sum(frame, "reasoning_tokens"),
            cached_tokens=_sum(frame, "cached_tokens"),
            cost_usd=None if cost.null_count() == cost.len() else float(cost.sum()),
            latency=quantiles,
            attempts=int(attempts.sum() or 0),
            retries=int((attempts - 1).clip(lower_bound=0).sum() or 0),
            finish_reasons=[(str(r), int(n)) for r, n in finish.iter_rows()],
            typed=any(c != "tool_calls" for c in result_columns(frame)),
        )

    @classmethod
    def read(cls, path: Path) -> OutputStats:
        """The same figures as `of`, aggregated while streaming: a million-row output
        is summarised without holding its columns in memory."""
        scan = scan_output(path)
        latency = pl.col("latency_s")
        totals = (
            scan.select(
                pl.len().alias("rows"),
                *[
                    pl.col(c).sum().alias(c)
                    for c in ("prompt_tokens", "completion_tokens", "reasoning_tokens")
                ],
                pl.col("cached_tokens").sum().alias("cached_tokens"),
                pl.col("cost_usd").sum().alias("cost"),
                pl.col("cost_usd").null_count().alias("cost_nulls"),
                pl.col("attempts").sum().alias("attempts"),
                (pl.col("attempts") - 1).clip(lower_bound=0).sum().alias("retries"),
                latency.count().alias("latencies"),
                *[
                    latency.quantile(q / 100, interpolation="linear").alias(f"p{q}")
                    for q in (50, 95, 99)
                ],
            )
            .collect(engine="streaming")
            .row(0, named=True)
        )
        errors = scan.select("error").drop_nulls().collect(engine="streaming").get_column("error")
        finish = (
            scan.select("finish_reason")
            .drop_nulls()
            .group_by("finish_reason")
            .len()
            .sort("len", descending=True)
            .collect(engine="streaming")
        )
        rows = int(totals["rows"])
        return cls(
            rows=rows,
            failed=error_classes(errors),
            prompt_tokens=int(totals["prompt_tokens"] or 0),
            output_tokens=int(totals["completion_tokens"] or 0),
            reasoning_tokens=int(totals["reasoning_tokens"] or 0),
            cached_tokens=int(totals["cached_tokens"] or 0),
            cost_usd=None if totals["cost_nulls"] == rows else float(totals["cost"] or 0.0),
            latency=(
                {f"p{q}": float(totals[f"p{q}"] or 0.0) for q in (50, 95, 99)}
                if totals["latencies"]
                else {}
            ),
            attempts=int(totals["attempts"] or 0),
            retries=int(totals["retries"] or 0),
            finish_reasons=[(str(r), int(n)) for r, n in finish.iter_rows()],
        )


@dataclass
class Timeline:
    """Attempts from the run log on one time axis: runs laid end to end, gaps removed."""

    end: np.ndarray  # seconds since the first run started (gaps between runs removed)
    outcome: np.ndarray
    status: np.ndarray
    flying: np.ndarray  # requests in flight as each attempt ended (itself included)
    run_starts: list[float]  # where each run begins on the axis
    duration: float  # sum of the runs' wall times

    @classmethod
    def from_events(cls, events: list[dict[str, Any]]) -> Timeline | None:
        attempts = [e for e in events if e.get("event") == "attempt"]
        if not attempts:
            return None
        t = np.array([float(e["t"]) for e in attempts])
        latency = np.array([float(e.get("latency_s") or 0.0) for e in attempts])
        starts = sorted(float(e["t"]) for e in events if e.get("event") == "run_started")
        stops = sorted(
            float(e["t"]) for e in events if e.get("event") in ("run_sent_all", "run_stopped")
        )
        if not starts or starts[0] > float((t - latency).min()):
            starts.insert(0, float((t - latency).min()))
        run = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, None)
        offsets, position = [], 0.0
        for k, begin in enumerate(starts):
            offsets.append(position)
            upto = starts[k + 1] if k + 1 < len(starts) else np.inf
            ends = [s for s in stops if begin <= s < upto]
            mine = t[run == k]
            if mine.size:
                ends.append(float(mine.max()))
            position += max(ends, default=begin) - begin  # a killed run ends at its last attempt
        shift = np.array(offsets)[run] - np.array(starts)[run]
        return cls(
            end=t + shift,
            outcome=np.array([str(e.get("outcome")) for e in attempts]),
            status=np.array([e.get("status") or 0 for e in attempts]),
            # Logged after the attempt gave its slot back: the others in flight, so add it.
            flying=np.array([float(e.get("in_flight") or 0) + 1 for e in attempts]),
            run_starts=offsets,
            duration=position,
        )

    def bins(self) -> tuple[np.ndarray, float]:
        span = max(float(self.end.max()), 1e-3)
        for width in (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600):
            if span / width <= MAX_TIME_BINS:
                break
        else:
            width = span / MAX_TIME_BINS
        return np.arange(0.0, span + width, width), float(width)

    def in_flight(self) -> tuple[np.ndarray, np.ndarray]:
        """The run's own count of requests in flight, highest per time bin.

        Each attempt logs the count as it ends; a bin without an attempt keeps the
        last count before it. (Start and end times are not used: the start comes
        from the event loop's clock, which can lag a little under load, so requests
        would seem to overlap the ones before them.)
        """
        edges, _ = self.bins()
        index = np.clip(np.searchsorted(edges, self.end, side="right") - 1, 0, len(edges) - 2)
        highest = np.full(len(edges) - 1, -1.0)
        np.maximum.at(highest, index, self.flying)
        seen = np.where(highest >= 0, np.arange(highest.size), 0)
        filled = highest[np.maximum.accumulate(seen)]
        return edges, np.clip(filled, 0, None)


@dataclass
class RunInfo:
    """Who ran what, from the run log's start lines: the report's header."""

    runs: int
    started: float
    ended: float | None
    provider: str | None
    model: str | None
    params: dict[str, Any] | None
    prompt: dict[str, Any] | None
    commands: list[str]
    requests_sent: int | None = None  # HTTP requests the runs sent, as they counted them
    # Limits per minute the server's headers taught the pacer (last value per dimension).
    learned_limits: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_events(cls, events: list[dict[str, Any]]) -> RunInfo | None:
        starts = [e for e in events if e.get("event") == "run_started"]
        if not starts:
            return None
        ends = [e for e in events if e.get("event") in ("run_sent_all", "run_stopped")]
        last = starts[-1]
        commands = [str(e["command"]) for e in starts if e.get("command")]
        return cls(
            runs=len(starts),
            started=float(starts[0]["t"]),
            ended=float(ends[-1]["t"]) if ends else None,
            provider=last.get("provider"),
            model=last.get("model"),
            params=last.get("params"),
            prompt=last.get("prompt"),
            commands=list(dict.fromkeys(commands)),  # each distinct command once, in order
            requests_sent=sum(int(e["requests_sent"]) for e in ends if "requests_sent" in e)
            if any("requests_sent" in e for e in ends)
            else None,
            learned_limits={
                str(e["dimension"]): float(e["per_minute"])
                for e in events
                if e.get("event") == "limit_learned" and "per_minute" in e
            },
        )


# ---- charts --------------------------------------------------------------------------

_STYLE: Any = {  # rcParams; matplotlib types the keys as a Literal of every name
    "svg.fonttype": "none",  # real text in the SVG, drawn by the browser
    "svg.hashsalt": "pipeline-report",  # stable ids: the same run gives the same file
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e5e5e5",
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
}
_BLUE, _RED, _GREY = "#3b6fb6", "#c8453c", "#888888"


def _svg(figure: Any) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog: the SVG goes inline


def _figure(
    width: float = 7.0, height: float = 2.8, *, aligned: bool = False, **subplots: Any
) -> tuple[Any, Any]:
    """A figure; `aligned` ones share fixed margins, so stacked time axes line up."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(width, height), layout=None if aligned else "constrained")
    if aligned:
        figure.subplots_adjust(left=0.09, right=0.98, bottom=0.17, top=0.84)
    axes = figure.subplots(**subplots)
    for one in np.atleast_1d(axes).flat:
        one.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of rows or attempts
    return figure, axes


def _time_axis(axes: Any, timeline: Timeline) -> None:
    """The same x range on every time chart, and each later run marked once, legibly."""
    edges, _ = timeline.bins()
    axes.set_xlim(0, edges[-1])
    axes.set_xlabel(
        "seconds since the run started"
        + (", runs end to end" if len(timeline.run_starts) > 1 else "")
    )
    for start, label in run_labels(timeline.run_starts, float(edges[-1])):
        axes.axvline(start, color=_GREY, linestyle="--", linewidth=0.8)
        if label:
            axes.annotate(
                label,
                (start, 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -10),
                textcoords="offset points",
                color=_GREY,
                fontsize=8,
            )


def run_labels(starts: list[float], span: float, room: float = 0.08) -> list[tuple[float, str]]:
    """(where, label) for each run after the first. Runs closer than `room` of the axis
    to a labelled one share its label ("runs 2-4") instead of printing over it."""
    later = list(enumerate(starts[1:], start=2))
    labels = [""] * len(later)
    i = 0
    while i < len(later):
        j = i
        while j + 1 < len(later) and later[j + 1][1] - later[i][1] < room * span:
            j += 1
        first, last = later[i][0], later[j][0]
        labels[i] = f"run {first}" if i == j else f"runs {first}-{last}"
        i = j + 1
    return [(start, label) for (_, start), label in zip(later, labels, strict=True)]


LEGEND_ROW_PT = 13.0  # one row of the 8 pt legend
TITLE_ROOM_PT = 8.0 + 11.0 + 6.0  # the title's pad, its 11 pt line, a margin above it


def _legend(axes: Any, columns: int) -> None:
    """Legend above the plot, under the title (set it first), clear of both the data and
    the title: a long title and a legend of several classes never share a line."""
    handles, _ = axes.get_legend_handles_labels()
    rows = max(1, math.ceil(len(handles) / columns))
    axes.legend(
        loc="lower left",
        bbox_to_anchor=(0, 1),
        ncols=columns,
        frameon=False,
        fontsize=8,
        borderaxespad=0.2,
    )
    legend_pt = rows * LEGEND_ROW_PT
    axes.set_title(axes.get_title(loc="left"), loc="left", pad=8.0 + legend_pt)
    figure = axes.get_figure()
    if figure.get_layout_engine() is None:  # fixed margins: make room above the plot
        height_pt = figure.get_figheight() * 72
        top = 1 - (legend_pt + TITLE_ROOM_PT) / height_pt
        figure.subplots_adjust(top=min(figure.subplotpars.top, top))


def _throughput_chart(timeline: Timeline) -> str:
    edges, width = timeline.bins()
    ok, _ = np.histogram(timeline.end[timeline.outcome == "ok"], edges)
    every, _ = np.histogram(timeline.end, edges)
    figure, axes = _figure(aligned=True)
    axes.stairs(ok / width, edges, fill=True, color=_BLUE, alpha=0.85, label="completions")
    if (every != ok).any():
        axes.stairs(every / width, edges, color=_RED, linewidth=0.8, label="all attempts")
    axes.set_title(f"Completions per second ({width:g} s bins)")
    axes.set_ylabel("per second")
    _legend(axes, 2)
    _time_axis(axes, timeline)
    return _svg(figure)


def _in_flight_chart(timeline: Timeline, cap: int | None) -> str:
    edges, flying = timeline.in_flight()
    figure, axes = _figure(aligned=True)
    axes.stairs(flying, edges, fill=True, color=_BLUE, alpha=0.85)
    axes.set_title(f"HTTP requests in flight (highest per {edges[1] - edges[0]:g} s)")
    if cap:
        axes.axhline(cap, color=_RED, linestyle="--", linewidth=1, label=f"concurrency cap {cap}")
        _legend(axes, 1)
    axes.set_ylim(0, max(int(flying.max()), cap or 0, 1) * 1.15)
    axes.set_ylabel("requests")
    _time_axis(axes, timeline)
    return _svg(figure)


_CLASS_COLOURS = ("#c8453c", "#e08a2c", "#8a5ab5", "#2c9a8a", "#b5a22c", "#5a6f8a", _GREY)


def _errors_chart(timeline: Timeline) -> str:
    edges, width = timeline.bins()
    failed = timeline.outcome != "ok"
    kinds, counts = np.unique(timeline.outcome[failed], return_counts=True)
    order = [str(k) for k in kinds[np.argsort(-counts, kind="stable")]]
    figure, axes = _figure(aligned=True)
    bottom = np.zeros(len(edges) - 1)
    for k, kind in enumerate(order):
        hits, _ = np.histogram(timeline.end[failed & (timeline.outcome == kind)], edges)
        colour = _CLASS_COLOURS[min(k, len(_CLASS_COLOURS) - 1)]
        label = f"{kind} ({hits.sum():,})"
        axes.stairs(bottom + hits, edges, baseline=bottom, fill=True, color=colour, label=label)
        bottom = bottom + hits
    axes.set_title(f"Failed attempts by class ({width:g} s bins)")
    axes.set_ylabel("attempts")
    axes.set_ylim(0, max(float(bottom.max()), 1) * 1.1)
    _legend(axes, min(len(order), 3))
    _time_axis(axes, timeline)
    return _svg(figure)


def _edges(values: np.ndarray, upper: float | None = None, bins: int = 40) -> np.ndarray:
    """Histogram edges: one bin per integer for small integer ranges, else `bins` bins."""
    low, high = float(values.min()), float(upper if upper is not None else values.max())
    if np.issubdtype(values.dtype, np.integer) and high - low < bins:
        return np.arange(low - 0.5, high + 1.5)
    if high <= low:
        return np.array([low - 0.5, low + 0.5]) if low else np.array([0.0, 1.0])
    return np.linspace(low, high, bins + 1)


def _latency_chart(frame: pl.DataFrame, stats: OutputStats) -> str:
    ok = frame.filter(pl.col("error").is_null())["latency_s"].drop_nulls().to_numpy()
    bad = frame.filter(pl.col("error").is_not_null())["latency_s"].drop_nulls().to_numpy()
    values = np.concatenate([ok, bad])
    top = float(values.max())
    p99 = stats.latency.get("p99", top)
    clipped = top > 3 * p99 > 0
    upper = p99 * 1.5 if clipped else top
    edges = _edges(np.append(values, 0.0), upper)
    ok_hits, _ = np.histogram(np.minimum(ok, upper), edges)
    bad_hits, _ = np.histogram(np.minimum(bad, upper), edges)
    figure, axes = _figure()
    axes.stairs(ok_hits, edges, fill=True, color=_BLUE, label="ok")
    if bad.size:
        axes.stairs(
            ok_hits + bad_hits, edges, baseline=ok_hits, fill=True, color=_RED, label="failed"
        )
    for (name, value), style in zip(stats.latency.items(), (":", "--", "-."), strict=False):
        axes.axvline(
            value, color="#333333", linestyle=style, linewidth=1, label=f"{name} {value:.2f}s"
        )
    note = f"; slower rows (up to {top:.1f} s) in the last bin" if clipped else ""
    axes.set_title(f"Latency of each row's final attempt{note}")
    axes.set_xlabel("seconds")
    axes.set_ylabel("rows")
    # A percentile at the slowest row sits on the last edge: leave room so its line shows.
    axes.set_xlim(0, max([float(edges[-1]), *stats.latency.values()]) * 1.03)
    _legend(axes, 3)
    return _svg(figure)


def _dollars(low: float, high: float) -> Any:
    """Tick labels in dollars with just enough decimals to tell three ticks apart."""
    from matplotlib.ticker import StrMethodFormatter

    step = (high - low) / 3 or high or 1.0
    digits = min(max(2, 1 - int(np.floor(np.log10(step)))), 9)
    return StrMethodFormatter(f"${{x:.{digits}f}}")


def _distribution_chart(frame: pl.DataFrame) -> str:
    from matplotlib.ticker import MaxNLocator

    ok = frame.filter(pl.col("error").is_null())
    panels = [
        ("prompt_tokens", "Prompt tokens per row", _BLUE),
        ("completion_tokens", "Output tokens per row", _BLUE),
        ("reasoning_tokens", "Reasoning tokens per row", _BLUE),
        ("cost_usd", "Cost per row", "#2c9a8a"),
    ]
    figure, grid = _figure(7.0, 4.4, nrows=2, ncols=2)
    for axes, (column, title, colour) in zip(grid.flat, panels, strict=True):
        values = ok[column].drop_nulls().to_numpy()
        axes.set_title(title)
        if values.size == 0 or values.min() == values.max():
            said = "no data" if values.size == 0 else f"every row: {_number(values[0], column)}"
            _say(axes, said)
            continue
        edges = _edges(values, bins=30)
        axes.stairs(np.histogram(values, edges)[0], edges, fill=True, color=colour)
        axes.set_ylabel("rows")
        if column == "cost_usd":
            axes.xaxis.set_major_locator(MaxNLocator(3))
            if float(values.max()) < 0.01:
                # Per-row costs are often tiny: millionths of a dollar read better.
                from matplotlib.ticker import FuncFormatter

                axes.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v * 1e6:.3g}"))
                axes.set_xlabel("millionths of a dollar (µ$)")
            else:
                axes.xaxis.set_major_formatter(_dollars(float(values.min()), float(values.max())))
    return _svg(figure)


def _say(axes: Any, text: str) -> None:
    """A panel that states its one value instead of drawing a one-bar histogram."""
    axes.text(0.5, 0.5, text, ha="center", va="center", transform=axes.transAxes, fontsize=12)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.grid(False)


def _number(value: Any, column: str = "") -> str:
    if column == "cost_usd":
        return f"${float(value):.6f}"
    return f"{value:,}" if isinstance(value, (int, np.integer)) else f"{float(value):,.4g}"


def result_charts(frame: pl.DataFrame) -> list[str]:
    """For typed answer columns (output.schema): counts per value, or a histogram."""
    charts = []
    for column in [c for c in result_columns(frame) if c != "tool_calls"][:MAX_RESULT_CHARTS]:
        series = frame.get_column(column)
        if series.dtype in (pl.Categorical, pl.Enum, pl.String, pl.Boolean):
            counts = series.cast(pl.String).fill_null("(no value)").value_counts(sort=True)
            if 0 < counts.height <= MAX_CATEGORIES:
                charts.append(_counts_chart(column, counts))
        elif series.dtype.is_numeric():
            charts.append(_numeric_chart(column, series.drop_nulls().to_numpy()))
    return charts


def _counts_chart(column: str, counts: pl.DataFrame) -> str:
    names = [str(v) for v in counts.get_column(column)][::-1]
    values = counts.get_column("count").to_numpy()[::-1]
    figure, axes = _figure(7.0, 0.8 + 0.28 * len(names))
    axes.barh(names, values, color=_BLUE)
    for y, value in enumerate(values):
        axes.annotate(f" {value:,}", (value, y), va="center", fontsize=8)
    axes.set_title(f"{column}: rows per value")
    axes.set_xlabel("rows")
    axes.xaxis.set_major_locator(_integer_ticks())
    axes.grid(axis="y", visible=False)
    axes.set_xlim(0, float(values.max()) * 1.12)
    return _svg(figure)


def _numeric_chart(column: str, values: np.ndarray) -> str:
    figure, axes = _figure(7.0, 2.4)
    axes.set_title(f"{column}: distribution over rows")
    if values.size == 0 or values.min() == values.max():
        _say(axes, "no values" if values.size == 0 else f"every row: {_number(values[0])}")
        return _svg(figure)
    edges = _edges(values, bins=30)
    axes.stairs(np.histogram(values, edges)[0], edges, fill=True, color=_BLUE)
    axes.set_xlabel(column)
    axes.set_ylabel("rows")
    return _svg(figure)


def _integer_ticks() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


# ---- the page ------------------------------------------------------------------------


@dataclass
class Report:
    path: Path
    charts: int
    notes: list[str] = field(default_factory=list)


@dataclass
class RunView:
    """One run read and charted: its results, its log and what is missing from them.
    A report shows one; a multi-step job's report shows one per step."""

    target: Target
    frame: pl.DataFrame
    stats: OutputStats
    timeline: Timeline | None
    run: RunInfo | None
    charts: list[str]
    notes: list[str]


def write_report(target: Target, destination: Path) -> Report:
    view = view_run(target)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(_page(view), encoding="utf-8")
    return Report(destination, len(view.charts), view.notes)


def view_run(target: Target) -> RunView:
    from matplotlib import rc_context

    frame = pl.read_parquet(target.source)
    stats = OutputStats.of(frame)
    events = read_events(target.log_path) if target.log_path else []
    timeline = Timeline.from_events(events)
    run = RunInfo.from_events(events)
    notes: list[str] = []
    if target.partial_of is not None:
        notes.append(
            f"The output is not written yet: this report shows the {frame.height} of "
            f"{target.partial_of} rows finished so far."
        )
    charts: list[str] = []
    with rc_context(_STYLE):
        if timeline is None:
            notes.append(
                "No run log (events.jsonl) was found beside the output, so the charts over "
                "time (throughput, requests in flight, errors) are left out."
            )
        else:
            charts += [_throughput_chart(timeline), _in_flight_chart(timeline, target.concurrency)]
            if (timeline.outcome != "ok").any():
                charts.append(_errors_chart(timeline))
            else:
                notes.append("No attempt failed, so there is no chart of errors over time.")
        if frame.height:
            charts += result_charts(frame)
            charts += [_latency_chart(frame, stats), _distribution_chart(frame)]
    return RunView(target, frame, stats, timeline, run, charts, notes)


def summary_rows(
    stats: OutputStats, timeline: Timeline | None, run: RunInfo | None = None
) -> list[tuple[str, str]]:
    ok = stats.rows - stats.failed_rows
    rows = [("rows", f"{stats.rows:,}"), ("ok", f"{ok:,}")]
    rows.append(("failed", f"{stats.failed_rows:,}"))
    rows += [(f"failed: {kind}", f"{n:,}") for kind, n in stats.failed]
    rows += [
        ("tokens in", f"{stats.prompt_tokens:,}"),
        ("tokens out", f"{stats.output_tokens:,}"),
        ("tokens reasoning", f"{stats.reasoning_tokens:,}"),
        ("tokens cached", f"{stats.cached_tokens:,}"),
        ("cost", "not priced" if stats.cost_usd is None else f"${stats.cost_usd:,.6f}"),
    ]
    if timeline is not None:
        runs = len(timeline.run_starts)
        rows.append(
            ("wall time", f"{timeline.duration:,.1f} s" + (f" ({runs} runs)" if runs > 1 else ""))
        )
        if timeline.duration > 0:
            rate = int((timeline.outcome == "ok").sum()) / timeline.duration
            rows.append(("throughput", f"{rate:,.1f} completions/s"))
    else:
        rows.append(("wall time", "unknown (no run log)"))
    rows += [(f"latency {k}", f"{v:.3f} s") for k, v in stats.latency.items()]
    if timeline is not None:
        rows.append(("429s", f"{int((timeline.status == 429).sum()):,}"))
        rows.append(("attempts logged", f"{timeline.end.size:,}"))
    if run is not None and run.requests_sent is not None:
        rows.append(("requests sent", f"{run.requests_sent:,}"))
    if run is not None:
        rows += [
            (f"limit learned: {dimension}", f"{per_minute:,.0f} a minute (server's headers)")
            for dimension, per_minute in run.learned_limits.items()
        ]
    rows.append(("retries", f"{stats.retries:,}"))
    rows.append(
        ("finish reasons", ", ".join(f"{r} {n:,}" for r, n in stats.finish_reasons) or "none")
    )
    violations = dict(stats.failed).get("schema_violation")
    if stats.typed:
        rate = (violations or 0) / stats.rows if stats.rows else 0.0
        rows.append(("schema violations", f"{violations or 0:,} ({rate:.1%} of rows)"))
    return rows


def _sample(frame: pl.DataFrame, limit: int = SAMPLE_ROWS) -> pl.DataFrame:
    """Rows worth reading, each with why it was picked (column `_why`): failures, the
    slowest, the most retried, empty inputs, one per value of each category, then rows
    spread over the output."""
    numbered = frame.with_row_index("_row")
    ok = numbered.filter(pl.col("error").is_null())
    # A list or struct (a reduce step's `rows`) has no text to be blank; it is not cast.
    inputs = [c for c in input_columns(frame) if not frame.schema[c].is_nested()]
    blank = pl.any_horizontal(
        [pl.col(c).cast(pl.String).str.strip_chars().fill_null("") == "" for c in inputs]
        or [pl.lit(False)]
    )
    picks: list[tuple[str, pl.DataFrame]] = [
        ("failed", numbered.filter(pl.col("error").is_not_null()).head(limit // 3)),
        ("slowest", ok.drop_nulls("latency_s").sort("latency_s", descending=True).head(2)),
        ("most retried", numbered.filter(pl.col("attempts") > 1).sort("attempts").tail(2)),
        ("empty input", numbered.filter(blank | (pl.col("finish_reason") == "skipped")).head(2)),
    ]
    chosen: dict[int, str] = {}
    for why, rows in picks:
        _choose(chosen, why, rows, limit)
    for column in result_columns(frame):
        series = frame.get_column(column)
        if series.dtype in (pl.Categorical, pl.Enum, pl.Boolean) and series.n_unique() <= 12:
            # A row not already shown for another reason, so each value gets its own card.
            values = ok.filter(pl.col(column).is_not_null())
            fresh = values.filter(~pl.col("_row").is_in(list(chosen)))
            _choose(chosen, column, fresh.unique(column, keep="first", maintain_order=True), limit)
    room = limit - len(chosen)
    if room > 0 and ok.height:
        spread = ok.gather_every(max(ok.height // room, 1)).get_column("_row").to_list()
        # Rows the spread lands on that were already picked leave room: fill it in order.
        for row in [*spread, *ok.get_column("_row").to_list()]:
            if len(chosen) >= limit:
                break
            chosen.setdefault(row, "spread over the output")
    order = sorted(chosen, key=lambda r: (chosen[r] != "failed", r))
    reasons = pl.DataFrame(
        {"_row": order, "_why": [chosen[r] for r in order]},
        schema={"_row": pl.UInt32, "_why": pl.String},
    )
    return reasons.join(numbered, on="_row", how="left", maintain_order="left")


def _choose(chosen: dict[int, str], why: str, rows: pl.DataFrame, limit: int) -> None:
    for row in rows.get_column("_row").to_list():
        if len(chosen) < limit:
            chosen.setdefault(row, why)


def _cell(value: Any) -> str:
    if value is None:
        return '<span class="none">none</span>'
    text = str(value)
    cut = f"\n… ({len(text) - CELL_CHARS:,} more characters)" if len(text) > CELL_CHARS else ""
    return html.escape(text[:CELL_CHARS] + cut)


def _sample_html(target: Target, frame: pl.DataFrame, sample: pl.DataFrame) -> str:
    inputs = input_columns(frame)
    id_column = target.id_column if target.id_column in inputs else None
    shown = [c for c in (target.prompt_columns or inputs) if c in inputs and c != id_column][:4]
    typed = [c for c in result_columns(frame) if c != "tool_calls"]
    cards = []
    for row in sample.iter_rows(named=True):
        label = f"{row[id_column]} · row {row['_row']}" if id_column else f"row {row['_row']}"
        failed = row["error"] is not None
        status = "failed" if failed else "skipped" if row["finish_reason"] == "skipped" else "ok"
        facts = [
            status,
            f"picked: {row['_why']}",
            ""
            if row["prompt_tokens"] is None
            else f"{row['prompt_tokens']} in / {row['completion_tokens'] or 0} out / "
            f"{row['reasoning_tokens'] or 0} reasoning tokens",
            "" if row["cost_usd"] is None else f"${row['cost_usd']:.6f}",
            "" if row["latency_s"] is None else _latency(row["latency_s"]),
            f"{row['attempts'] or 0} attempt(s)",
        ]
        given = "".join(
            f'<div class="field"><b>{html.escape(c)}</b>{_cell(row[c])}</div>' for c in shown
        )
        answer = (
            f'<div class="error">{_cell(row["error"])}</div>' if failed else _cell(row["response"])
        )
        values = [(c, row[c]) for c in typed if row[c] is not None]
        if values and not failed:
            answer = "".join(
                f'<div class="field"><b>{html.escape(c)}</b>{_cell(v)}</div>' for c, v in values
            )
        cards.append(
            f'<div class="card{" bad" if failed else ""}" data-status="{status}"><div class="head">'
            f"<b>{html.escape(str(label))}</b> · "
            + html.escape(" · ".join(f for f in facts if f))
            + f'</div><div class="cols"><div><h4>input</h4>{given}</div>'
            f"<div><h4>reasoning</h4><pre>{_cell(row['reasoning'])}</pre></div>"
            f"<div><h4>response</h4><pre>{answer}</pre></div></div></div>"
        )
    return "\n".join(cards) or "<p>No rows.</p>"


def _latency(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def _when(stamp: float | None) -> str:
    return (
        "unknown" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))
    )


def header_rows(run: RunInfo | None) -> list[tuple[str, str]]:
    """What was run, as the run log recorded it: model, provider, params, prompt, times."""
    if run is None:
        return [("run", "unknown (no run log beside the output)")]
    rows = [
        ("model", run.model or "unknown"),
        ("provider", run.provider or "unknown"),
        ("params", json.dumps(run.params, sort_keys=True) if run.params else "none"),
    ]
    for part, text in (run.prompt or {}).items():
        if text:
            shown = text if isinstance(text, str) else json.dumps(text, indent=1)
            rows.append((f"prompt {part}", shown))
    rows.append(("started", _when(run.started)))
    rows.append(("ended", _when(run.ended) + (f" ({run.runs} runs)" if run.runs > 1 else "")))
    rows += [("command", command) for command in run.commands[-3:]]
    return rows


def _page(view: RunView) -> str:
    target = view.target
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(target.name)}: run report</title>
<style>{CSS}</style></head>
<body>
<h1>{html.escape(target.name)}</h1>
<p class="meta">{html.escape(str(target.output_path.name))} · {view.stats.rows:,} rows ·
report written {time.strftime("%Y-%m-%d %H:%M")}</p>
{run_html(view)}
<script>{filter_script([""])}</script>
</body></html>
"""


def run_html(view: RunView, ids: str = "", level: int = 2) -> str:
    """One run's header, notes, summary, charts and filterable sample rows: the body of
    a report. `ids` prefixes the sample's element ids (one filter per run on a page);
    `level` is its headings' (h2 in a report of its own)."""
    frame, stats = view.frame, view.stats
    table = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in summary_rows(stats, view.timeline, view.run)
    )
    header = "".join(
        f"<dt>{html.escape(k)}</dt><dd><code>{html.escape(v)}</code></dd>"
        for k, v in header_rows(view.run)
    )
    sample = _sample(frame)
    h = f"h{level}"
    return f"""<dl class="run">{header}</dl>
{"".join(f'<p class="note">{html.escape(n)}</p>' for n in view.notes)}
<div class="top"><section><{h}>Summary</{h}><table class="summary">{table}</table></section>
<section class="charts">{"".join(f"<figure>{c}</figure>" for c in view.charts)}</section></div>
<{h}>Sample rows</{h}>
<p class="meta">{sample.height:,} of {frame.height:,} rows, picked to be worth reading:
failures first, then the slowest, the most retried, empty inputs and one per answer category;
texts are cut at {CELL_CHARS:,} characters.</p>
<div class="filter"><input id="{ids}find" type="search" placeholder="filter the sample: any text">
<select id="{ids}status"><option value="">all</option><option>ok</option><option>failed</option>
<option>skipped</option></select> <span id="{ids}count"></span></div>
<div id="{ids}sample">{_sample_html(view.target, frame, sample)}</div>"""


# The one script: filters each run's embedded sample cards as you type (no network, no
# library); `ids` are the prefixes of the samples' element ids on the page.
def filter_script(ids: list[str]) -> str:
    return f"const samples = {json.dumps(ids)};" + _FILTER_JS


_FILTER_JS = """
function filterSample(p) {
  const words = document.getElementById(p + 'find').value.toLowerCase().split(/\\s+/)
    .filter(Boolean);
  const status = document.getElementById(p + 'status').value;
  const cards = document.getElementById(p + 'sample').querySelectorAll('.card');
  let shown = 0;
  for (const card of cards) {
    const text = card.textContent.toLowerCase();
    const keep = (!status || card.dataset.status === status) &&
      words.every(w => text.includes(w));
    card.hidden = !keep;
    shown += keep;
  }
  document.getElementById(p + 'count').textContent = shown + ' of ' + cards.length + ' shown';
  return shown;
}
for (const p of samples) {
  document.getElementById(p + 'find').addEventListener('input', () => filterSample(p));
  document.getElementById(p + 'status').addEventListener('change', () => filterSample(p));
  filterSample(p);
}
"""


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
  margin: 24px auto; max-width: 1200px; padding: 0 16px; color: #222; background: #fff; }
h1 { margin: 0 0 4px; font-size: 22px; } h2 { font-size: 17px; margin: 24px 0 8px; }
.meta { color: #666; margin: 4px 0 12px; }
.note { background: #fff7e0; border-left: 4px solid #e0a82c; padding: 6px 10px; }
.top { display: grid; grid-template-columns: 300px 1fr; gap: 24px; align-items: start; }
.summary { border-collapse: collapse; width: 100%; }
.summary th { text-align: left; font-weight: normal; color: #555; padding: 3px 8px 3px 0; }
.summary td { text-align: right; font-variant-numeric: tabular-nums; padding: 3px 0; }
.summary tr { border-bottom: 1px solid #eee; }
.charts figure { margin: 0 0 16px; }
.charts svg { width: 100%; height: auto; }
.card { border: 1px solid #ddd; border-radius: 6px; margin: 0 0 12px; overflow: hidden; }
.card.bad { border-color: #e3a19b; }
.card .head { background: #f6f6f6; padding: 6px 10px; }
.card.bad .head { background: #fbeceb; }
.cols { display: grid; grid-template-columns: 1fr 1fr 1fr; }
.cols > div { padding: 6px 10px; min-width: 0; border-right: 1px solid #eee; }
.cols > div:last-child { border-right: 0; }
h4 { margin: 0 0 4px; font-size: 12px; color: #777; text-transform: uppercase; }
pre, .field { white-space: pre-wrap; word-wrap: break-word; margin: 0; max-height: 260px;
  overflow: auto; font: 13px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; }
.field { margin-bottom: 6px; } .field b { display: block; color: #555; }
.error { color: #a3271d; } .none { color: #aaa; font-style: italic; }
dl.run { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 0 0 12px; }
dl.run dt { color: #555; } dl.run dd { margin: 0; }
dl.run code { white-space: pre-wrap; font: 13px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; }
.filter { margin: 0 0 10px; } .filter input { width: 320px; padding: 4px 6px; }
.filter span { color: #666; margin-left: 8px; }
@media (max-width: 900px) { .top, .cols { grid-template-columns: 1fr; } }
"""
