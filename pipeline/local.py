"""The local executor: one process, a pool of workers, the job's checkpoint.

checkpoint (a killed run's journal folded in) -> plan -> scheduler -> recorder -> output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import anyio

from pipeline.assemble import assemble_output
from pipeline.breaker import Breaker
from pipeline.budget import Budget, JointLimit, SpendingLimit
from pipeline.checkpoint import Checkpoint
from pipeline.config import ProviderSettings
from pipeline.connect import open_provider
from pipeline.counters import RUN_STATE_META, RunCounters, RunState
from pipeline.errors import SpecError, WriteFailed
from pipeline.job import ResolvedJob, table_of
from pipeline.oslimits import ADAPTIVE_MAX_CONCURRENCY, ADAPTIVE_START_CONCURRENCY, fit_concurrency
from pipeline.output import count_failed, output_is_current
from pipeline.plan import WorkPlan
from pipeline.progress import Progress
from pipeline.ratelimit import Pacer
from pipeline.record import open_record
from pipeline.recover import adopt_output
from pipeline.retry import RetryPolicy
from pipeline.runlock import RunLock
from pipeline.runlog import WRITE_EVERY_S, RunLog
from pipeline.runs import RunEnd, RunOptions, RunSummary
from pipeline.scheduler import Outcome, Scheduler
from pipeline.sink import CheckpointRecord, Recorder
from pipeline.spec import LimitsSpec
from pipeline.types import RowResult


async def run_local(job: ResolvedJob, options: RunOptions) -> RunSummary:
    """Send every row the plan asks for from this process, and write the output."""
    started = time.monotonic()
    with ExitStack() as stack:
        # Taken before the checkpoint is touched and held to the end: one run per job.
        stack.enter_context(RunLock(job.run_dir.path))
        lost = not job.checkpoint_path.exists()
        checkpoint, notes = open_record(job, fresh=options.fresh)
        stack.callback(checkpoint.close)
        plan = job.plan(
            checkpoint, retry_failed=options.retry_failed, start_at=_resume_at(checkpoint, options)
        )
        adopted = 0
        if lost and not options.fresh:
            adopted = await _adopt_lost_output(job, checkpoint, plan)
        progress = await _open_progress(job, checkpoint, options, stack)
        for note in notes:
            progress.note(note)
        if adopted:
            progress.note(
                f"note: no checkpoint was found; {adopted:,} answered row(s) of "
                f"{job.output_path} are reused instead of being sent again"
            )
        return await _send_all(job, checkpoint, plan, progress, options, started)
    raise AssertionError("unreachable")  # pragma: no cover


async def _adopt_lost_output(job: ResolvedJob, checkpoint: Checkpoint, plan: WorkPlan) -> int:
    """A deleted checkpoint beside a complete output: its answers are not paid twice."""
    return await anyio.to_thread.run_sync(
        adopt_output, job.output_path, checkpoint, plan, job.layout
    )


async def _open_progress(
    job: ResolvedJob, checkpoint: Checkpoint, options: RunOptions, stack: ExitStack
) -> Progress:
    # The starting point is for the headline: finding it checks every row once more.
    start = StartingPoint(0, job.rows)
    if options.show_progress:
        start = await anyio.to_thread.run_sync(_starting_point, job, checkpoint, options)
    progress = Progress(
        job.rows,
        reused=start.reused,
        enabled=options.show_progress,
        notebook=options.notebook,
        headline=start.describe(job.rows),
    )
    stack.callback(progress.close)
    return progress


async def _send_all(
    job: ResolvedJob,
    checkpoint: Checkpoint,
    plan: WorkPlan,
    progress: Progress,
    options: RunOptions,
    started: float,
) -> RunSummary:
    """Send every planned row and write the output; plan again if the input changed."""
    counters = RunCounters()
    for replans in range(MAX_INPUT_REPLANS + 1):
        if replans:
            # Rows already answered for their current request are kept; only rows
            # whose request changed (or that are new) are sent.
            progress.note(
                f"note: {job.spec.input.path} changed during the run; planning again "
                "against the new input (answers to the old rows are not mixed in)"
            )
            job = await anyio.to_thread.run_sync(_reopen_input, job)
            plan = job.plan(checkpoint, retry_failed=options.retry_failed)
        outcome = await _pump(job, plan, checkpoint, progress, counters, options)
        if not outcome.fatal and not outcome.interrupted and _input_moved(job, plan):
            continue
        wall_s = time.monotonic() - started
        summary = await anyio.to_thread.run_sync(
            _finish, job, checkpoint, plan, outcome, counters, wall_s, options
        )
        if summary.output_path is None or not job.table.changed():
            return summary
    raise SpecError(
        f"input.path: {job.spec.input.path} kept changing during the run; finished rows "
        "are kept. Rerun once the input is no longer being written"
    )


MAX_INPUT_REPLANS = 3


def _input_moved(job: ResolvedJob, plan: WorkPlan) -> bool:
    return plan.input_error is not None or job.table.changed()


def _reopen_input(job: ResolvedJob) -> ResolvedJob:
    """The job against its input as it is now; SpecError if it can no longer be used."""
    spec = job.spec
    try:
        table = table_of(spec)
        job.renderer.check_columns(table.columns)
        rows = table.check()
    except SpecError as exc:
        raise SpecError(
            f"the input changed during the run and cannot be used now: {exc}. Finished rows "
            "are kept; fix the input and rerun"
        ) from None
    if job.limit is not None:
        rows = min(rows, job.limit)
    return dataclasses.replace(job, table=table, rows=rows)


def _resume_at(checkpoint: Checkpoint, options: RunOptions) -> int:
    """Where planning starts: where an interrupted run's planning had got to, unless every
    row is to be looked at again."""
    if options.retry_failed or options.fresh:
        return 0
    return int(checkpoint.get_meta("plan_cursor") or 0)


EXACT_START_MAX_ROWS = 200_000  # above this the start line counts from the checkpoint alone


@dataclass(frozen=True)
class StartingPoint:
    """What a run will reuse and send, known before the first request."""

    reused: int
    to_send: int
    failed_again: int = 0  # rows that ended in error before and are sent again
    exact: bool = True

    def describe(self, rows: int) -> str:
        if self.reused == 0:
            return f"starting: {self.to_send:,} rows to send"
        if self.to_send == 0 and self.exact:
            return f"nothing to send: all {rows:,} rows have results from earlier runs"
        if not self.exact:
            return (
                f"resuming: about {self.reused:,} of {rows:,} rows have results from earlier "
                f"runs and are reused (unless their request changed); about {self.to_send:,} "
                "to send"
            )
        again = f", {self.failed_again:,} of them failed before" if self.failed_again else ""
        return (
            f"resuming: {self.reused:,} of {rows:,} rows reused from earlier runs, "
            f"{self.to_send:,} to send{again}"
        )


def _starting_point(job: ResolvedJob, checkpoint: Checkpoint, options: RunOptions) -> StartingPoint:
    recorded = checkpoint.totals()
    if recorded.rows == 0:
        return StartingPoint(0, job.rows)
    if job.rows > EXACT_START_MAX_ROWS:
        # Hashing every row to check it would delay the first request: trust the record.
        reused = min(job.rows, recorded.rows - (recorded.failed if options.retry_failed else 0))
        return StartingPoint(reused, job.rows - reused, exact=False)
    ok, failed, pending = job.plan(checkpoint).tally()
    if options.retry_failed:
        return StartingPoint(ok, failed + pending, failed_again=failed)
    return StartingPoint(ok + failed, pending)


@dataclass
class _RunRecord:
    """This process's run as the operator and the next run see it: what is committed
    with each batch, what each committed row is shown as, and how the run ended."""

    plan: WorkPlan
    checkpoint: Checkpoint
    log: RunLog
    progress: Progress
    counters: RunCounters
    pacer: Pacer
    outcome: Outcome
    run_state: RunState
    on_result: Callable[[RowResult], None] | None

    def meta(self) -> dict[str, str]:
        # Every row before the cursor was planned, so at most the rows in flight there
        # are unfinished: a resume starts at the cursor and sends its first request at once.
        return {
            "plan_cursor": str(self.plan.cursor),
            RUN_STATE_META: self.run_state.dumps(self.counters),
        }

    async def committed(self, batch: list[RowResult]) -> None:
        if self.on_result is not None:
            for result in batch:
                self.on_result(result)
        self.show()

    def finish(self) -> None:
        """The run stopped sending: show where it got to, and record that it ended."""
        # A full disk: the outcome already says so, and what is durable stays.
        with suppress(OSError, sqlite3.Error):
            self._record_end()

    def _record_end(self) -> None:
        self.show(force=True)
        self.run_state.active = False
        self.checkpoint.set_meta(RUN_STATE_META, self.run_state.dumps(self.counters))
        outcome = self.outcome
        self.log.event(
            "run_stopped" if outcome.fatal or outcome.interrupted else "run_sent_all",
            **self.counters.snapshot(),
            reused=self.plan.reused,
            retries=outcome.retries,
            rate_limited=outcome.rate_limited,
            stop=outcome.fatal.describe() if outcome.fatal else None,
            interrupted=outcome.interrupted,
        )
        self.log.flush()

    def show(self, force: bool = False) -> None:
        self.progress.update(
            self.counters,
            reused=self.plan.reused,
            retries=self.outcome.retries,
            requests_per_minute=self.pacer.recent_rate() * 60,
            force=force,
        )


def _note_stopping(progress: Progress, counters: RunCounters, grace_s: float) -> None:
    waiting = counters.in_flight
    progress.note(
        f"stopping: waiting up to {grace_s:g}s for {waiting:,} request(s) in flight\n"
        "  (sent and paid for; no new ones are sent). Ctrl-C again abandons them."
    )


def _budget(job: ResolvedJob, settings: ProviderSettings, checkpoint: Checkpoint) -> Budget:
    """The job's spending limits, counting what earlier runs of it already spent."""
    limits = job.spec.limits
    if limits.max_cost_usd is None and limits.max_tokens_total is None:
        return Budget(None, None, settings.price)  # summing the record would be for nothing
    spent = checkpoint.totals()
    return Budget(
        limits.max_cost_usd,
        limits.max_tokens_total,
        settings.price,
        spent_usd=spent.cost_usd,
        spent_tokens=spent.prompt_tokens + spent.output_tokens + spent.reasoning_tokens,
    )


