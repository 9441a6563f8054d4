"""`pipeline report` of a multi-step job: one HTML page with a summary of every step
(rows or groups, rows left out by `when`, failures, tokens, cost) and then a section per
step, drawn by report.py from that step's own record (`<output>.run/steps/<name>/`: its
output, or the rows finished so far, and its run log). Only the files a run leaves on
disk are read, so a stopped run reports what exists and a step not yet run says so.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from pipeline.job import table_of
from pipeline.report import (
    CSS,
    Report,
    RunView,
    filter_script,
    locate_job,
    report_beside,
    run_html,
    view_run,
)
from pipeline.resolve import resolve_job
from pipeline.spec import JobSpec, StepSpec, load_spec
from pipeline.steps import ROWS_VARIABLE, StepsLayout, combine_rounds, step_job_spec
from pipeline.steps_reduce import combine_step, splits


@dataclass
class StepSection:
    """One step's part of the report: what it covered and, once it ran, its run."""

    step: StepSpec
    kind: str
    covered: int | None = None  # rows (groups, parts) in its input; None before it starts
    skipped: int | None = None  # rows its `when` left out (a reduce step: rows in no group)
    view: RunView | None = None  # None: not started
    # a reduce step's combining rounds, when it splits its groups
    combines: list[StepSection] = field(default_factory=list)
    part_of: str | None = None  # a combining step: the reduce step whose cost has its own

    @property
    def own_cost(self) -> float:
        cost = self.view.stats.cost_usd if self.view is not None else None
        return cost or 0.0

    @property
    def cost(self) -> float:
        """What the step's answers in the outputs cost: a reduce step's groups include
        the requests that combined their parts."""
        return self.own_cost + sum(combining.own_cost for combining in self.combines)

    @property
    def state(self) -> str:
        if self.view is None:
            return "not started"
        partial = self.view.target.partial_of
        if partial is not None:
            return f"unfinished: {self.view.stats.rows:,} of {partial:,} finished"
        return "done"


def write_steps_report(
    job: Path, destination: Path | None = None, output: Path | None = None
) -> Report:
    """The report of a multi-step job (of the run that wrote `output`, for a
    `run --output` run), by default beside its output as a single-step job's would be."""
    spec = load_spec(job)
    layout = StepsLayout.of(spec, output)
    destination = destination or report_beside(layout.output)
    rows = table_of(spec).check()
    sections = step_sections(spec, layout, rows)
    page = _page(spec, layout, rows, sections)
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text(page, encoding="utf-8")
    every = _flat(sections)
    charts = sum(len(s.view.charts) for s in every if s.view is not None)
    notes = [f"step {s.step.name}: {s.state}" for s in every if s.state != "done"]
    return Report(destination, charts, notes)


def step_sections(spec: JobSpec, layout: StepsLayout, rows: int) -> list[StepSection]:
    """A section per step of the job, in order, each reduce step's combining step in it."""
    sections = []
    for step in spec.steps or []:
        section = _section(spec, layout, StepSection(step, _kind(step)), rows)
        if splits(step):
            section.combines = [
                _section(spec, layout, _combining(step, combining), None)
                for combining in combine_rounds(step, layout)
            ]
        sections.append(section)
    return sections


def _combining(step: StepSpec, combining: StepSpec) -> StepSection:
    kind = f"combines {step.name}'s parts"
    if combining.name != combine_step(step).name:
        kind = f"combines {step.name}'s combined parts again"
    return StepSection(combining, kind, part_of=step.name)


def _section(
    spec: JobSpec, layout: StepsLayout, section: StepSection, rows: int | None
) -> StepSection:
    """`section` filled in from its step's record, which is empty while the step has no
    input or checkpoint. `rows` is the job's, to count the rows the step left out (None:
    a combining step, whose groups are its reduce step's)."""
    step = section.step
    step_input = layout.step_input(step)
    if not step_input.exists():
        return section
    derived = step_job_spec(spec, step, str(step_input), str(layout.step_output(step)))
    job = resolve_job(derived, read_key=False)
    section.covered = job.rows
    if rows is not None:
        section.skipped = rows - (_rows_in(step_input) if step.reduce else job.rows)
    if job.output_path.exists() or job.checkpoint_path.exists():
        # Read whole into the view: an unfinished step's partial export can go after.
        with locate_job(job) as target:
            section.view = view_run(target)
    return section


def _kind(step: StepSpec) -> str:
    if step.reduce is not None:
        return f"reduce by {', '.join(step.reduce.by)}"
    return f"map when {step.when}" if step.when else "map"


