"""Rows streaming between consecutive map steps.

A run of map steps with no reduce between them does not wait for a step to finish
before the next starts: the rows are cut into waves, and each step takes a wave as
soon as the step before it has answered every row of it. All the steps' pools send
at once from one event loop, so they share what must be shared: one pacer per
provider account and model (the provider's limits hold for the steps together), one
spending limit across the steps (`budget.SharedBudget`: requests in flight in any
step count against it), and one watcher of the stop signals.

Each wave of a step is an ordinary run of the step's job (`steps.resolve_step`) on the
local executor over that wave's rows: the step's one record, keyed by request hash,
holds every answer, so a kill anywhere resumes without paying twice. What the finished
waves hold is written to `RunDir.streaming` after each, so `status` counts every row a
step has taken, not only its current wave's (`streamed_status`). When
every wave is through, the chain runs each step over all its rows as before
(`steps_run.py`): every answer is reused, nothing is sent, and the step's output and
the job's outputs are written from the records as for any run.

A reduce step is a barrier (it needs all of its rows); batch (`--batch`) and cluster
(`--ray`) runs keep a barrier between steps too: a batch is collected whole, and a
cluster run shards all of its rows at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import polars as pl
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.budget import SharedBudget
from pipeline.embedded import SharedSimulators
from pipeline.executor import LocalExecutor, root_cause
from pipeline.job import ResolvedJob
from pipeline.progress import clock, log_interval
from pipeline.ratelimit import SharedPacers
from pipeline.runs import SEVERITY, RunEnd, RunOptions, RunSummary
from pipeline.scheduler import StopHub, catch_stops_early
from pipeline.spec import StepSpec
from pipeline.steps import ROW_COLUMN, Chain, empty_answers, join_step, resolve_step, step_rows
from pipeline.types import RowResult

WAVES = 16  # waves per streamed run: more overlap, against a run's start-up cost each
MIN_WAVE_ROWS = 250
WAVE_ROWS_ENV = "PIPELINE_STEP_WAVE_ROWS"  # a fixed wave size, overriding the two above

Wave = tuple[int, pl.DataFrame]  # (its number, its rows with the earlier steps' columns)


def wave_rows(rows: int) -> int:
    """How many rows a wave has for a job of `rows` rows."""
    fixed = os.environ.get(WAVE_ROWS_ENV, "")
    if fixed.isdigit() and int(fixed) > 0:
        return int(fixed)
    return max(MIN_WAVE_ROWS, math.ceil(rows / WAVES))


def streamed_steps(chain: Chain, start: int) -> list[StepSpec]:
    """The map steps from position `start` on that stream into each other: up to the
    next reduce step, when there are two or more and the rows make more than one wave."""
    segment: list[StepSpec] = []
    for step in chain.steps[start:]:
        if step.reduce is not None:
            break
        segment.append(step)
    rows = chain.frame.height
    return segment if len(segment) > 1 and rows > wave_rows(rows) else []


@dataclass
class StreamedStep:
    """What one step did over the waves: the runs it made, the rows it covered."""

    step: StepSpec
    runs: list[RunSummary] = field(default_factory=list)
    rows: int = 0
    skipped: int = 0
    sent_rows: int = 0  # rows answered (or failed) by a request of this streaming pass
    # As rows land, for the progress line and `status`: rows of its finished waves and
    # how many of them ended in error, the last input row they reach, rows answered in
    # the wave it is on, and this pass's failures and cost.
    done: int = 0
    done_failed: int = 0
    through: int = -1
    landed: int = 0
    failed: int = 0
    cost_usd: float = 0.0

    def wave_done(self, answered: pl.DataFrame, through: int) -> None:
        self.done, self.landed, self.through = self.rows, 0, through
        self.done_failed += answered.height - answered.get_column("error").null_count()

    def count(self, result: RowResult) -> None:
        self.landed += 1
        self.failed += not result.ok
        self.cost_usd += result.cost_usd or 0.0

    @property
    def end(self) -> RunEnd:
        ends = [run.end for run in self.runs] or [RunEnd.ALL_OK]
        return max(ends, key=SEVERITY.index)

    def summary(self) -> RunSummary | None:
        """The waves' runs as one (None before the first wave ran)."""
        if not self.runs:
            return None
        last = self.runs[-1]
        unfinished = next((run for run in self.runs if not run.finished), last)
        return dataclasses.replace(
            unfinished,
            rows=self.rows,
            reused=sum(run.reused for run in self.runs),
            deduplicated=sum(run.deduplicated for run in self.runs),
            sent=sum(run.sent for run in self.runs),
            totals=last.totals,
            wall_s=sum(run.wall_s for run in self.runs),
            run_cost=sum(run.run_cost for run in self.runs),
            run_failed=sum(run.run_failed for run in self.runs),
        )


