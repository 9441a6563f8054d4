"""What the recorded results say about a job, running or not: `status` and `export`.

Reads a checkpoint, or anything else that answers the same look-ups (a cluster's
segments), through the job's own planner and the one output writer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import Checkpoint, Fetched, Finished, Totals
from pipeline.counters import RUN_STATE_META, RunState
from pipeline.errors import SpecError
from pipeline.identity import open_checkpoint
from pipeline.job import ResolvedJob
from pipeline.output import write_output
from pipeline.store import ResultStore


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


def status(job: ResolvedJob, *, window_s: float = 60.0) -> Status | None:
    """What the job's checkpoint, and those of its `--limit` runs, say about it, running
    or not; None before its first run."""
    with _runs_of(job) as runs:
        return None if runs is None else status_of(job, runs, window_s=window_s)


@contextmanager
def _runs_of(job: ResolvedJob) -> Iterator[RunsOfAJob | None]:
    """The job's checkpoint, then its `--limit` runs', opened for reading."""
    paths = [job.checkpoint_path, *(run.checkpoint for run in job.related_runs)]
    opened = [open_checkpoint(path) for path in paths if path.exists()]
    try:
        yield RunsOfAJob(opened) if opened else None
    finally:
        for checkpoint in opened:
            checkpoint.close()


@dataclass
class RunsOfAJob:
    """The checkpoints of one job's runs (its own, then its `--limit` runs') read as one:
    a row counts once, with the first result found for it."""

    checkpoints: list[Checkpoint]

    def finished(self, keys: list[str]) -> dict[str, Finished]:
        found: dict[str, Finished] = {}
        for checkpoint in reversed(self.checkpoints):
            found.update(checkpoint.finished(keys))
        return found

    def fetch(
        self, keys: list[str], names: Sequence[str], hashes: list[str] | None = None
    ) -> Fetched:
        """The first run's stored values; rows it lacks, from the others in turn."""
        first, *others = self.checkpoints
        found = first.fetch(keys, names, hashes)
        for other in others:
            found = found.filled_from(other.fetch(keys, names, hashes))
        return found

    def totals(self) -> Totals:
        first, *others = self.checkpoints
        total = first.totals()
        for other in others:
            total = total + other.totals(beyond=first)
        return total

    def recent(self, window_s: float) -> tuple[int, float | None]:
        seen = [checkpoint.recent(window_s) for checkpoint in self.checkpoints]
        stamps = [last for _, last in seen if last is not None]
        return sum(count for count, _ in seen), max(stamps) if stamps else None

    def get_meta(self, name: str) -> str | None:
        """The newest run's value: the run state of whichever run last recorded itself."""
        values = [checkpoint.get_meta(name) for checkpoint in self.checkpoints]
        if name != RUN_STATE_META:
            return values[0]
        states = [(RunState.loads(v), v) for v in values if v]
        newest = max(states, key=lambda pair: pair[0].updated_at if pair[0] else 0.0, default=None)
        return newest[1] if newest else None


def status_of(job: ResolvedJob, checkpoint: ResultStore, *, window_s: float = 60.0) -> Status:
    """What these results (a checkpoint, or a cluster's segments) say about a job."""
    totals = checkpoint.totals()
    recent, last = checkpoint.recent(window_s)
    ok, failed, pending = job.plan(checkpoint).tally()
    run = RunState.loads(checkpoint.get_meta(RUN_STATE_META))
    running = run is not None and run.running
    run_pending = None
    if run is not None and running and run.limit is not None and run.limit < job.rows:
        limited = dataclasses.replace(job, limit=run.limit, rows=run.rows)
        run_pending = limited.plan(checkpoint).tally()[2]
    rate = _rate(recent, last, run, window_s)
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


def _rate(recent: int, last: float | None, run: RunState | None, window_s: float) -> float:
    """Rows a second over the trailing window, or over the run's life when it is younger:
    a run 8 s old that finished 500 rows does 62 a second, not 8."""
    now = time.time()
    if last is None or now - last >= window_s:
        return 0.0
    span = window_s
    if run is not None and run.running:
        span = min(window_s, max(1.0, now - run.started_at))
    return recent / span


def export_partial(job: ResolvedJob, path: Path) -> int:
    """Write the rows finished so far to `path`; safe while the job runs."""
    with _runs_of(job) as runs:
        if runs is None:
            raise SpecError(
                f"no results yet for {job.spec.name}: {job.checkpoint_path} does not exist"
            )
        return export_from(job, runs, path)


def export_from(job: ResolvedJob, checkpoint: ResultStore, path: Path) -> int:
    """Write the rows these results (a checkpoint, or a cluster's segments) finished."""
    return write_output(
        job.table,
        checkpoint,
        path,
        job.limit,
        layout=job.layout,
        finished_only=True,
        hashes=job.plan(checkpoint).hashes_for,
    )
