"""A job through the provider's batch API: plan, upload, create, poll, collect.

Every step is committed to the checkpoint before the next one (see `store`), so a
run killed anywhere resumes where it was: a planned chunk is uploaded, an uploaded
one is created (after looking for the batch a killed run may have created: its
metadata carries the job's fingerprint and the chunk id), a submitted one is polled,
never sent again. New rows are planned only when no batch is open, so a row is in at
most one open batch. Results become ordinary row results (the adapter parses each
answer body exactly as it parses an online answer, errors are classified the same
way): retryable failures go into a later batch until `limits.max_attempts`, row
errors are recorded, and a batch the provider refuses stops the job (exit 3).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio

from pipeline.assemble import assemble_output
from pipeline.batch.apis import CANCELED, EXPIRED, BatchApi, BatchState, ResultLine, make_api
from pipeline.batch.planner import plan_chunks
from pipeline.batch.store import BatchStore, Chunk, Item, read_chunks
from pipeline.breaker import explained
from pipeline.checkpoint import Checkpoint
from pipeline.config import ProviderSettings
from pipeline.connect import Connection, open_connection
from pipeline.counters import RunCounters
from pipeline.decide import Finished, RowTries, Rules, Stop, decide
from pipeline.errors import (
    JobFatalError,
    JobStopped,
    ProviderError,
    RetryableError,
    SpecError,
    TransportError,
)
from pipeline.job import ResolvedJob
from pipeline.output import count_failed
from pipeline.progress import Progress
from pipeline.providers import Provider
from pipeline.record import open_record
from pipeline.retry import RetryPolicy
from pipeline.runlog import RunLog
from pipeline.runs import RunEnd, RunOptions, RunSummary
from pipeline.scheduler import STOP_SIGNALS, Outcome, take_early_stops
from pipeline.sink import CheckpointRecord, Recorder
from pipeline.types import Completion, RowResult

RECORD_ROWS = 2000
CANCELLED_AT = "batch_cancelled_at"  # checkpoint meta: when `pipeline cancel` last ran
MAX_POLL_BACKOFF_S = 600.0
CALL_ATTEMPTS = 6
# Uploads of up to 200 MB and downloads of the results need more than a request's timeout.
TRANSFER_TIMEOUT_S = 900.0
T = TypeVar("T")


class BatchRejected(JobFatalError):
    """The provider refused a whole batch (it failed validation): nothing ran."""

    kind = "batch_failed"
    advice = "fix what the line errors name (in the job or the input) and rerun"


class BatchesCancelled(JobFatalError):
    """Batches of this job were cancelled (`pipeline cancel`): their rows stay pending."""

    kind = "batch_cancelled"
    advice = "rerun to send the rows that did not finish again"


class BatchExpired(RetryableError):
    kind = "batch_expired"


class BatchCanceled(RetryableError):
    kind = "batch_canceled"


@dataclass
class _Tally:
    retried: int = 0  # results that go into a later batch
    submitted: list[int] = field(default_factory=list)
    live: dict[int, int] = field(default_factory=dict)  # chunk id -> answered so far


async def run_batch(job: ResolvedJob, options: RunOptions) -> RunSummary:
    """Run a prepared job through the batch API (see the module docstring)."""
    started = time.monotonic()
    with ExitStack() as stack:
        settings = dataclasses.replace(job.settings, stream=False)
        checkpoint, notes = open_record(job, fresh=options.fresh)
        stack.callback(checkpoint.close)
        store = BatchStore(job.checkpoint_path)
        stack.callback(store.close)
        progress = Progress(job.rows, enabled=options.show_progress, notebook=options.notebook)
        for note in notes:
            progress.note(note)
        stack.callback(progress.close)
        log = RunLog(job.log_path, secrets=(settings.api_key or "",))
        timeout = max(job.spec.limits.timeout_s, TRANSFER_TIMEOUT_S)
        async with open_connection(settings, connections=8, timeout_s=timeout) as connection:
            run = _BatchRun(job, settings, options, connection, checkpoint, store, progress, log)
            await run.run_with_signals()
        log.flush()
        return await anyio.to_thread.run_sync(run.finish, time.monotonic() - started)
    raise AssertionError("unreachable")  # pragma: no cover


class _BatchRun:
    def __init__(
        self,
        job: ResolvedJob,
        settings: ProviderSettings,
        options: RunOptions,
        connection: Connection,
        checkpoint: Checkpoint,
        store: BatchStore,
        progress: Progress,
        log: RunLog,
    ) -> None:
        self.job = job
        self.settings = settings
        self.options = options
        self.checkpoint = checkpoint
        self.store = store
        self.progress = progress
        self.log = log
        self.provider: Provider = connection.provider
        self.api: BatchApi = _batch_api(settings, connection)
        self.policy = RetryPolicy(max_attempts=CALL_ATTEMPTS)
        self.max_attempts = job.spec.limits.max_attempts
        self.poll_s = job.spec.model.batch_poll_s
        self.fingerprint = store.job_fingerprint()
        self.outcome = Outcome()
        self.tally = _Tally()
        self.counters = RunCounters()
        self.reused = 0
        self.sent = 0
        self.notes: list[str] = []
        self.detach = options.detach
        self.started = time.time()
        self.canceled_lines = 0
        self.sink = Recorder(
            CheckpointRecord(checkpoint, log),
            log,
            self.counters,
            self._stop,
            on_commit=self._committed,
        )
        self.rules = Rules(
            RetryPolicy(max_attempts=self.max_attempts),
            settings.batch_price,  # a cost the provider reports is its own (batch) price
            job.layout.schema,
            job.spec.output.schema_retries,
        )
        # Rows asked again in a later batch of this run: their schema mismatches and spend.
        self.tries: dict[tuple[str, str], RowTries] = {}
        self.stop: JobFatalError | None = None
        self._last_status: dict[int, str | None] = {}  # each batch's status at the last poll

    # --- the run -------------------------------------------------------------------------

    async def run_with_signals(self) -> None:
        async with anyio.create_task_group() as group:
            if self.options.handle_signals:
                group.start_soon(self._watch_signals, group.cancel_scope)
            try:
                await self.drive()
            except JobFatalError as exc:
                self.outcome.fatal = exc
                self.log.event("run_stopped", stop=exc.describe())
            except _Stopped:
                assert self.outcome.fatal is not None
                self.log.event("run_stopped", stop=self.outcome.fatal.describe())
            group.cancel_scope.cancel()

    async def _watch_signals(self, scope: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(*STOP_SIGNALS) as signals:
            if not take_early_stops():  # a Ctrl-C during start-up stops at once
                await signals.__anext__()
            # Submitted batches go on at the provider; nothing is lost by not waiting.
            self.outcome.interrupted = True
            scope.cancel()

    async def drive(self) -> None:
        first_round = True
        while True:
            for chunk in self.store.chunks(["planned", "uploaded"]):
                await self.submit(chunk)
            submitted = self.store.chunks(["submitted"])
            if not submitted:
                if not await self.plan_round(
                    retry_failed=first_round and self.options.retry_failed
                ):
                    return
                first_round = False
                continue
            if self.detach:
                # One look: what has ended is collected (its rows planned again if they
                # failed), what has not is left running at the provider.
                await self.wait(submitted, once=True)
                if self.store.chunks(["submitted"]):
                    return
                continue
            await self.wait(submitted)

    async def plan_round(self, *, retry_failed: bool) -> int:
        """Plan every row still without a result into chunks and submit them."""
        job = self.job
        plan = job.plan(self.checkpoint, retry_failed=retry_failed)
        folder = job.run_dir.batches
        count = 0
        pieces = plan_chunks(
            plan.requests(),
            self.provider,
            self.api,
            self.store,
            folder,
            self.settings.model,
            max_attempts=self.max_attempts,
        )
        for piece in pieces:
            if isinstance(piece, list):
                await self._record(piece)
                continue
            count += 1
            await self.submit(piece)
        if not self.sent and not self.counters.rows_finished:
            self.reused = plan.reused
            self.counters.rows_reused = plan.reused
        self.sent += plan.planned
        return count

    async def submit(self, chunk: Chunk) -> None:
        """Move a planned or uploaded chunk to submitted, committing each step."""
        path = anyio.Path(_path(chunk))
        metadata = {"pipeline_job": self.fingerprint, "pipeline_chunk": str(chunk.chunk_id)}
        if chunk.state == "planned":
            if not await path.exists():
                # The run died before the file was complete: plan these rows again.
                self.store.drop_items(chunk.chunk_id)
                self.store.update(chunk.chunk_id, state="dropped")
                return
            upload = self.api.upload
            file_id = await self._call(lambda: upload(_path(chunk)))
            chunk = self.store.update(chunk.chunk_id, state="uploaded", file_id=file_id)
        state = await self._create(chunk, metadata)
        self.tally.submitted.append(chunk.chunk_id)
        if self.outcome.first_sent_at is None:
            self.outcome.first_sent_at = anyio.current_time()
        self.progress.note(
            f"submitted: batch {state.batch_id} ({chunk.requests:,} requests); "
            f"polling every {self.poll_s:g} s"
        )
        self.log.event(
            "batch_submitted", chunk=chunk.chunk_id, batch=state.batch_id, requests=chunk.requests
        )
        await path.unlink(missing_ok=True)

    async def _create(self, chunk: Chunk, metadata: dict[str, str]) -> BatchState:
        """Create the chunk's batch and commit its id, adopting one a killed run created."""
        find = self.api.find
        since = chunk.created_at - 60
        state: BatchState | None = None
        if self.api.has_metadata:
            # A run killed between create and commit left a batch: adopt it, never pay twice.
            state = await self._call(lambda: find(metadata, since))
        attempt = 0
        while state is None:
            attempt += 1
            try:
                with anyio.CancelScope(shield=True):
                    state = await self.api.create(_path(chunk), chunk.file_id, metadata)
                    self._commit_submitted(chunk, state)
            except TransportError as exc:
                # The batch may exist even though its answer was lost.
                if self.api.has_metadata:
                    state = await self._call(lambda: find(metadata, since))
                if state is None:
                    await self._pause(attempt, exc)
            except RetryableError as exc:
                await self._pause(attempt, exc)
            except JobFatalError:
                raise
            except ProviderError as exc:
                self.store.update(chunk.chunk_id, state="failed", detail=exc.describe())
                self.store.drop_items(chunk.chunk_id)
                raise BatchRejected(
                    f"the provider refused a batch of {chunk.requests} requests: {exc.describe()}"
                ) from exc
        self._commit_submitted(chunk, state)
        return state

    def _commit_submitted(self, chunk: Chunk, state: BatchState) -> None:
        self.store.update(
            chunk.chunk_id, state="submitted", batch_id=state.batch_id, status=state.status
        )

    async def _pause(self, attempt: int, error: RetryableError) -> None:
        delay = self.policy.delay(attempt, error)
        if delay is None:
            raise JobStoppedByApi(error) from error
        await anyio.sleep(delay)

    async def wait(self, chunks: list[Chunk], *, once: bool = False) -> None:
        """Poll every open batch until it ends (or, `once`, look once), collecting each as
        it does."""
        pending = {chunk.chunk_id: chunk for chunk in chunks}
        failures = 0
        while pending:
            for chunk_id, chunk in list(pending.items()):
                assert chunk.batch_id is not None
                try:
                    state = await self.api.retrieve(chunk.batch_id)
                except RetryableError as exc:
                    failures += 1
                    self.log.event("batch_poll_failed", batch=chunk.batch_id, error=exc.describe())
                    break
                except ProviderError as exc:
                    if exc.status == 404:
                        raise self._lost(chunk) from exc
                    if isinstance(exc, JobFatalError):
                        raise
                    raise JobStoppedByApi(exc) from exc
                failures = 0
                self._say_if_changed(chunk, state)
                self.store.update(
                    chunk_id, status=state.status, done=state.done, failed=state.failed
                )
                self.tally.live[chunk_id] = state.done + state.failed
                if state.ended:
                    await self.collect(chunk, state)
                    del pending[chunk_id]
            self._show()
            if once:
                return
            if pending:
                backoff = self.poll_s * 2**failures if failures else self.poll_s
                await anyio.sleep(min(backoff, max(MAX_POLL_BACKOFF_S, self.poll_s)))

    def _say_if_changed(self, chunk: Chunk, state: BatchState) -> None:
        """A line each time a poll finds a batch in a new state."""
        if self._last_status.get(chunk.chunk_id, chunk.status) == state.status:
            return
        self._last_status[chunk.chunk_id] = state.status
        answered = state.done + state.failed
        self.progress.note(
            f"batch {state.batch_id}: {state.status}, {answered:,}/{chunk.requests:,} answered"
        )

    def _lost(self, chunk: Chunk) -> BatchNotFound:
        """A batch the provider no longer knows: its rows go back to be planned again."""
        self.store.update(chunk.chunk_id, state="failed", detail="not found at the provider")
        self.store.drop_items(chunk.chunk_id)
        self.log.event("batch_not_found", chunk=chunk.chunk_id, batch=chunk.batch_id)
        return BatchNotFound(
            f"batch not found: {chunk.batch_id} ({chunk.requests:,} requests) is unknown to "
            "the provider",
            status=404,
        )

    async def collect(self, chunk: Chunk, state: BatchState) -> None:
        if state.rejected:
            shown = "; ".join(
                f"line {e.get('line')}: {e.get('message')}"
                if e.get("line")
                else str(e.get("message"))
                for e in state.errors[:10]
            )
            more = f" (and {len(state.errors) - 10} more)" if len(state.errors) > 10 else ""
            self.store.update(chunk.chunk_id, state="failed", detail=shown + more)
            raise BatchRejected(
                f"batch {state.batch_id} ({chunk.requests} requests) failed validation: "
                f"{shown or state.status}{more}"
            )
        lines: list[ResultLine] = []

        async def stream() -> None:
            lines.clear()
            async for line in self.api.results(state):
                lines.append(line)
                if len(lines) >= RECORD_ROWS:
                    await self._record_lines(chunk, lines)
                    lines.clear()
            await self._record_lines(chunk, lines)

        # Rewriting a row with the same result is harmless: a failed download starts over.
        await self._call(stream)
        self.store.update(chunk.chunk_id, state="collected", status=state.status)
        self.outcome.last_answer_at = anyio.current_time()
        self.tally.live.pop(chunk.chunk_id, None)
        self.log.event(
            "batch_collected", chunk=chunk.chunk_id, batch=state.batch_id, status=state.status
        )
        if self.stop is not None:
            # A line said no row can succeed (a rejected key, an unknown model): its rows
            # stay pending for the rerun after the fix, and no new batch is sent.
            raise explained(self.stop, self.settings)
        cancelled_at = float(self.checkpoint.get_meta(CANCELLED_AT) or 0)
        if (state.status == "cancelled" or self.canceled_lines) and cancelled_at >= self.started:
            # Cancelled while this run waited: stop. A later run sends the rows again.
            raise BatchesCancelled(f"batch {state.batch_id} was cancelled")

    async def _record_lines(self, chunk: Chunk, lines: list[ResultLine]) -> None:
        if not lines:
            return
        items = self.store.items(chunk.chunk_id, [line.custom_id for line in lines])
        results: list[RowResult] = []
        for line in lines:
            item = items.get(line.custom_id)
            if item is None:
                continue  # not one of ours: nothing to record
            result = self._row_result(item, line)
            if result is not None:
                results.append(result)
        await self._record(results)

    def _row_result(self, item: Item, line: ResultLine) -> RowResult | None:
        """The row's result, or None when it goes into a later batch (or stays pending)."""
        answer: Completion | ProviderError
        if line.status == EXPIRED:
            answer = BatchExpired("the batch window ended before this request ran")
        elif line.status == CANCELED:
            self.canceled_lines += 1
            return None  # cancelled by the user: the row stays pending
        else:
            try:
                answer = self.provider.parse_body(int(line.status), line.body)
            except ProviderError as exc:
                answer = exc
        row = (item.row_key, item.request_hash)
        earlier = self.tries.pop(row, None) or RowTries()
        tries = RowTries(item.attempt, earlier.schema_failures, earlier.spend)
        # A batch retry is the row in a later batch: the decision's `when` means nothing here.
        decision = decide(answer, tries, self.rules, row=_ItemRow(item), now=0.0)
        if isinstance(decision, Finished):
            return decision.result
        if isinstance(decision, Stop):
            self.stop = self.stop or decision.error  # the row stays pending; the job stops
            return None
        self.tries[row] = decision.tries
        self.tally.retried += 1
        return None

    async def _record(self, results: list[RowResult]) -> None:
        """Results go through the same sink as an online run's answers."""
        for result in results:
            self.sink.land(result)
        await self.sink.commit()
        if self.outcome.fatal is not None:
            raise _Stopped()

    async def _committed(self, batch: list[RowResult]) -> None:
        if self.options.on_result is not None:
            for result in batch:
                self.options.on_result(result)
        self._show()

    def _stop(self, stop: JobStopped) -> None:
        if self.outcome.fatal is None:
            self.outcome.fatal = stop

    def _show(self) -> None:
        # The bar also counts answers the provider reports for batches still open.
        live = sum(self.tally.live.values())
        shown = dataclasses.replace(self.counters, rows_finished=self.counters.rows_finished + live)
        self.progress.update(shown, reused=self.reused, retries=self.tally.retried)

    async def _call(self, step: Callable[[], Awaitable[T]]) -> T:
        """One API step, retried on transient failures; job-fatal errors propagate."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await step()
            except RetryableError as exc:
                delay = self.policy.delay(attempt, exc)
                if delay is None:
                    raise JobStoppedByApi(exc) from exc
                self.log.event("batch_call_retried", error=exc.describe(), wait_s=delay)
                await anyio.sleep(delay)
            except ProviderError as exc:
                if isinstance(exc, JobFatalError):
                    raise
                raise JobStoppedByApi(exc) from exc

    # --- the end -------------------------------------------------------------------------

    def finish(self, wall_s: float) -> RunSummary:
        job = self.job
        output_path = None
        outcome = self.outcome
        detached = 0
        if outcome.fatal is not None:
            end = RunEnd.STOPPED
        elif outcome.interrupted:
            end = RunEnd.INTERRUPTED
            self.notes.append(
                "stopped waiting: the submitted batches go on at the provider; "
                "rerun the same command to collect their results"
            )
        elif self.detach and (open_batches := self.store.chunks(["submitted"])):
            end = RunEnd.ALL_OK
            detached = len(open_batches)
            self.notes.append(
                f"submitted: {detached} batch(es) are running at the provider "
                "(results within 24 h); `pipeline status` shows them; rerunning the same "
                "command collects them (without --detach it waits for them, with it it "
                "collects those that have ended)"
            )
        elif not self.options.write_output:
            end = RunEnd.ROWS_FAILED if self.counters.rows_failed else RunEnd.ALL_OK
        else:
            output_path = assemble_output(job, self.checkpoint)
            end = RunEnd.ROWS_FAILED if count_failed(output_path) else RunEnd.ALL_OK
        outcome.retries = self.tally.retried
        self.counters.requests_sent = self.sent  # requests put into batches this run
        return RunSummary(
            rows=job.rows,
            reused=self.reused,
            sent=self.sent,
            totals=self.checkpoint.totals(),
            outcome=outcome,
            wall_s=wall_s,
            output_path=output_path,
            end=end,
            fatal=outcome.fatal,
            run_cost=self.counters.cost_usd,
            run_failed=self.counters.rows_failed,
            notes=self.notes,
            counters=self.counters,
            output_uri=job.output_uri if output_path is not None else None,
            open_batches=detached,
        )


class _Stopped(Exception):
    """The sink stopped the run (a write failed); `outcome.fatal` says why."""


class JobStoppedByApi(JobFatalError):
    """A batch API call kept failing or was refused."""

    kind = "batch_api_error"
    advice = "check the provider's status and the job's provider settings, then rerun"

    def __init__(self, cause: ProviderError) -> None:
        super().__init__(cause.describe(), status=cause.status)


@dataclass(frozen=True, slots=True)
class _ItemRow:
    """A batch item as the row `decide` answers for."""

    item: Item

    @property
    def index(self) -> int:
        return self.item.row_index

    @property
    def key(self) -> str:
        return self.item.row_key

    @property
    def request_hash(self) -> str:
        return self.item.request_hash


class BatchNotFound(JobFatalError):
    """The provider no longer knows a batch this job submitted (deleted or expired there,
    or held by a server that has since stopped)."""

    kind = "batch_not_found"
    advice = "resubmit with `pipeline run --batch`, which sends only the rows of lost batches"


def _line_error(error: dict[str, object]) -> str:
    where = f"line {error.get('line')}: " if error.get("line") else ""
    return f"{where}{error.get('message')}"


def _batch_api(settings: ProviderSettings, connection: Connection) -> BatchApi:
    """The batch API on the run's HTTP client, authenticated as the adapter is."""
    return make_api(settings, connection.client, getattr(connection.provider, "headers", {}))


