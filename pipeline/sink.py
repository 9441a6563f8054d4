"""The one result sink every executor's workers feed.

A finished row is made durable the moment it lands (a journal line in the page cache:
it survives kill -9 with no system call per answer), and committed in batches together
with the run log's lines and the run's meta values. Where rows are committed is a
`Record`: the job's checkpoint on one machine (`CheckpointRecord`), a shard's
segments on a cluster (`cluster.segments.ShardRecord`). What happens after a commit
(progress, callbacks, reports to the cluster's limiter) is the caller's `on_commit`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from pipeline.checkpoint import Checkpoint, Sealed
from pipeline.counters import RunCounters
from pipeline.errors import JobStopped, WriteFailed
from pipeline.runlog import RunLog
from pipeline.types import RowResult


class Record(Protocol):
    """Durable storage of finished rows: landed one by one, committed in batches."""

    def land(self, result: RowResult) -> None:
        """Keep the row durably at once (it survives the process being killed)."""
        ...

    def seal(self) -> Sealed:
        """Everything landed since the last seal; call on the thread that lands rows."""
        ...

    def commit(self, sealed: Sealed, meta: dict[str, str], log_lines: list[bytes]) -> None:
        """Commit sealed rows with the run's meta values and log lines (in a thread)."""
        ...


@dataclass
class CheckpointRecord:
    """The job's checkpoint and run log, on one machine."""

    checkpoint: Checkpoint
    log: RunLog

    def land(self, result: RowResult) -> None:
        self.checkpoint.land(result)

    def seal(self) -> Sealed:
        return self.checkpoint.seal()

    def commit(self, sealed: Sealed, meta: dict[str, str], log_lines: list[bytes]) -> None:
        self.checkpoint.commit(sealed, meta)
        self.log.write(log_lines)


@dataclass
class Recorder:
    """The scheduler's `ResultSink`: lands each row in the record, commits in batches,
    counts what was committed, then tells `on_commit`. A write that fails (a full disk)
    stops the run: answers bought now could not be kept, so no more are sent."""

    record: Record
    log: RunLog
    counters: RunCounters
    stop: Callable[[JobStopped], None]
    meta: Callable[[], dict[str, str]] = dict
    on_commit: Callable[[list[RowResult]], Awaitable[None]] | None = None
    # Draws the progress display; the scheduler's heartbeat calls it while nothing lands.
    on_show: Callable[[bool], None] | None = None
    _landed: list[RowResult] = field(default_factory=list)

    def land(self, result: RowResult) -> int:
        try:
            self.record.land(result)
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
            sealed = self.record.seal()
            meta, lines = self.meta(), self.log.take()
            await anyio.to_thread.run_sync(self.record.commit, sealed, meta, lines)
        except (OSError, sqlite3.Error) as exc:
            self._failed_write(exc)
            return 0
        for result in batch:
            self.counters.row_finished(result)
        if self.on_commit is not None:
            await self.on_commit(batch)
        return len(batch)

    def show(self, force: bool = False) -> None:
        if self.on_show is not None:
            self.on_show(force)

    def _failed_write(self, exc: OSError | sqlite3.Error) -> None:
        self.stop(WriteFailed.while_("recording finished rows", exc))
