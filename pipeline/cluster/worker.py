"""One shard on one Ray worker, with the same engine a local run uses.

The worker rebuilds the job's parts from the spec (templates, request hashes,
schema), reads what its shard already committed, and runs the ordinary `Scheduler`
over the shard's rows with a `LeasedPacer` in place of the local pacer. Each
recorder flush becomes one immutable segment (`segments.py`), so a worker killed at
any moment loses at most the rows it had not yet committed, as a local run does.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio

from pipeline.budget import Budget
from pipeline.checkpoint import Journal
from pipeline.cluster.budget import AllowanceBudget
from pipeline.cluster.limiter import Lease, LeasedPacer, WorkerReport
from pipeline.cluster.segments import ShardRecord, ShardStore, StateRoot
from pipeline.cluster.shards import Shard
from pipeline.connect import open_provider
from pipeline.errors import JobFatalError, JobStopped
from pipeline.job import JobParts
from pipeline.retry import RetryPolicy
from pipeline.runlock import JobLocked, RunLock
from pipeline.runlog import RunLog
from pipeline.scheduler import Scheduler
from pipeline.sink import Recorder
from pipeline.types import RowResult


@dataclass(frozen=True)
class ShardTask:
    job: JobParts  # built on the worker, once the storage settings are in place
    shard: Shard
    state: str  # the StateRoot every node shares
    retry_failed: bool
    concurrency: int  # this worker's cap on requests in flight
    environment: dict[str, str]  # object-storage settings the driver had
    layout_id: str = ""  # names the journal when it is kept on the node's own disk


@dataclass
class ShardOutcome:
    shard: int
    planned: int = 0
    reused: int = 0
    retries: int = 0
    rate_limited: int = 0
    fatal: JobFatalError | JobStopped | None = None
    interrupted: bool = False
    first_sent_at: float | None = None  # wall clock
    last_answer_at: float | None = None
    leases: int = 0
    dropped_grants: int = 0
    pid: int = 0
    recovered: int = 0  # answers an earlier worker journaled, committed by this one


LOCK_POLL_S = 0.2
LOCK_WAIT_S = 120.0  # Ray ends a dead driver's workers well within this


def run_shard(task: ShardTask, limiter: Any) -> ShardOutcome:
    """The Ray task's body: run one shard to the end (or to a cluster-wide stop)."""
    os.environ.update(task.environment)

    async def lease(report: WorkerReport, tokens: float) -> Lease:
        return cast(Lease, await limiter.lease.remote(report, tokens))

    async def allow(
        news: WorkerReport, needed: tuple[float, float], wanted: tuple[float, float]
    ) -> tuple[float, float]:
        return cast(tuple[float, float], await limiter.allow.remote(news, needed, wanted))

    async def report(news: WorkerReport, *, wait: bool = True) -> None:
        call = limiter.report.remote(news)  # calls from one worker arrive in order
        if wait:
            await call

    return anyio.run(
        run_shard_async,
        task,
        lease,
        report,
        allow,
        backend="asyncio",
        backend_options={"use_uvloop": True},
    )


async def run_shard_async(
    task: ShardTask, lease: Any, report: Any, allow: Any = None
) -> ShardOutcome:
    store = ShardStore(StateRoot(task.state), task.shard.index)
    journal = store.journal(task.layout_id)
    lock = RunLock(journal.directory)
    await _hold(lock)
    try:
        recovered = await anyio.to_thread.run_sync(store.take_over, journal)
        outcome = await _run_shard(task, store, journal, recovered, lease, report, allow)
        # Everything landed is in a segment now: the journal has nothing to replay.
        journal.close()
        journal.discard_sealed()
        return outcome
    finally:
        journal.close()
        lock.release()


async def _hold(lock: RunLock) -> None:
    """Take the shard's lock, waiting for a worker of an earlier driver that still runs
    it (Ray ends those soon after their driver died): one worker per shard."""
    waited = 0.0
    while True:
        try:
            lock.acquire()
            return
        except JobLocked as exc:
            if waited >= LOCK_WAIT_S:
                raise JobLocked(
                    f"another worker has held this shard for {waited:.0f}s ({exc}); is a "
                    "second driver running the same job on another machine? Stop one"
                ) from None
        await anyio.sleep(LOCK_POLL_S)
        waited += LOCK_POLL_S


