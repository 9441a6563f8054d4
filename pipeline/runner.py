"""The one place that wires the concrete parts of a run together.

prepare(): spec -> provider settings -> input -> templates -> every check, nothing sent.
execute(): client -> provider -> plan -> scheduler -> checkpoint -> output Parquet.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager, suppress
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Literal

import anyio

from pipeline import storage
from pipeline.batch.support import require_batch_api
from pipeline.breaker import Breaker
from pipeline.budget import Budget
from pipeline.checkpoint import Checkpoint, Sealed, Totals
from pipeline.columns import RESULT_NAMES
from pipeline.config import ProviderSettings, resolve_provider
from pipeline.counters import RUN_STATE_META, RunCounters, RunState
from pipeline.errors import JobFatalError, JobStopped, RunCrashed, SpecError, WriteFailed
from pipeline.http import HttpClient
from pipeline.identity import claim, describe_job, open_checkpoint
from pipeline.inputs import InputTable
from pipeline.oslimits import fit_concurrency
from pipeline.output import Layout, count_failed, output_format, output_is_current, write_output
from pipeline.plan import WorkPlan
from pipeline.progress import Progress
from pipeline.providers import Provider, create_provider
from pipeline.ratelimit import Pacer
from pipeline.recover import adopt_output
from pipeline.render import PromptRenderer
from pipeline.results import ResultStore
from pipeline.retry import RetryPolicy
from pipeline.runlock import RunLock
from pipeline.runlog import WRITE_EVERY_S, RunLog
from pipeline.scheduler import Outcome, Scheduler
from pipeline.spec import JobSpec, LimitsSpec, load_spec
from pipeline.structured import OutputSchema
from pipeline.types import RowResult

ADAPTIVE_MAX_CONCURRENCY = 256
ADAPTIVE_START_CONCURRENCY = 16


class RunEnd(Enum):
    """How a run ended. The CLI maps it to an exit code; the Python API returns the
    output for the first two and raises `RunFailed` for the others. (An unexpected
    error is not an end: it leaves `execute` as `RunCrashed`.)"""

    ALL_OK = "every row has an answer"
    ROWS_FAILED = "finished, with some rows in error"
    STOPPED = "stopped by a job-level failure"
    INTERRUPTED = "interrupted"


@dataclass
class PreparedJob:
    spec: JobSpec
    settings: ProviderSettings
    table: InputTable
    renderer: PromptRenderer
    rows: int
    output_path: Path
    limit: int | None = None
    layout: Layout = field(default_factory=Layout)
    job_file: Path | None = None
    # Where the checkpoint and run log live, when not beside output_path: a --limit run
    # writes its own output but records into (and reuses) the job's checkpoint.
    run_base: Path | None = None
    # Set when output.path is an object-storage URI: the run builds the file at
    # output_path (a local stage) and uploads it there when it is complete.
    output_uri: str | None = None
    # output.path ends with "/": a folder of part files (cluster runs write one per shard)
    output_folder: bool = False

    @property
    def replaced_output(self) -> Path | None:
        """The job's own output, when this run writes elsewhere to leave it alone."""
        return self.run_base if self.run_base not in (None, self.output_path) else None

    @property
    def output_location(self) -> str:
        """Where the output ends up, as the user named it."""
        if self.output_uri is not None:
            return self.output_uri
        return f"{self.output_path}/" if self.output_folder else str(self.output_path)

    @property
    def request_extra(self) -> dict[str, object]:
        """What shapes the answer beyond model, params and messages: part of the hash."""
        model = self.spec.model
        schema = self.layout.schema.schema if self.layout.schema else None
        return {"schema": schema, "tools": model.tools, "tool_choice": model.tool_choice}

    @property
    def run_dir(self) -> Path:
        out = self.run_base or self.output_path
        return out.with_name(f"{out.name}.run")

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.sqlite"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "events.jsonl"