def _rows_in(step_input: Path) -> int:
    """The job's rows in a reduce step's groups (or parts of groups)."""
    counted = pl.scan_parquet(step_input).select(pl.col(ROWS_VARIABLE).list.len().sum())
    return int(counted.collect().item() or 0)


def _flat(sections: list[StepSection]) -> list[StepSection]:
    return [s for section in sections for s in (section, *section.combines)]


# ---- the page ------------------------------------------------------------------------


def _page(spec: JobSpec, layout: StepsLayout, rows: int, sections: list[StepSection]) -> str:
    every = _flat(sections)
    total = sum(s.cost for s in sections)
    started = [s for s in every if s.view is not None]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(spec.name)}: run report</title>
<style>{CSS}{_STEPS_CSS}</style></head>
<body>
<h1>{html.escape(spec.name)}</h1>
<p class="meta">{html.escape(layout.output.name)} · {len(spec.steps or []):,} steps over
{rows:,} input rows · report written {time.strftime("%Y-%m-%d %H:%M")}</p>
<h2>Steps</h2>
{_steps_table(every, total)}
<p class="meta">Total cost: every cost column of the outputs added up (each map step's
<code>&lt;step&gt;_cost_usd</code> and each reduce output's <code>cost_usd</code>); a
combining step's cost is part of its reduce step's groups.</p>
{"".join(_section_html(n, s) for n, s in enumerate(every, start=1))}
<script>{filter_script([_ids(s) for s in started])}</script>
</body></html>
"""


_COLUMNS = ("step", "kind", "covered", "left out by when", "failed", "tokens in", "tokens out")


def _steps_table(every: list[StepSection], total: float) -> str:
    head = "".join(f"<th>{c}</th>" for c in (*_COLUMNS, "cost", "state"))
    body = "".join(_step_row(s) for s in every)
    foot = (
        f'<tr class="total"><th colspan="{len(_COLUMNS)}">total over every step</th>'
        f'<td class="cost">{_dollars(total)}</td><td></td></tr>'
    )
    return (
        f'<table class="steps"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
        f"<tfoot>{foot}</tfoot></table>"
    )


def _step_row(section: StepSection) -> str:
    stats = section.view.stats if section.view is not None else None
    unit = "row(s)" if section.step.reduce is None else "group(s)"
    if splits(section.step):
        unit = "part(s) of groups"  # a group over the token budget is sent in parts
    cost = _dollars(section.cost)
    if section.part_of is not None:
        cost += f" (counted in {section.part_of})"
    elif section.combines:
        cost += " (with combining)"
    cells = [
        f'<a href="#step-{section.step.name}">{html.escape(section.step.name)}</a>',
        html.escape(section.kind),
        "" if section.covered is None else f"{section.covered:,} {unit}",
        "" if section.skipped is None else f"{section.skipped:,}",
        "" if stats is None else f"{stats.failed_rows:,}",
        "" if stats is None else f"{stats.prompt_tokens:,}",
        "" if stats is None else f"{stats.output_tokens:,}",
    ]
    return (
        f'<tr data-step="{section.step.name}">'
        + "".join(f"<td>{c}</td>" for c in cells)
        + f'<td class="cost">{html.escape(cost)}</td><td>{html.escape(section.state)}</td></tr>'
    )


def _section_html(number: int, section: StepSection) -> str:
    name = section.step.name
    heading = (
        f'<h2 class="step" id="step-{name}">{number}. {html.escape(name)}'
        f' <span class="kind">{html.escape(section.kind)}</span></h2>'
    )
    if section.view is None:
        return f'{heading}\n<p class="note">{name}: not started; no run of it is recorded.</p>\n'
    return f"<section>{heading}\n{run_html(section.view, _ids(section), level=3)}</section>\n"


def _ids(section: StepSection) -> str:
    return f"{section.step.name}-"


def _dollars(cost: float) -> str:
    return f"${cost:,.6f}"


_STEPS_CSS = """
.steps { border-collapse: collapse; margin: 0 0 8px; }
.steps th, .steps td { padding: 3px 10px 3px 0; text-align: left; border-bottom: 1px solid #eee; }
.steps td { font-variant-numeric: tabular-nums; }
.steps tfoot th, .steps tfoot td { font-weight: bold; border-bottom: 0; }
h2.step { border-top: 2px solid #ddd; padding-top: 16px; margin-top: 32px; }
h2.step .kind { font-weight: normal; color: #666; font-size: 14px; }
"""
