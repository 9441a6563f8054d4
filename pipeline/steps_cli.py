"""The commands of a multi-step job (`validate`, `run`, `status`, `estimate`): what they
print, and the exit code, the same as a single-step job's for the same end."""

from __future__ import annotations

from pathlib import Path

import click
import polars as pl

from pipeline.batch.store import open_batches
from pipeline.errors import PipelineError, RunCrashed, SpecError
from pipeline.executor import Cluster
from pipeline.resolve import resolve_job
from pipeline.runs import RunEnd, RunOptions, rerun_command
from pipeline.spec import load_spec, with_cache
from pipeline.steps import ROW_COLUMN, Chain, StepsLayout, open_chain, step_job_spec
from pipeline.steps_reduce import combine_step, splits, with_reduce_models
from pipeline.steps_run import ChainSummary, check_chain, left_out, recorded_steps, run_chain
from pipeline.steps_stream import read_state

EXIT_CODES = {RunEnd.ALL_OK: 0, RunEnd.ROWS_FAILED: 1, RunEnd.STOPPED: 3, RunEnd.INTERRUPTED: 130}
EXIT_STOPPED, EXIT_CRASHED = 3, 4


def _say(line: str) -> None:
    click.echo(line, err=True)


def validate_steps(job: Path) -> None:
    """Check every step against the columns it will see; SpecError names the first problem."""
    chain = open_chain(job)
    resolved = check_chain(chain)
    click.echo(
        f"ok: {job} is valid: {chain.frame.height:,} rows from {chain.spec.input.path}, "
        f"{len(chain.steps)} steps, output {chain.layout.output}"
    )
    # A reduce step that may split its groups is checked with the step that combines them.
    combining = {combine_step(step).name for step in chain.steps if splits(step)}
    for step, prepared in zip(recorded_steps(chain.steps), resolved, strict=True):
        kind = f"reduce by {', '.join(step.reduce.by)}" if step.reduce else "map"
        if step.name in combining:
            kind = "combines the parts of a group too large for one request"
        when = f" when {step.when}" if step.when else ""
        click.echo(
            f"  {step.name}: {kind}{when}; provider {prepared.settings.name}, "
            f"model {prepared.settings.model}"
        )


def run_steps(
    job: Path,
    options: RunOptions,
    *,
    output: str | None = None,
    limit: int | None = None,
    batch: bool = False,
    cluster: Cluster | None = None,
    cache: str | None = None,
) -> int:
    """Run a multi-step job and print one summary; returns the exit code."""
    rerun = rerun_command(job, output, batch)
    if cluster is not None:
        cluster.require_ray()
    chain = open_chain(job, output=output, limit=limit)
    if options.detach and not batch:
        _check_every_step_batches(chain)
    if cache:
        chain.spec = with_cache(chain.spec, cache)
    check_chain(chain, read_key=True)  # every step checked before the first is sent
    try:
        summary = run_chain(chain, options, cluster, batch=batch, announce=_say)
    except SpecError:
        raise
    except RunCrashed as exc:
        _say(
            f"error: the run stopped on an unexpected error: {exc}; finished rows are saved "
            f"and `{rerun}` resumes (PIPELINE_DEBUG=1 shows the traceback)"
        )
        return EXIT_CRASHED
    except PipelineError as exc:
        _say(f"error: {exc}")
        return EXIT_STOPPED
    _say(describe_chain(summary, rerun))
    return EXIT_CODES[summary.end]


def _check_every_step_batches(chain: Chain) -> None:
    """`--detach` leaves a step's batches at the provider; a step sent online cannot."""
    for step in chain.steps:
        if not (step.model or chain.spec.model).batch:
            raise SpecError(
                f"--detach: step {step.name} is sent online, and only batches can be left "
                "running; add --batch (or model.batch: true to every step)"
            )