@dataclass
class StreamResult:
    """The streaming pass: each step's account, in order, and how the pass ended."""

    steps: list[StreamedStep]

    @property
    def end(self) -> RunEnd:
        return max((s.end for s in self.steps), key=SEVERITY.index, default=RunEnd.ALL_OK)

    @property
    def finished(self) -> bool:
        return self.end in (RunEnd.ALL_OK, RunEnd.ROWS_FAILED)


Say = Callable[[str], None]  # a line for the operator


def stream(
    chain: Chain,
    steps: list[StepSpec],
    frame: pl.DataFrame,
    options: RunOptions,
    budget: SharedBudget | None,
    say: Say,
) -> StreamResult:
    """Every wave of `frame` through `steps`, each step starting on a wave as soon as
    the one before has answered it. Blocking: runs its own event loop."""
    # The first step's `when` sees only columns known now: a row it fails on is refused
    # before anything is sent (a later step's, on the wave that reaches the row).
    step_rows(chain, steps[0], frame)
    pass_ = _StreamPass(chain, steps, options, budget, say)
    state = chain.layout.run_dir.streaming
    state.unlink(missing_ok=True)  # a stopped pass's account: this one counts afresh
    try:
        with catch_stops_early() if options.handle_signals else nullcontext():
            anyio.run(pass_.run, frame, backend="asyncio", backend_options={"use_uvloop": True})
    except BaseExceptionGroup as group:
        # A step's error (a `when` failing on a row, a crash) is the one the caller knows,
        # not the task group's wrapping of it.
        raise root_cause(group) from None
    return StreamResult(pass_.accounts)


