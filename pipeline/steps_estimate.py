"""`pipeline estimate` for a multi-step job: each step's tokens and cost, and the total.

Without `--sample`, every step is estimated over every row (a `when` is assumed to
keep them all, and earlier steps' answers are unknown, so they render as nothing):
the worst case, which a reduce step cannot even count groups for. With `--sample N`
the first N rows go through the whole chain for real, in the job's own step records
(so the full run reuses them); each step's kept share and output tokens are measured
there and scaled to the job's rows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import anyio
import polars as pl

from pipeline.embedded import simulator_for
from pipeline.estimate import Estimate, estimate
from pipeline.job import ResolvedJob
from pipeline.resolve import resolve_job
from pipeline.runs import RunOptions
from pipeline.spec import StepSpec
from pipeline.steps import (
    ROW_COLUMN,
    Chain,
    StepsLayout,
    join_step,
    resolve_step,
    step_job_spec,
    validation_folder,
)
from pipeline.steps_run import empty_answers, run_chain, step_rows

COST_FIELDS = ("cost_input", "cost_expected", "cost_worst")


@dataclass
class StepEstimate:
    """One step's estimate, scaled from the rows it was made on to the rows expected."""

    step: StepSpec
    estimate: Estimate
    expected_rows: int
    basis: str
    scale: float  # the job's rows over the rows the estimate was made on
    sampled_cost_usd: float | None = None  # what the sample's answers of this step cost

    def cost(self, name: str) -> float | None:
        """A cost of the estimate scaled to the expected rows; `cost_expected` is the
        sample's measured cost, scaled."""
        expected = name == "cost_expected"
        value = self.sampled_cost_usd if expected else getattr(self.estimate, name)
        return None if value is None else value * self.scale

    @property
    def input_tokens(self) -> int:
        return round(self.estimate.input_tokens * self.scale)


def estimate_chain(chain: Chain, *, sample: int = 0) -> list[StepEstimate]:
    """Every step's estimate, in order (sends completions only for `sample` rows)."""
    if sample > 0:
        return _measured(chain, sample)
    return _worst_case(chain)


def _worst_case(chain: Chain) -> list[StepEstimate]:
    frame, found = chain.frame, []
    with validation_folder() as folder:
        scratch = StepsLayout(folder / chain.layout.output.name)
        for step in chain.steps:
            every_row = step.model_copy(update={"when": None})
            job = resolve_step(
                chain.spec,
                every_row,
                step_rows(chain, every_row, frame),
                scratch,
                read_key="if_set",
            )
            made = _estimate(job, 0)
            basis = (
                "the groups unknown (--sample N counts them)"
                if step.reduce
                else "every row"
                + (" (its `when` not applied: --sample N measures it)" if step.when else "")
            )
            found.append(StepEstimate(step, made, made.rows, basis, 1.0))
            if step.reduce is None:
                frame = join_step(frame, step, chain, _no_answers(frame, step, chain))
    return found


def _no_answers(frame: pl.DataFrame, step: StepSpec, chain: Chain) -> pl.DataFrame:
    """Null answers for every row: what an estimate knows of a step that has not run."""
    empty = empty_answers(step, chain.spec)
    rows = frame.select(ROW_COLUMN)
    return rows.join(empty, on=ROW_COLUMN, how="left")


def _measured(chain: Chain, sample: int) -> list[StepEstimate]:
    sampled = dataclasses.replace(chain, frame=chain.frame.head(sample))
    ran = run_chain(sampled, RunOptions(show_progress=False, write_output=False))
    total, measured_on = chain.frame.height, sampled.frame.height
    found = []
    for result in ran.steps:
        step = result.step
        job = _resolve_existing(chain, step)
        made = _estimate(job, 0)
        if step.reduce is None and measured_on:
            share = result.rows / measured_on
            expected = round(total * share)
            scale = expected / made.rows if made.rows else 0.0
            basis = f"{share:.0%} of the rows, as kept among {measured_on:,} sampled row(s)"
        else:
            # A group's prompt grows with its rows; the number of groups need not.
            expected = result.rows
            scale = total / measured_on if measured_on else 0.0
            basis = f"as many as in {measured_on:,} sampled row(s) (more rows may make more)"
        costs = pl.read_parquet(job.output_path).get_column("cost_usd")
        found.append(StepEstimate(step, made, expected, basis, scale, float(costs.sum() or 0.0)))
    return found


def _resolve_existing(chain: Chain, step: StepSpec) -> ResolvedJob:
    """A step over the input its last run wrote (nothing rewritten)."""
    layout = chain.layout
    derived = step_job_spec(
        chain.spec, step, str(layout.step_input(step)), str(layout.step_output(step))
    )
    return resolve_job(derived, read_key="if_set")


def _estimate(job: ResolvedJob, sample: int) -> Estimate:
    with simulator_for(job) as served:
        return anyio.run(lambda: estimate(served, sample=sample))


def describe_estimates(found: list[StepEstimate]) -> str:
    """A block per step, then the total of every step."""

    def money(value: float | None) -> str:
        return "unknown (no price for this model)" if value is None else f"${value:,.4f}"

    lines = []
    for item in found:
        kind = "group(s)" if item.step.reduce else "row(s)"
        line = (
            f"{item.step.name}: {item.expected_rows:,} {kind}, {item.basis}; "
            f"{item.input_tokens:,} input tokens; cost {money(item.cost('cost_input'))} "
            f"(input only) to {money(item.cost('cost_worst'))} (every reply at max_tokens)"
        )
        if item.sampled_cost_usd is not None:
            line += f"; expected {money(item.cost('cost_expected'))}"
        lines.append(line)
    lines.append(
        f"total: {sum(i.input_tokens for i in found):,} input tokens; cost "
        f"{money(_sum(found, 'cost_input'))} to {money(_sum(found, 'cost_worst'))}"
        + (
            f"; expected {money(_sum(found, 'cost_expected'))}"
            if all(i.sampled_cost_usd is not None for i in found)
            else ""
        )
    )
    return "\n".join(lines)


def _sum(found: list[StepEstimate], name: str) -> float | None:
    costs = [item.cost(name) for item in found]
    return None if any(c is None for c in costs) else sum(c for c in costs if c is not None)