@dataclass
class RunSummary:
    rows: int
    reused: int
    sent: int
    totals: Totals
    outcome: Outcome
    wall_s: float
    output_path: Path | None
    end: RunEnd
    fatal: JobFatalError | JobStopped | None = None
    run_cost: float = 0.0
    run_failed: int = 0
    notes: list[str] = field(default_factory=list)
    deduplicated: int = 0  # rows given the answer of an identical request sent once
    output_uri: str | None = None  # where the output was uploaded, for remote outputs
    counters: RunCounters = field(default_factory=RunCounters)

    @property
    def finished(self) -> bool:
        """Every row has a result (an answer or its error)."""
        return self.end in (RunEnd.ALL_OK, RunEnd.ROWS_FAILED)

    @property
    def why_unfinished(self) -> str:
        return self.fatal.describe() if self.fatal else self.end.value


def prepare(
    job: str | Path | JobSpec,
    *,
    output: str | Path | None = None,
    limit: int | None = None,
    read_key: bool | Literal["if_set"] = True,
    batch: bool = False,
) -> PreparedJob:
    """Load and check everything a run needs; raises SpecError naming the problem.

    `batch` switches the job to the provider's batch API, as `model.batch: true` does."""
    spec = _batch_if_asked(job if isinstance(job, JobSpec) else load_spec(job), batch)
    if limit is not None and limit < 0:
        raise SpecError("--limit must be zero or more")
    schema = OutputSchema(spec.output.schema_) if spec.output.schema_ else None
    layout = Layout(tool_calls=bool(spec.model.tools), schema=schema)
    settings = resolve_provider(spec.model, read_key=read_key, schema=schema)
    require_batch_api(spec.model, settings.preset)
    renderer = PromptRenderer(spec.prompt)
    table = InputTable(spec.input.path, spec.input.id_column, spec.input.types)
    renderer.check_columns(table.columns)
    _check_column_names(spec, table, layout)
    rows = table.check()
    job_file = None if isinstance(job, JobSpec) else Path(job)
    destination = _destination(spec, output, table, job_file, layout)
    if limit is not None and limit < rows and output is None and not destination.folder:
        # A partial run never replaces the job's (possibly complete) output.
        destination = destination.limited(limit)
    _check_writable(destination.path / "part.parquet" if destination.folder else destination.path)
    return PreparedJob(
        spec,
        settings,
        table,
        renderer,
        rows if limit is None else min(rows, limit),
        destination.path,
        limit,
        layout,
        job_file=job_file,
        run_base=destination.run_base,
        output_uri=destination.uri,
        output_folder=destination.folder,
    )


def _batch_if_asked(spec: JobSpec, batch: bool) -> JobSpec:
    if batch and not spec.model.batch:
        return spec.model_copy(update={"model": spec.model.model_copy(update={"batch": True})})
    return spec


@dataclass(frozen=True)
class _Destination:
    """Where a run writes its output (`path`, a local stage when `uri` is remote)."""

    path: Path
    uri: str | None
    folder: bool
    run_base: Path | None = None  # the job's own output, when a --limit run writes beside it

    def limited(self, limit: int) -> _Destination:
        uri = limited_uri(self.uri, limit) if self.uri is not None else None
        return _Destination(limited_output(self.path, limit), uri, self.folder, self.path)


def _destination(
    spec: JobSpec,
    output: str | Path | None,
    table: InputTable,
    job_file: Path | None,
    layout: Layout,
) -> _Destination:
    target = str(output) if output else str(spec.output.path or spec.output_path)
    uri = target if storage.is_remote(target) else None
    if uri is not None:
        storage.check_writable(uri)
        path = storage.local_stage(uri)
    else:
        path = Path(target)
    folder = target.endswith("/")
    _check_not_overwriting(path, table, job_file)
    if not folder:
        output_format(path, layout)
    return _Destination(path, uri, folder)


def limited_output(path: Path, limit: int) -> Path:
    """Where `run --limit N` writes without --output: beside the job's output."""
    return path.with_name(f"{path.stem}.first-{limit}{path.suffix}")


def limited_uri(uri: str, limit: int) -> str:
    """`limited_output` for an object-storage output."""
    folder, _, name = uri.rpartition("/")
    stem, dot, suffix = name.rpartition(".")
    return f"{folder}/{stem}.first-{limit}.{suffix}" if dot else f"{uri}.first-{limit}"


