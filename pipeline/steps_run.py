"""Checking and running a multi-step job (`steps.py`): each step is resolved into a
job of its own and handed to `executor.executor_for`, like any job, so `--batch` and
`--ray` run a step exactly as they run a job."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from pipeline import storage
from pipeline.budget import SharedBudget
from pipeline.checkpoint import Checkpoint, Totals
from pipeline.embedded import simulator_for
from pipeline.executor import Cluster, executor_for
from pipeline.job import ResolvedJob
from pipeline.output import scan_output
from pipeline.ratelimit import SharedPacers
from pipeline.runlock import RunLock
from pipeline.runs import SEVERITY, RunEnd, RunOptions, RunSummary
from pipeline.spec import StepSpec
from pipeline.steps import (
    ROW_COLUMN,
    ROWS_VARIABLE,
    Chain,
    StepResult,
    StepsLayout,
    combine_rounds,
    empty_answers,
    failed_upstream,
    final_frame,
    join_step,
    prefixed,
    reduce_frame,
    resolve_step,
    step_rows,
    validation_folder,
    write_frame,
)
from pipeline.steps_reduce import combine_input, combine_parts, combine_step, merged, splits
from pipeline.steps_stream import StreamedStep, StreamResult, stream, streamed_steps


@dataclass
class ChainSummary:
    """How a multi-step run went: one result per step that ran, the outputs written."""

    steps: list[StepResult] = field(default_factory=list)
    end: RunEnd = RunEnd.ALL_OK
    output_path: Path | None = None
    reduce_outputs: list[Path] = field(default_factory=list)
    uploaded: list[str] = field(default_factory=list)  # object-storage outputs
    # `--detach`: the step whose batches were left running at the provider; the chain
    # goes on from it on the next run.
    detached: StepResult | None = None
    total_cost_usd: float | None = None  # over every cost column of the outputs

    @property
    def run_cost(self) -> float:
        return sum(r.summary.run_cost for r in self.steps)

    @property
    def sent(self) -> int:
        return sum(r.summary.sent for r in self.steps)


# --- validate -----------------------------------------------------------------------


def check_chain(chain: Chain, *, read_key: bool | Literal["if_set"] = True) -> list[ResolvedJob]:
    """Every check of every step, in order, against the columns it will see (the
    earlier steps' included); nothing is sent and nothing of the job's is written."""
    frame = chain.frame.head(0)
    resolved = []
    with validation_folder() as folder:
        scratch = StepsLayout(folder / chain.layout.output.name)
        for step in chain.steps:
            step_input = step_rows(chain, step, frame)
            resolved.append(resolve_step(chain.spec, step, step_input, scratch, read_key=read_key))
            if splits(step):
                answers = empty_answers(step, chain.spec).drop(ROW_COLUMN)
                parts = pl.concat(
                    [step_input.drop(ROWS_VARIABLE).head(0), answers], how="horizontal"
                )
                combining = combine_step(step)
                resolved.append(
                    resolve_step(
                        chain.spec,
                        combining,
                        combine_parts(combine_input(parts, step), combining),
                        scratch,
                        read_key=read_key,
                        where=f"steps.{step.name}.reduce.combine",
                    )
                )
            if step.reduce is None:
                frame = join_step(frame, step, chain, empty_answers(step, chain.spec))
    return resolved


# --- run ----------------------------------------------------------------------------


Announce = Callable[[str], None]


def run_chain(
    chain: Chain,
    options: RunOptions,
    cluster: Cluster | None = None,
    *,
    batch: bool = False,
    announce: Announce = lambda line: None,
) -> ChainSummary:
    """Run every step in order, then write the job's output. A step that stops (a
    job-level failure, an interrupt) stops the chain: later steps are not started, and
    a rerun resumes it, reusing every answer recorded. One run per job: the lock on the
    job's run folder is held throughout, as each step's run holds its own."""
    with RunLock(chain.layout.run_dir.path):
        return _run_steps(chain, options, cluster, batch, announce)


def _run_steps(
    chain: Chain, options: RunOptions, cluster: Cluster | None, batch: bool, announce: Announce
) -> ChainSummary:
    summary = ChainSummary()
    frame = chain.frame
    # The chain reads each step's output to join it: a step always writes it, and
    # `options.write_output` is about the job's own outputs.
    # One pacer per provider account and model for every step: a step's run starts
    # inside the server's window the step before it used (its last second's share sent).
    step_options = dataclasses.replace(options, write_output=True, pacers=SharedPacers())
    streamed: dict[str, StreamedStep] = {}
    for number, step in enumerate(chain.steps, start=1):
        if step.name not in streamed and cluster is None and not batch:
            ahead = _streaming(chain, number - 1, frame, step_options, announce)
            streamed.update({account.step.name: account for account in ahead.steps})
            if not ahead.finished:
                _add_stopped_stream(summary, ahead)
                return summary
        step_input = step_rows(chain, step, frame)
        covered = step_input.height
        unsent = _failed_upstream_in(chain, step, frame)
        kept = covered if step.reduce is None else _rows_in(step_input)
        skipped = frame.height - kept - unsent
        announce(_headline(number, len(chain.steps), step, covered, skipped, unsent))
        budgeted = within_job_budget(chain, step)
        job = resolve_step(chain.spec, budgeted, step_input, chain.layout, batch=batch)
        # A step the rows streamed through has answered them all: this run writes its
        # output from its record, sending nothing (and setting nothing aside again).
        once = dataclasses.replace(step_options, fresh=False, retry_failed=False)
        run = _run_step(job, once if step.name in streamed else step_options, cluster)
        if step.name in streamed:
            run = _with_streamed(run, streamed[step.name])
            if step.name == list(streamed)[-1]:  # every streamed step's files are whole
                chain.layout.run_dir.streaming.unlink(missing_ok=True)
        result = StepResult(step, covered, skipped, run, unsent=unsent)
        answered = _answers_of(result, job.output_path, summary)
        if answered is None:
            return summary
        if splits(step):
            combined = _combine(chain, step, answered, step_options, cluster, batch, summary)
            if not _went_on(summary):
                return summary
            answered = merged(answered, combined, step)
        if step.reduce is None:
            frame = join_step(frame, step, chain, answered)
        elif options.write_output:
            result.output = chain.layout.reduce_output(step)
            write_frame(reduce_frame(step, chain.spec, answered), result.output)
            summary.reduce_outputs.append(result.output)
            _upload(result.output, chain.layout.reduce_uri(step), summary)
    if options.write_output:
        final = final_frame(chain, frame)
        write_frame(final, chain.layout.output)
        summary.output_path = chain.layout.output
        summary.total_cost_usd = _total_cost(chain, final, summary.reduce_outputs)
        _upload(chain.layout.output, chain.layout.uri, summary)
    return summary


def _upload(local: Path, uri: str | None, summary: ChainSummary) -> None:
    """Copy a whole output to object storage, for a job whose output is there."""
    if uri is not None:
        storage.upload(local, uri)
        summary.uploaded.append(uri)


def _streaming(
    chain: Chain, start: int, frame: pl.DataFrame, options: RunOptions, announce: Announce
) -> StreamResult:
    """Stream the rows through the map steps from `start` on (`steps_stream.py`), when
    they can stream: every one runs online, and there are rows for more than one wave."""
    segment = streamed_steps(chain, start)
    if any((step.model or chain.spec.model).batch for step in segment):
        segment = []
    if not segment:
        return StreamResult([])
    return stream(chain, segment, frame, options, _shared_budget(chain), announce)


def _shared_budget(chain: Chain) -> SharedBudget | None:
    """The job's spending limits, less what every step's record has spent already."""
    limits = chain.spec.limits
    if limits.max_cost_usd is None and limits.max_tokens_total is None:
        return None
    spent = Totals()
    for step in recorded_steps(chain.steps, chain.layout):
        spent += recorded_totals(chain.layout.step_checkpoint(step))
    return SharedBudget(
        limits.max_cost_usd,
        limits.max_tokens_total,
        spent_usd=spent.cost_usd,
        spent_tokens=spent.prompt_tokens + spent.output_tokens + spent.reasoning_tokens,
    )


def _add_stopped_stream(summary: ChainSummary, ahead: StreamResult) -> None:
    """A streaming pass that stopped, in the summary: each step that ran, the one that
    stopped the pass last (the summary names it)."""
    accounts = sorted(
        (account for account in ahead.steps if account.runs),
        key=lambda account: SEVERITY.index(account.end),
    )
    for account in accounts:
        run = account.summary()
        assert run is not None
        summary.steps.append(StepResult(account.step, account.rows, account.skipped, run))
        summary.end = max(summary.end, run.end, key=SEVERITY.index)


def _with_streamed(final: RunSummary, account: StreamedStep) -> RunSummary:
    """A streamed step's run: what its waves sent and spent, and the rows they did not
    send reused (the run over all its rows found every answer recorded)."""
    waves = account.summary()
    if waves is None:
        return final
    return dataclasses.replace(
        final,
        reused=max(0, final.reused - account.sent_rows),
        sent=final.sent + waves.sent,
        run_cost=final.run_cost + waves.run_cost,
        run_failed=final.run_failed + waves.run_failed,
        wall_s=final.wall_s + waves.wall_s,
    )


def _combine(
    chain: Chain,
    step: StepSpec,
    answered: pl.DataFrame,
    options: RunOptions,
    cluster: Cluster | None,
    batch: bool,
    summary: ChainSummary,
    round_number: int = 1,
) -> pl.DataFrame | None:
    """Combine the parts of every split group (steps_reduce.py), in rounds until each
    group's answers fit one request: one row per group (None when no group was split, or
    a round stopped); each round's run is added to the summary."""
    groups = combine_input(answered, step)
    if groups.height == 0:
        chain.layout.combining_rounds(step).write_text(str(round_number - 1))
        return None
    combining = within_job_budget(chain, combine_step(step, round_number))
    requests = combine_parts(groups, combining)
    where = f"steps.{step.name}.reduce.combine"
    job = resolve_step(chain.spec, combining, requests, chain.layout, batch=batch, where=where)
    run = _run_step(job, options, cluster)
    result = StepResult(combining, requests.height, 0, run)
    combined = _answers_of(result, job.output_path, summary)
    if combined is None:
        return None
    further = _combine(chain, step, combined, options, cluster, batch, summary, round_number + 1)
    if not _went_on(summary):
        return None
    return merged(combined, further, step)