def _spending_limit(
    job: ResolvedJob, settings: ProviderSettings, checkpoint: Checkpoint, options: RunOptions
) -> SpendingLimit:
    if options.budget is None:
        return _budget(job, settings, checkpoint)
    own = options.budget.own_budget(job.spec.name, partial(_budget, job, settings, checkpoint))
    return JointLimit(own, options.budget)


def _pacer(limits: LimitsSpec, note: Callable[[str], None] | None = None) -> Pacer:
    # Every connection is an open file: a pool above the limit would fail mid-run.
    cap, capped = fit_concurrency(limits.concurrency or ADAPTIVE_MAX_CONCURRENCY)
    if capped and (limits.concurrency or 0) > cap and note is not None:
        note(f"note: {capped}")
    return Pacer(
        limits.requests_per_minute,
        limits.tokens_per_minute,
        max_concurrency=cap,
        # A cap the user chose is used from the start; otherwise start small and grow.
        initial_concurrency=min(cap, limits.concurrency or ADAPTIVE_START_CONCURRENCY),
    )


def _shared_pacer(job: ResolvedJob, options: RunOptions, progress: Progress) -> Pacer:
    """The pacer of every run of this provider account and model that sends at the same
    time as this one. Its limits are part of the key: a step that sets its own is paced
    on its own."""
    assert options.pacers is not None
    settings, limits = job.settings, job.spec.limits
    account = hashlib.sha256((settings.api_key or "").encode()).hexdigest()
    key = (settings.base_url, account, settings.model, limits.model_dump_json())
    return options.pacers.pacer_for(key, partial(_pacer, limits, progress.note))