async def _run_shard(
    task: ShardTask,
    store: ShardStore,
    journal: Journal,
    recovered: int,
    lease: Any,
    report: Any,
    allow: Any,
) -> ShardOutcome:
    job, shard = task.job.build(), task.shard
    spec, settings, layout = job.spec, job.settings, job.layout
    committed = await anyio.to_thread.run_sync(store.read)
    plan = job.plan(committed, retry_failed=task.retry_failed)
    outcome = ShardOutcome(shard.index, pid=os.getpid(), recovered=recovered)
    worker = f"shard-{shard.index}-{uuid.uuid4().hex[:8]}"
    scheduler: Scheduler | None = None

    def stop() -> None:
        if scheduler is not None:
            scheduler.stop()

    limits = spec.limits
    # The job's limits are the cluster's: this worker spends the allowances it is given.
    budget = AllowanceBudget(Budget(limits.max_cost_usd, limits.max_tokens_total, settings.price))
    pacer = LeasedPacer(
        worker,
        lease,
        max_concurrency=task.concurrency,
        on_stop=stop,
        budget=budget,
        allow=allow,
    )
    log = RunLog(Path(os.devnull), secrets=(settings.api_key or "",))
    log.event(
        "shard_started",
        shard=shard.index,
        rows=shard.rows,
        worker=worker,
        pid=os.getpid(),
        recovered=recovered,  # answers a killed worker journaled: not sent again
    )

    async def after_commit(batch: list[RowResult]) -> None:
        assert scheduler is not None
        pacer.totals.reused = plan.reused
        pacer.totals.retries = scheduler.outcome.retries
        pacer.totals.rate_limited = scheduler.outcome.rate_limited
        if scheduler.outcome.fatal is not None and pacer.stop_reason is None:
            pacer.stop_reason = scheduler.outcome.fatal.describe()
        # Not awaited: the next commit must not wait on the actor.
        await report(pacer.report(), wait=False)

    cap = task.concurrency
    async with open_provider(
        settings, connections=cap, timeout_s=spec.limits.timeout_s
    ) as provider:
        scheduler = Scheduler(
            provider,
            pacer,
            RetryPolicy(max_attempts=spec.limits.max_attempts),
            settings.price,
            concurrency=cap,
            budget=budget,
            log=log,
            schema=layout.schema,
            schema_retries=spec.output.schema_retries,
            counters=pacer.counters,
        )
        # Each commit becomes one immutable segment of the shard.
        sink = Recorder(
            ShardRecord(store, journal),
            log,
            pacer.counters,
            scheduler.fail,
            on_commit=after_commit,
        )
        await scheduler.run(plan.requests_between(shard.start, shard.stop), sink)
    result = scheduler.outcome
    outcome.planned, outcome.reused = pacer.counters.requests_sent, plan.reused
    outcome.retries, outcome.rate_limited = result.retries, result.rate_limited
    outcome.fatal = result.fatal
    outcome.interrupted = result.interrupted and result.fatal is None
    outcome.first_sent_at = _wall(result.first_sent_at)
    outcome.last_answer_at = _wall(result.last_answer_at)
    outcome.leases, outcome.dropped_grants = pacer.leases, pacer.dropped
    log.event(
        "shard_stopped" if result.fatal or result.interrupted else "shard_finished",
        shard=shard.index,
        sent=plan.planned,
        reused=plan.reused,
        retries=result.retries,
        rate_limited=result.rate_limited,
        leases=pacer.leases,
        stop=result.fatal.describe() if result.fatal else None,
    )
    await anyio.to_thread.run_sync(store.commit, [], log.take())
    if result.fatal is not None and pacer.stop_reason is None:
        pacer.stop_reason = result.fatal.describe()
    pacer.totals.reused = plan.reused
    await report(pacer.report(done=True))
    return outcome


def _wall(loop_time: float | None) -> float | None:
    if loop_time is None:
        return None
    return time.time() - (anyio.current_time() - loop_time)