def _went_on(summary: ChainSummary) -> bool:
    """Whether the last step run finished, and the chain goes on after it."""
    return summary.steps[-1].summary.finished and summary.detached is None


def _answers_of(result: StepResult, output: Path, summary: ChainSummary) -> pl.DataFrame | None:
    """Add a step's run to the summary; its answers when it finished, else None."""
    summary.steps.append(result)
    summary.end = max(summary.end, result.summary.end, key=SEVERITY.index)
    if result.summary.open_batches:
        summary.detached = result
    if not result.summary.finished or summary.detached is not None:
        return None
    answered = pl.read_parquet(output)
    result.failed = answered.height - answered.get_column("error").null_count()
    return answered


def within_job_budget(chain: Chain, step: StepSpec) -> StepSpec:
    """The step with the job's spending limits made one budget across the steps: what
    the other steps' records have spent is taken off (a step's own records are counted
    by its run, as any job's are); a step's own lower limit still holds. A budget already
    spent stops the step before it sends."""
    job, limits = chain.spec.limits, step.limits or chain.spec.limits
    if job.max_cost_usd is None and job.max_tokens_total is None:
        return step
    elsewhere = Totals()
    for other in recorded_steps(chain.steps, chain.layout):
        if other.name != step.name:
            elsewhere += recorded_totals(chain.layout.step_checkpoint(other))
    update: dict[str, float | int] = {}
    if job.max_cost_usd is not None:
        left = max(NOTHING_LEFT_USD, job.max_cost_usd - elsewhere.cost_usd)
        update["max_cost_usd"] = min(left, limits.max_cost_usd or left)
    if job.max_tokens_total is not None:
        used = elsewhere.prompt_tokens + elsewhere.output_tokens + elsewhere.reasoning_tokens
        left_tokens = max(1, job.max_tokens_total - used)
        update["max_tokens_total"] = min(left_tokens, limits.max_tokens_total or left_tokens)
    return step.model_copy(update={"limits": limits.model_copy(update=update)})