def _open_log(job: ResolvedJob, settings: ProviderSettings, options: RunOptions) -> RunLog:
    log = RunLog(job.log_path, secrets=(settings.api_key or "",), write_every_s=WRITE_EVERY_S)
    log.event(
        "run_started",
        job=job.spec.name,
        rows=job.rows,
        model=settings.model,
        provider=settings.name,
        params=settings.params,
        prompt=job.spec.the_prompt.model_dump(exclude_none=True, exclude_defaults=True),
        limit=job.limit,
        command=options.command,
    )
    return log


async def _pump(
    job: ResolvedJob,
    plan: WorkPlan,
    checkpoint: Checkpoint,
    progress: Progress,
    counters: RunCounters,
    options: RunOptions,
) -> Outcome:
    limits, settings = job.spec.limits, job.settings
    log = _open_log(job, settings, options)
    run_state = RunState(os.getpid(), job.limit, job.rows, time.time())
    checkpoint.set_meta(RUN_STATE_META, run_state.dumps(counters))
    pacer = (
        _shared_pacer(job, options, progress) if options.pacers else _pacer(limits, progress.note)
    )
    async with open_provider(
        settings, connections=pacer.max_concurrency, timeout_s=limits.timeout_s
    ) as provider:
        scheduler = Scheduler(
            provider,
            pacer,
            RetryPolicy(max_attempts=limits.max_attempts),
            settings.price,
            concurrency=pacer.max_concurrency,
            budget=_spending_limit(job, settings, checkpoint, options),
            log=log,
            schema=job.layout.schema,
            schema_retries=job.spec.output.schema_retries,
            breaker=Breaker(stall_s=limits.stall_timeout_s),
            counters=counters,
            on_stop=partial(_note_stopping, progress, counters),
        )
        run = _RunRecord(
            plan,
            checkpoint,
            log,
            progress,
            counters,
            pacer,
            scheduler.outcome,
            run_state,
            options.on_result,
        )
        sink = Recorder(
            CheckpointRecord(checkpoint, log),
            log,
            counters,
            scheduler.fail,
            meta=run.meta,
            on_commit=run.committed,
            on_show=run.show,
        )
        try:
            return await scheduler.run(
                plan.requests(),
                sink,
                handle_signals=options.handle_signals,
                signals=options.signals,
            )
        finally:
            run.finish()


