"""What a run is asked to do (`RunOptions`) and how it ended (`RunEnd`, `RunSummary`):
the same for every executor (local pool, provider batch, Ray shards).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from pipeline.budget import SharedBudget
from pipeline.checkpoint import Totals
from pipeline.counters import RunCounters
from pipeline.errors import JobFatalError, JobStopped
from pipeline.ratelimit import SharedPacers
from pipeline.scheduler import Outcome, StopHub
from pipeline.types import RowResult


class RunEnd(Enum):
    """How a run ended. The CLI maps it to an exit code; the Python API returns the
    output for the first two and raises `RunFailed` for the others. (An unexpected
    error is not an end: it leaves `execute` as `RunCrashed`.)"""

    ALL_OK = "every row has an answer"
    ROWS_FAILED = "finished, with some rows in error"
    STOPPED = "stopped by a job-level failure"
    INTERRUPTED = "interrupted"


# How runs that end differently end together (a job's steps): the most serious end wins.
SEVERITY = [RunEnd.ALL_OK, RunEnd.ROWS_FAILED, RunEnd.STOPPED, RunEnd.INTERRUPTED]


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
    open_batches: int = 0  # batches `--detach` left running at the provider
    counters: RunCounters = field(default_factory=RunCounters)

    @property
    def finished(self) -> bool:
        """Every row has a result (an answer or its error)."""
        return self.end in (RunEnd.ALL_OK, RunEnd.ROWS_FAILED)

    @property
    def why_unfinished(self) -> str:
        return self.fatal.describe() if self.fatal else self.end.value


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
    # Runs sending at once from one event loop (streaming steps) share these: one
    # watcher of the stop signals, one pacer per provider account and model, and the
    # job's spending limits.
    signals: StopHub | None = None
    pacers: SharedPacers | None = None
    budget: SharedBudget | None = None


def rerun_command(job: Path, output: str | Path | None, batch: bool = False) -> str:
    """The command that resumes a run: the same job, output and executor."""
    return (
        f"pipeline run {shlex.quote(str(job))}"
        + (f" --output {shlex.quote(str(output))}" if output else "")
        + (" --batch" if batch else "")
    )