def recorded_steps(steps: list[StepSpec], layout: StepsLayout | None = None) -> list[StepSpec]:
    """Every step that keeps a record: the job's, and the combining step of each reduce
    that splits its groups, with (given the job's layout) every later combining round a
    run has started."""
    found = []
    for step in steps:
        found.append(step)
        if splits(step):
            found.extend(combine_rounds(step, layout))
    return found


# The limits must stay positive; this leaves no request room.
NOTHING_LEFT_USD = 1e-12


def recorded_totals(path: Path) -> Totals:
    """What a step's checkpoint holds (nothing, before its first run)."""
    if not path.exists():
        return Totals()
    checkpoint = Checkpoint(path)
    try:
        return checkpoint.totals()
    finally:
        checkpoint.close()


def _rows_in(groups: pl.DataFrame) -> int:
    return int(groups.get_column(ROWS_VARIABLE).list.len().sum()) if groups.height else 0


def _run_step(job: ResolvedJob, options: RunOptions, cluster: Cluster | None) -> RunSummary:
    executor = executor_for(job, options, cluster)
    with simulator_for(job) as served:
        return executor.run(served, options)


def _headline(number: int, of: int, step: StepSpec, covered: int, skipped: int, unsent: int) -> str:
    if step.reduce is not None:
        what = f"reduce by {', '.join(step.reduce.by)}: {covered:,} group(s)"
    else:
        what = f"map: {covered:,} row(s)"
    return f"step {number}/{of} {step.name}: {what}" + "".join(
        f", {reason}" for reason in left_out(skipped, unsent)
    )


def left_out(skipped: int, unsent: int) -> list[str]:
    """The rows a step was not sent, and why."""
    reasons = [f"{skipped:,} left out by its `when`"] if skipped else []
    if unsent:
        reasons.append(f"{unsent:,} not sent as an earlier step failed on them")
    return reasons


def _failed_upstream_in(chain: Chain, step: StepSpec, frame: pl.DataFrame) -> int:
    failed = failed_upstream(chain, step)
    return int(frame.select(failed.sum()).item()) if failed is not None else 0


def _total_cost(chain: Chain, final: pl.DataFrame, reduce_outputs: list[Path]) -> float:
    """Every cost column of the outputs added up: what the answers in them cost."""
    total = sum(
        float(final.get_column(prefixed(step, "cost_usd")).sum() or 0.0)
        for step in chain.steps
        if step.reduce is None
    )
    for path in reduce_outputs:
        costs = scan_output(path).select(pl.col("cost_usd").sum()).collect()
        total += float(costs.item() or 0.0)
    return total