def _plan(
    job: PreparedJob,
    checkpoint: ResultStore,
    *,
    retry_failed: bool = False,
    from_start: bool = False,
) -> WorkPlan:
    settings = job.settings
    return WorkPlan(
        job.table,
        job.renderer,
        checkpoint,
        settings.model,
        settings.params,
        job.limit,
        retry_failed=retry_failed,
        request_extra=job.request_extra,
        start_at=0 if retry_failed or from_start else int(checkpoint.get_meta("plan_cursor") or 0),
        skip_empty=job.spec.prompt.skip_empty,
    )


def _check_column_names(spec: JobSpec, table: InputTable, layout: Layout) -> None:
    reserved = set(RESULT_NAMES) | {"tool_calls"}
    if clashes := sorted(reserved & set(layout.schema.columns if layout.schema else [])):
        raise SpecError(
            f"output.schema: propert(ies) {', '.join(clashes)} would clash with the output "
            "columns of the same name; rename them"
        )
    produced = [*RESULT_NAMES, *layout.extra_columns]
    if clashes := sorted(set(produced) & set(table.columns)):
        raise SpecError(
            f"input.path: column(s) {', '.join(clashes)} would clash with the output columns "
            f"of the same name; rename them in {spec.input.path}"
        )


def _check_not_overwriting(output: Path, table: InputTable, job_file: Path | None) -> None:
    target = output.resolve()
    for source in table.paths:
        if not storage.is_remote(source) and Path(source).resolve() == target:
            raise SpecError(
                f"output.path: {output} is the job's input; writing the output there would "
                "destroy it; choose another output path"
            )
    if job_file is not None and job_file.resolve() == target:
        raise SpecError(f"output.path: {output} is the job file itself; choose another output path")


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise SpecError(f"output.path: {path} is a folder; name a .parquet file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".pipeline-write-test"):
            pass
    except OSError as exc:
        raise SpecError(f"output.path: cannot write to {path.parent} ({exc.strerror})") from None


@dataclass(frozen=True)
class RunOptions:
    """How to run, beyond what the job says.

    `fresh` ignores every result recorded so far; `retry_failed` sends rows that
    ended in error again; otherwise finished rows with unchanged requests are reused.
    `on_result` is called with each finished row as it is committed.
    """

    handle_signals: bool = False
    show_progress: bool = True
    notebook: bool = False
    fresh: bool = False
    retry_failed: bool = False
    on_result: Callable[[RowResult], None] | None = None
    write_output: bool = True
    detach: bool = False  # batch jobs: submit the batches and return without waiting
    command: str | None = None  # how the run was started, for the run log and the report


def execute(job: PreparedJob, options: RunOptions = RunOptions()) -> RunSummary:
    """Run a prepared job to the end (or to a job-level stop) and write its output."""
    return anyio.run(
        execute_async, job, options, backend="asyncio", backend_options={"use_uvloop": True}
    )


async def execute_async(job: PreparedJob, options: RunOptions = RunOptions()) -> RunSummary:
    """`execute` for code that already runs an event loop (asyncio backend).

    The last line of defence: an error nobody expected stops sending (the task group
    cancels every worker), the rows that finished are committed on the way out, and it
    comes back as `RunCrashed` with the cause chained.
    """
    try:
        return await _execute(job, options)
    except (SpecError, JobStopped):
        raise
    except Exception as exc:
        cause = root_cause(exc)
        raise RunCrashed(f"{type(cause).__name__}: {cause}", log_path=job.log_path) from cause


def root_cause(exc: BaseException) -> BaseException:
    """The one error inside task-group wrappers (ExceptionGroup of one, nested)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _execute(job: PreparedJob, options: RunOptions) -> RunSummary:
    if job.output_folder:
        raise SpecError(
            f"output.path: {job.output_location} ends with '/', which asks for a folder of "
            "part files: only cluster runs (--ray) write those; name a .parquet file"
        )
    if job.spec.model.batch:
        from pipeline.batch.engine import run_batch

        with RunLock(job.run_dir):  # one run per job, batch runs too
            return await run_batch(job, options)
    started = time.monotonic()
    with ExitStack() as stack:
        # Taken before the checkpoint is touched and held to the end: one run per job.
        stack.enter_context(RunLock(job.run_dir))
        lost = not job.checkpoint_path.exists()
        checkpoint = _open_checkpoint(job, options, stack)
        plan = _plan(job, checkpoint, retry_failed=options.retry_failed)
        adopted = 0
        if lost and not options.fresh:
            adopted = await _adopt_lost_output(job, checkpoint, plan)
        progress = await _open_progress(job, checkpoint, options, stack)
        if adopted:
            progress.note(
                f"note: no checkpoint was found; {adopted:,} answered row(s) of "
                f"{job.run_base or job.output_path} are reused instead of being sent again"
            )
        return await _send_all(job, checkpoint, plan, progress, options, started)
    raise AssertionError("unreachable")  # pragma: no cover


def _open_checkpoint(job: PreparedJob, options: RunOptions, stack: ExitStack) -> Checkpoint:
    """The job's checkpoint, claimed for it, with a killed run's journal folded in."""
    checkpoint = open_checkpoint(job.checkpoint_path, fresh=options.fresh)
    stack.callback(checkpoint.close)
    claim(checkpoint, _identity(job), fresh=options.fresh)
    checkpoint.recover()
    if options.fresh:
        checkpoint.start_fresh()
    if job.table.id_column is None:
        checkpoint.key_by_request()
    elif checkpoint.get_meta("keyed_by_request") == "1":
        checkpoint.set_meta("keyed_by_request", "0")  # keyed by id again from now on
    return checkpoint


async def _adopt_lost_output(job: PreparedJob, checkpoint: Checkpoint, plan: WorkPlan) -> int:
    """A deleted checkpoint beside a complete output: its answers are not paid twice."""
    own_output = job.run_base or job.output_path
    return await anyio.to_thread.run_sync(adopt_output, own_output, checkpoint, plan, job.layout)


async def _open_progress(
    job: PreparedJob, checkpoint: Checkpoint, options: RunOptions, stack: ExitStack
) -> Progress:
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
    job: PreparedJob,
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
            plan = _plan(job, checkpoint, retry_failed=options.retry_failed, from_start=True)
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


def _input_moved(job: PreparedJob, plan: WorkPlan) -> bool:
    return plan.input_error is not None or job.table.changed()


def _reopen_input(job: PreparedJob) -> PreparedJob:
    """The job against its input as it is now; SpecError if it can no longer be used."""
    spec = job.spec
    try:
        table = InputTable(spec.input.path, spec.input.id_column, spec.input.types)
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


def _identity(job: PreparedJob) -> dict[str, str]:
    return describe_job(job.spec.name, job.job_file, job.spec.input.path, job.run_dir)


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


def _starting_point(job: PreparedJob, checkpoint: Checkpoint, options: RunOptions) -> StartingPoint:
    recorded = checkpoint.totals()
    if recorded.rows == 0:
        return StartingPoint(0, job.rows)
    if job.rows > EXACT_START_MAX_ROWS:
        # Hashing every row to check it would delay the first request: trust the record.
        reused = min(job.rows, recorded.rows - (recorded.failed if options.retry_failed else 0))
        return StartingPoint(reused, job.rows - reused, exact=False)
    ok, failed, pending = _plan(job, checkpoint).tally()
    if options.retry_failed:
        return StartingPoint(ok, failed + pending, failed_again=failed)
    return StartingPoint(ok + failed, pending)


@dataclass
class _Recorder:
    """Commits each batch of finished rows, then tells the caller and the progress display."""

    plan: WorkPlan
    checkpoint: Checkpoint
    log: RunLog
    progress: Progress
    counters: RunCounters
    pacer: Pacer
    outcome: Outcome
    run_state: RunState
    on_result: Callable[[RowResult], None] | None
    stop: Callable[[JobStopped], None]
    _landed: list[RowResult] = field(default_factory=list)

    def land(self, result: RowResult) -> int:
        try:
            self.checkpoint.land(result)
        except OSError as exc:
            self._failed_write(exc)
            return len(self._landed)
        self._landed.append(result)
        return len(self._landed)

    async def commit(self) -> int:
        if not self._landed:
            return 0
        batch, self._landed = self._landed, []
        try:
            # Sealed before the first await, so no row lands between the journal and the batch.
            sealed = self.checkpoint.seal()
            await anyio.to_thread.run_sync(self._write, sealed, self.log.take(), self.plan.cursor)
        except (OSError, sqlite3.Error) as exc:
            self._failed_write(exc)
            return 0
        for result in batch:
            if self.on_result is not None:
                self.on_result(result)
            self.counters.row_finished(result)
        self.show()
        return len(batch)

    def _write(self, sealed: Sealed, lines: list[bytes], cursor: int) -> None:
        # Every row before the cursor was planned, so at most the rows in flight there
        # are unfinished: a resume starts at the cursor and sends its first request at once.
        meta = {"plan_cursor": str(cursor), RUN_STATE_META: self.run_state.dumps(self.counters)}
        self.checkpoint.commit(sealed, meta)
        self.log.write(lines)

    def _failed_write(self, exc: OSError | sqlite3.Error) -> None:
        # A full disk: answers bought now could not be kept, so no more are sent.
        self.stop(WriteFailed.while_("recording finished rows", exc))

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


def _budget(job: PreparedJob, settings: ProviderSettings, checkpoint: Checkpoint) -> Budget:
    """The job's spending limits, counting what earlier runs of it already spent."""
    limits = job.spec.limits
    spent = checkpoint.totals()
    return Budget(
        limits.max_cost_usd,
        limits.max_tokens_total,
        settings.price,
        spent_usd=spent.cost_usd,
        spent_tokens=spent.prompt_tokens + spent.output_tokens + spent.reasoning_tokens,
    )


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


@dataclass(frozen=True)
class Connection:
    """A provider adapter and the HTTP client under it (batch APIs share the client)."""

    client: HttpClient
    provider: Provider


@asynccontextmanager
async def open_connection(
    settings: ProviderSettings, *, connections: int, timeout_s: float
) -> AsyncIterator[Connection]:
    """An HTTP client and the provider adapter for `settings` on it, closed on exit: the
    one place a client is opened (runs, batch runs, shard workers, estimates, `models`)."""
    async with HttpClient(connections, timeout_s) as client:
        yield Connection(client, create_provider(settings, client))


@asynccontextmanager
async def open_provider(
    settings: ProviderSettings, *, connections: int, timeout_s: float
) -> AsyncIterator[Provider]:
    """The provider adapter for `settings` on its own HTTP client, closed on exit."""
    async with open_connection(settings, connections=connections, timeout_s=timeout_s) as opened:
        yield opened.provider


def _open_log(job: PreparedJob, settings: ProviderSettings, options: RunOptions) -> RunLog:
    log = RunLog(job.log_path, secrets=(settings.api_key or "",), write_every_s=WRITE_EVERY_S)
    log.event(
        "run_started",
        job=job.spec.name,
        rows=job.rows,
        model=settings.model,
        provider=settings.name,
        params=settings.params,
        prompt=job.spec.prompt.model_dump(exclude_none=True, exclude_defaults=True),
        limit=job.limit,
        command=options.command,
    )
    return log


async def _pump(
    job: PreparedJob,
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
    pacer = _pacer(limits, progress.note)
    async with open_provider(
        settings, connections=pacer.max_concurrency, timeout_s=limits.timeout_s
    ) as provider:
        scheduler = Scheduler(
            provider,
            pacer,
            RetryPolicy(max_attempts=limits.max_attempts),
            settings.price,
            concurrency=pacer.max_concurrency,
            budget=_budget(job, settings, checkpoint),
            log=log,
            schema=job.layout.schema,
            schema_retries=job.spec.output.schema_retries,
            breaker=Breaker(stall_s=limits.stall_timeout_s),
            counters=counters,
            on_stop=partial(_note_stopping, progress, counters),
        )
        recorder = _Recorder(
            plan,
            checkpoint,
            log,
            progress,
            counters,
            pacer,
            scheduler.outcome,
            run_state,
            options.on_result,
            scheduler.fail,
        )
        try:
            return await scheduler.run(
                plan.requests(), recorder, handle_signals=options.handle_signals
            )
        finally:
            recorder.finish()


def _finish(
    job: PreparedJob,
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


def _write_final_output(job: PreparedJob, checkpoint: Checkpoint, plan: WorkPlan) -> Path:
    # A rerun that found everything done leaves an up-to-date output untouched.
    if plan.planned or not output_is_current(job.table, checkpoint, job.output_path, job.limit):
        # Only a result for the row's current request is attached: an input changed
        # under the run never puts an answer beside a text it did not answer.
        write_output(
            job.table,
            checkpoint,
            job.output_path,
            job.limit,
            layout=job.layout,
            hashes=plan.hashes_for,
        )
        if job.output_uri is not None:
            storage.upload(job.output_path, job.output_uri)
    return job.output_path


@dataclass
class Status:
    rows: int
    finished: int
    failed: int
    pending: int
    totals: Totals
    recent_rows_per_s: float
    last_finished_at: float | None
    run: RunState | None = None  # the latest run, as it last recorded itself
    running: bool = False  # whether that run's process is alive and still sending
    run_pending: int | None = None  # rows left of a running --limit run
    shards: int | None = None  # a cluster run's shards (its results are their segments)

    @property
    def eta_s(self) -> float | None:
        """Seconds left for what is running now (a --limit run: its own rows)."""
        left = self.pending if self.run_pending is None else self.run_pending
        if left == 0:
            return 0.0
        if not self.running:
            return None
        return left / self.recent_rows_per_s if self.recent_rows_per_s > 0 else None


def status(job: PreparedJob, *, window_s: float = 60.0) -> Status | None:
    """What the checkpoint says about a job, running or not; None before its first run."""
    if not job.checkpoint_path.exists():
        return None
    checkpoint = open_checkpoint(job.checkpoint_path)
    try:
        return status_of(job, checkpoint, window_s=window_s)
    finally:
        checkpoint.close()


def status_of(job: PreparedJob, checkpoint: ResultStore, *, window_s: float = 60.0) -> Status:
    """What these results (a checkpoint, or a cluster's segments) say about a job."""
    totals = checkpoint.totals()
    recent, last = checkpoint.recent(window_s)
    ok, failed, pending = _plan(job, checkpoint).tally()
    run = RunState.loads(checkpoint.get_meta(RUN_STATE_META))
    running = run is not None and run.running
    run_pending = None
    if run is not None and running and run.limit is not None and run.limit < job.rows:
        limited = dataclasses.replace(job, limit=run.limit, rows=run.rows)
        run_pending = _plan(limited, checkpoint).tally()[2]
    rate = recent / window_s if last is not None and time.time() - last < window_s else 0.0
    return Status(
        rows=job.rows,
        finished=ok + failed,
        failed=failed,
        pending=pending,
        totals=totals,
        recent_rows_per_s=rate,
        last_finished_at=last,
        run=run,
        running=running,
        run_pending=run_pending,
    )


def export_partial(job: PreparedJob, path: Path) -> int:
    """Write the rows finished so far to `path`; safe while the job runs."""
    if not job.checkpoint_path.exists():
        raise SpecError(f"no results yet for {job.spec.name}: {job.checkpoint_path} does not exist")
    checkpoint = open_checkpoint(job.checkpoint_path)
    try:
        return export_from(job, checkpoint, path)
    finally:
        checkpoint.close()


def export_from(job: PreparedJob, checkpoint: ResultStore, path: Path) -> int:
    """Write the rows these results (a checkpoint, or a cluster's segments) finished."""
    return write_output(
        job.table,
        checkpoint,
        path,
        job.limit,
        layout=job.layout,
        finished_only=True,
        hashes=_plan(job, checkpoint).hashes_for,
    )