class _StreamPass:
    def __init__(
        self,
        chain: Chain,
        steps: list[StepSpec],
        options: RunOptions,
        budget: SharedBudget | None,
        say: Say,
    ) -> None:
        self.chain, self.steps, self.say = chain, steps, say
        self.options = options
        self.budget = budget
        self.accounts = [StreamedStep(step) for step in steps]
        self.stopping = False
        self.hub = StopHub()
        self.pacers = options.pacers or SharedPacers()
        self.simulators = SharedSimulators()

    async def run(self, frame: pl.DataFrame) -> None:
        self._writing = anyio.Lock()
        size = wave_rows(frame.height)
        waves = math.ceil(frame.height / size)
        names = ", ".join(step.name for step in self.steps)
        self.say(f"streaming steps {names}: {frame.height:,} rows in {waves} waves of {size:,}")
        with self.simulators:
            async with anyio.create_task_group() as watching:
                if self.options.handle_signals:
                    watching.start_soon(self.hub.watch)
                if self.options.show_progress:
                    watching.start_soon(self._heartbeat, frame.height)
                async with anyio.create_task_group() as group:
                    sends, receives = _links(len(self.steps))
                    for index in range(len(self.steps)):
                        onward = sends[index + 1] if index + 1 < len(self.steps) else None
                        group.start_soon(self._step, index, receives[index], onward)
                    with sends[0]:
                        for number, start in enumerate(range(0, frame.height, size)):
                            if not await _pass_on(sends[0], (number, frame.slice(start, size))):
                                break
                watching.cancel_scope.cancel()

    async def _step(
        self,
        index: int,
        waves: MemoryObjectReceiveStream[Wave],
        onward: MemoryObjectSendStream[Wave] | None,
    ) -> None:
        """One step's waves, in order, each passed on as soon as it is answered."""
        account = self.accounts[index]
        with waves, onward if onward is not None else nullcontext():
            async for number, wave in waves:
                if self.stopping or self.hub.received:
                    return
                joined = await self._wave(account, wave)
                if joined is None:
                    self.stopping = True  # the other steps finish the waves they hold
                    return
                if onward is not None and not await _pass_on(onward, (number, joined)):
                    return

    async def _wave(self, account: StreamedStep, wave: pl.DataFrame) -> pl.DataFrame | None:
        """One wave through one step: the wave with the step's columns joined, or None
        when the step's run stopped."""

        step = account.step
        step_input = step_rows(self.chain, step, wave)
        account.rows += step_input.height
        account.skipped += wave.height - step_input.height
        if step_input.height == 0:
            return join_step(wave, step, self.chain, empty_answers(step, self.chain.spec))
        job = await anyio.to_thread.run_sync(self._resolve, step, step_input)
        summary = await LocalExecutor().arun(job, self._options_for(account))
        account.runs.append(summary)
        account.sent_rows += summary.rows - summary.reused - summary.deduplicated
        if not summary.finished:
            self._show(account)
            return None
        answered = await anyio.to_thread.run_sync(pl.read_parquet, job.output_path)
        account.wave_done(answered, through=wave.select(pl.col(ROW_COLUMN).max()).item())
        await self._write_state()
        self._show(account)
        return join_step(wave, step, self.chain, answered)

    async def _write_state(self) -> None:
        # Taken now and written in turn: the file never goes back to an older account.
        state = account_of(self.accounts)
        async with self._writing:
            await anyio.to_thread.run_sync(write_state, self.chain.layout.run_dir.streaming, state)

    def _resolve(self, step: StepSpec, step_input: pl.DataFrame) -> ResolvedJob:
        job = resolve_step(self.chain.spec, step, step_input, self.chain.layout)
        return self.simulators.serve(job)

    def _options_for(self, account: StreamedStep) -> RunOptions:
        # `--fresh` sets a step's record aside once, before its first wave, not before each.
        return dataclasses.replace(
            self.options,
            fresh=self.options.fresh and not account.runs,
            show_progress=False,
            handle_signals=False,
            write_output=True,
            signals=self.hub,
            pacers=self.pacers,
            budget=self.budget,
            on_result=partial(self._landed, account),
        )

    def _landed(self, account: StreamedStep, result: RowResult) -> None:
        account.count(result)
        if self.options.on_result is not None:
            self.options.on_result(result)

    async def _heartbeat(self, rows: int) -> None:
        """A progress line every few seconds: waves can take minutes each."""
        started = anyio.current_time()
        while True:
            await anyio.sleep(log_interval())
            self.say(self._progress(rows, anyio.current_time() - started))

    def _progress(self, rows: int, elapsed: float) -> str:
        first = self.accounts[0]
        through = first.done + first.landed
        seen = first.skipped + through
        # Rows answered by a request: rows found in the record take no time to come.
        rate = (first.sent_rows + first.landed) / max(elapsed, 1e-9)
        left = "time left unknown" if rate <= 0 else f"{clock((rows - seen) / rate)} left"
        steps = ", ".join(f"{a.step.name} {a.done + a.landed:,}/{a.rows:,}" for a in self.accounts)
        failed = sum(a.failed for a in self.accounts)
        cost = sum(a.cost_usd for a in self.accounts)
        return (
            f"progress: {seen:,}/{rows:,} rows into {first.step.name}, {left} there; rows "
            f"answered of those taken: {steps}; failed {failed:,}; ${cost:.4f} this run"
        )

    def _show(self, account: StreamedStep) -> None:
        sent = sum(run.sent for run in account.runs)
        cost = sum(run.run_cost for run in account.runs)
        self.say(
            f"  {account.step.name}: {account.rows:,} row(s) through, {sent:,} request(s) "
            f"sent, ${cost:.6f}"
        )


def _links(
    count: int,
) -> tuple[list[MemoryObjectSendStream[Wave]], list[MemoryObjectReceiveStream[Wave]]]:
    """A stream into each step; unbounded, as every row is in memory already."""
    sends, receives = [], []
    for _ in range(count):
        send, receive = anyio.create_memory_object_stream[Wave](math.inf)
        sends.append(send)
        receives.append(receive)
    return sends, receives


async def _pass_on(onward: MemoryObjectSendStream[Wave], wave: Wave) -> bool:
    """Hand a wave to the next step; False once that step has stopped taking waves."""
    try:
        await onward.send(wave)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        return False
    return True


def account_of(accounts: list[StreamedStep]) -> dict[str, dict[str, int]]:
    """Each step's finished waves: rows taken (all finished), failed, the last input row."""
    return {
        account.step.name: {
            "rows": account.done,
            "failed": account.done_failed,
            "through": account.through,
        }
        for account in accounts
    }


def write_state(path: Path, state: dict[str, dict[str, int]]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state))
    os.replace(temporary, path)


def read_state(path: Path) -> dict[str, dict[str, int]]:
    """What `write_state` wrote, or nothing when no rows are streaming."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}