def _finish(
    job: ResolvedJob,
    checkpoint: Checkpoint,
    plan: WorkPlan,
    outcome: Outcome,
    counters: RunCounters,
    wall_s: float,
    options: RunOptions,
) -> RunSummary:
    output_path: Path | None = None
    fatal = outcome.fatal
    if outcome.fatal is not None:
        end = RunEnd.STOPPED
    elif outcome.interrupted:
        end = RunEnd.INTERRUPTED
    elif not options.write_output:
        end = RunEnd.ROWS_FAILED if counters.rows_failed else RunEnd.ALL_OK
    else:
        try:
            output_path = _write_final_output(job, checkpoint, plan)
            end = RunEnd.ROWS_FAILED if count_failed(output_path) else RunEnd.ALL_OK
        except (OSError, sqlite3.Error) as exc:
            # Every answer is in the checkpoint: a rerun with free space writes the output.
            output_path, end = None, RunEnd.STOPPED
            fatal = WriteFailed.while_(f"writing {job.output_path}", exc)
    return RunSummary(
        rows=job.rows,
        reused=plan.reused,
        deduplicated=plan.deduplicated,
        sent=counters.requests_sent,
        totals=checkpoint.totals(),
        outcome=outcome,
        wall_s=wall_s,
        output_path=output_path,
        end=end,
        fatal=fatal,
        run_cost=counters.cost_usd,
        run_failed=counters.rows_failed,
        counters=counters,
        output_uri=job.output_uri if output_path is not None else None,
    )


def _write_final_output(job: ResolvedJob, checkpoint: Checkpoint, plan: WorkPlan) -> Path:
    # A rerun that found everything done leaves an up-to-date output untouched.
    if plan.planned or not output_is_current(job.table, checkpoint, job.output_path, job.limit):
        assemble_output(job, checkpoint, plan)
    return job.output_path