def _path(chunk: Chunk) -> Path:
    if chunk.path is None:
        raise SpecError(f"batch chunk {chunk.chunk_id} has no request file")
    return Path(chunk.path)


# --- outside a run: status and cancel ---------------------------------------------------


def batch_chunks(job: ResolvedJob) -> list[Chunk]:
    """Every batch of the job as last seen (empty before its first batch run)."""
    if not job.checkpoint_path.exists():
        return []
    return read_chunks(job.checkpoint_path)


async def cancel_batches(job: ResolvedJob) -> list[tuple[Chunk, BatchState]]:
    """Ask the provider to cancel every open batch of the job."""
    if not job.checkpoint_path.exists():
        return []
    store = BatchStore(job.checkpoint_path)
    cancelled: list[tuple[Chunk, BatchState]] = []
    store.set_meta(CANCELLED_AT, repr(time.time()))
    try:
        settings = dataclasses.replace(job.settings, stream=False)
        timeout_s = job.spec.limits.timeout_s
        async with open_connection(settings, connections=4, timeout_s=timeout_s) as connection:
            api = _batch_api(settings, connection)
            for chunk in store.chunks(["submitted"]):
                assert chunk.batch_id is not None
                state = await api.cancel(chunk.batch_id)
                store.update(chunk.chunk_id, status=state.status)
                cancelled.append((chunk, state))
    finally:
        store.close()
    return cancelled