def describe_chain(summary: ChainSummary, rerun: str) -> str:
    """One summary for the whole job: a line per step, then the totals and the outputs."""
    lines = ["steps:"]
    for result in summary.steps:
        run = result.summary
        failed = result.failed
        reasons = left_out(result.skipped, result.unsent)
        lines.append(
            f"  {result.step.name}: {result.rows:,} {'group' if result.step.reduce else 'row'}(s)"
            + (f" ({', '.join(reasons)})" if reasons else "")
            + f", {run.reused:,} reused, {run.sent:,} request(s) sent, {failed:,} failed; "
            f"cost ${run.run_cost:.6f} this run"
        )
    total = summary.total_cost_usd
    lines.append(
        f"cost: ${summary.run_cost:.6f} this run"
        + (f", ${total:.6f} for every answer in the outputs" if total is not None else "")
    )
    if summary.end is RunEnd.STOPPED:
        stopped = summary.steps[-1]
        fatal = stopped.summary.fatal
        why = fatal.describe() if fatal is not None else stopped.summary.why_unfinished
        lines.append(f"stopped in step {stopped.step.name}: {why}; `{rerun}` resumes")
    elif summary.end is RunEnd.INTERRUPTED:
        lines.append(f"interrupted: finished rows are saved; `{rerun}` resumes")
    elif summary.detached is not None:
        waiting = summary.detached
        lines.append(
            f"detached in step {waiting.step.name}: {waiting.summary.open_batches} batch(es) "
            f"running at the provider; `{rerun} --detach` collects those that have ended "
            "and goes on to the next step, without --detach it waits for them"
        )
    if summary.output_path is not None:
        lines.append(f"output: {summary.output_path}")
    lines.extend(f"output (reduce): {path}" for path in summary.reduce_outputs)
    lines.extend(f"uploaded: {uri}" for uri in summary.uploaded)
    return "\n".join(lines)


def status_steps(job: Path, output: Path | None) -> None:
    """A line per step from its own record (`not started` before its first run), then
    the cost of every step together."""
    from pipeline.cluster.status import job_status

    spec = with_reduce_models(load_spec(job))
    layout = StepsLayout.of(spec, output)
    streaming = read_state(layout.run_dir.streaming)
    lines, cost = [], 0.0
    own = {step.name for step in spec.steps or []}
    for step in recorded_steps(spec.steps or [], layout):
        step_input = layout.step_input(step)
        if not step_input.exists():
            # A combining round runs only for groups too large for one request.
            idle = "not started" if step.name in own else "nothing to combine so far"
            lines.append(f"  {step.name}: {idle}")
            continue
        derived = step_job_spec(spec, step, str(step_input), str(layout.step_output(step)))
        resolved = resolve_job(derived, read_key=False)
        report = job_status(resolved)
        if report is None:
            lines.append(f"  {step.name}: not started")
            continue
        cost += report.totals.cost_usd
        rows, finished, failed = report.rows, report.finished, report.failed
        waves = streaming.get(step.name)
        if waves is not None:
            # The input holds the wave the step is on; the waves before it are counted
            # in the streaming account (unless this input is one of them).
            if _first_row(step_input) <= waves["through"]:
                rows = finished = failed = 0
            rows, finished = rows + waves["rows"], finished + waves["rows"]
            failed += waves["failed"]
        pending = rows - finished
        state = "running" if report.running else "done" if pending == 0 else "stopped"
        if state == "stopped" and (waiting := open_batches(resolved.checkpoint_path)):
            state = f"{waiting} batch(es) open at the provider (`run` collects them)"
        lines.append(
            f"  {step.name}: {finished:,}/{rows:,} "
            f"{'group' if step.reduce else 'row'}(s) finished ({failed:,} failed), "
            f"{pending:,} pending, {state}; cost ${report.totals.cost_usd:.6f}"
        )
    click.echo(f"{spec.name}: {len(spec.steps or [])} steps, ${cost:.6f} spent in all")
    click.echo("\n".join(lines))


def _first_row(step_input: Path) -> int:
    """The first input row a step's materialised input holds (-1 when it is empty)."""
    first = pl.scan_parquet(step_input).select(pl.col(ROW_COLUMN).min()).collect().item()
    return -1 if first is None else int(first)


def estimate_steps(job: Path, sample: int, limit: int | None) -> None:
    """Each step's estimate and the total; `sample` rows go through every step for real."""
    from pipeline.steps_estimate import describe_estimates, estimate_chain

    chain = open_chain(job, limit=limit)
    check_chain(chain, read_key=True if sample else "if_set")
    click.echo(describe_estimates(estimate_chain(chain, sample=sample)))
