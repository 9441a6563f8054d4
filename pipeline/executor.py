"""Which executor runs a resolved job, chosen in one place, and running it.

An executor sends the requests a job's plan asks for, feeds every result to the
job's record, and assembles the output: the local pool (`local.py`), the provider's
batch API (`batch/engine.py`) and Ray shards (`cluster/driver.py`) all take the same
`ResolvedJob` and `RunOptions` and return the same `RunSummary`. `executor_for` is
the only place that decides which one runs, and refuses combinations no executor
can honour before anything is sent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import anyio

from pipeline.batch.store import open_batches
from pipeline.embedded import served_in_process
from pipeline.errors import JobStopped, RunCrashed, SpecError
from pipeline.job import ResolvedJob
from pipeline.runlock import RunLock
from pipeline.runs import RunOptions, RunSummary
from pipeline.scheduler import catch_stops_early

DEFAULT_OPTIONS = RunOptions()


class Executor(Protocol):
    """Runs a resolved job to the end (or to a job-level stop) and writes its output."""

    def run(self, job: ResolvedJob, options: RunOptions) -> RunSummary:
        """Blocking: for a command line, which owns the process and its signals."""
        ...

    async def arun(self, job: ResolvedJob, options: RunOptions) -> RunSummary:
        """For code that already runs an event loop (asyncio backend)."""
        ...


@dataclass(frozen=True)
class Cluster:
    """Run on Ray: `address` None starts a local cluster; "auto" or host:port joins one."""

    address: str | None = None
    workers: int | None = None

    def require_ray(self) -> None:
        """SpecError (exit 2) unless Ray can be imported. Called before anything else
        imports it: a local cluster keeps its addresses on loopback only if told first."""
        from pipeline.cluster.driver import require_ray

        require_ray(local=self.address is None)


class _InLoop(ABC):
    """An executor whose work is a coroutine on this process's event loop."""

    def run(self, job: ResolvedJob, options: RunOptions) -> RunSummary:
        # A command line's Ctrl-C before the pool watches for it stops the pool at once.
        with catch_stops_early() if options.handle_signals else nullcontext():
            return anyio.run(
                self.arun, job, options, backend="asyncio", backend_options={"use_uvloop": True}
            )

    async def arun(self, job: ResolvedJob, options: RunOptions) -> RunSummary:
        # The last line of defence: an error nobody expected stops sending (the task
        # group cancels every worker), what finished is committed on the way out, and it
        # comes back as `RunCrashed` with the cause chained.
        try:
            return await self._run(job, options)
        except (SpecError, JobStopped):
            raise
        except Exception as exc:
            cause = root_cause(exc)
            raise RunCrashed(f"{type(cause).__name__}: {cause}", log_path=job.log_path) from cause

    @abstractmethod
    async def _run(self, job: ResolvedJob, options: RunOptions) -> RunSummary:
        """Send, record and assemble."""


class LocalExecutor(_InLoop):
    """A pool of workers in this process."""

    async def _run(self, job: ResolvedJob, options: RunOptions) -> RunSummary:
        from pipeline.local import run_local

        return await run_local(job, options)


class BatchExecutor(_InLoop):
    """The provider's batch API: request files uploaded, batches polled and collected."""

    async def _run(self, job: ResolvedJob, options: RunOptions) -> RunSummary:
        from pipeline.batch.engine import run_batch

        with RunLock(job.run_dir.path):  # one run per job, batch runs too
            return await run_batch(job, options)


@dataclass(frozen=True)
class RayExecutor:
    """Shards on a Ray cluster: the driver runs in this thread (it takes Ctrl-C)."""

    cluster: Cluster

    def run(self, job: ResolvedJob, options: RunOptions) -> RunSummary:
        from pipeline.cluster.driver import ClusterOptions, run_on_ray

        return run_on_ray(job, options, ClusterOptions(self.cluster.address, self.cluster.workers))

    async def arun(self, job: ResolvedJob, options: RunOptions) -> RunSummary:
        return await anyio.to_thread.run_sync(self.run, job, options)


def executor_for(job: ResolvedJob, options: RunOptions, cluster: Cluster | None = None) -> Executor:
    """The executor for this job and these options; SpecError (nothing sent) for a
    combination none can run."""
    batch = job.spec.model.batch
    if options.detach and not batch:
        raise SpecError("--detach: only batch jobs can detach; add --batch or model.batch")
    if options.detach and served_in_process(job):
        raise SpecError(
            f"--detach: provider '{job.settings.name}' is the bundled simulator, started in "
            "this process, so its batches end when the process does; run without --detach, "
            "or point model.base_url at `pipeline simulate`"
        )
    if not batch and (waiting := open_batches(job.checkpoint_path)):
        # Sending their rows online too would pay for them twice.
        raise SpecError(
            f"this job has {waiting} batch(es) open at the provider from an earlier "
            "--batch run; rerun with --batch to collect them, or `pipeline cancel` them "
            "first to send the rest online"
        )
    if cluster is not None:
        if batch:
            raise SpecError("--ray: batch jobs run at the provider; drop --ray or --batch")
        return RayExecutor(cluster)
    if job.output_folder:
        raise SpecError(
            f"output.path: {job.output_location} ends with '/', which asks for a folder of "
            "part files: only cluster runs (--ray) write those; name a .parquet file"
        )
    return BatchExecutor() if batch else LocalExecutor()


def execute(
    job: ResolvedJob, options: RunOptions = DEFAULT_OPTIONS, cluster: Cluster | None = None
) -> RunSummary:
    """Run a resolved job with the executor it asks for, blocking until it ends."""
    return executor_for(job, options, cluster).run(job, options)


async def execute_async(
    job: ResolvedJob, options: RunOptions = DEFAULT_OPTIONS, cluster: Cluster | None = None
) -> RunSummary:
    """`execute` for code that already runs an event loop."""
    return await executor_for(job, options, cluster).arun(job, options)


def root_cause(exc: BaseException) -> BaseException:
    """The one error inside task-group wrappers (ExceptionGroup of one, nested)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
