"""The driver of a cluster run: shards out, one limiter, progress in, one output.

`run_on_ray` connects to Ray (a local cluster started on the spot, or an existing
one), starts the `ClusterLimiter` actor, submits one task per shard, shows the
cluster's progress as the limiter aggregates it, and when every shard is done
assembles the output from the committed segments in input order. Ray retries a
shard whose worker or node died (`max_retries`); the retried task reads the shard's
segments and sends only the rest. A driver killed and run again finds the same
segments and the same shard layout, so it resumes the same way.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

from pipeline import storage
from pipeline.checkpoint import Totals
from pipeline.cluster.budget import Allowances
from pipeline.cluster.limiter import ClusterLimiter, ClusterProgress
from pipeline.cluster.segments import ShardResults, ShardStore, StateRoot
from pipeline.cluster.shards import Shard, dump, load, plan_shards
from pipeline.cluster.worker import ShardOutcome, ShardTask, run_shard
from pipeline.counters import RunCounters
from pipeline.errors import SpecError
from pipeline.job import ResolvedJob
from pipeline.oslimits import ADAPTIVE_MAX_CONCURRENCY, ADAPTIVE_START_CONCURRENCY
from pipeline.output import OutputFile, ParquetOutput, write_joined
from pipeline.progress import Progress
from pipeline.runlock import RunLock
from pipeline.runs import RunEnd, RunOptions, RunSummary
from pipeline.scheduler import Outcome

INSTALL_HINT = "pip install 'pipeline[ray]'"
SHARD_RETRIES = 3  # a shard whose worker dies is run again, from its committed rows
POLL_S = 0.5
GRACE_S = 15.0
# What workers need to reach object storage (read from the environment by pyarrow and polars).
STORAGE_ENVIRONMENT = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_ACCOUNT_NAME",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "HF_TOKEN",
    "PIPELINE_CONFIG_DIR",
)


def require_ray(*, local: bool = False) -> ModuleType:
    """The ray module, or a SpecError (exit 2) saying how to install it.

    `local`: this process will start a cluster of its own, which then keeps every
    address on loopback. Ray reads the switch when it is first imported, so it is
    set here, before the import; a cluster that is joined keeps its own addresses.
    """
    if local:
        os.environ.setdefault(LOOPBACK_ONLY, "0")
    try:
        import ray
    except ImportError:
        raise SpecError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class ClusterOptions:
    address: str | None = None  # None: start a local cluster; "auto" or host:port: join one
    workers: int | None = None  # shards run at once; default: the cluster's CPUs


# Ray's single-machine mode (as on macOS): every service on 127.0.0.1, not the
# host's network address.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def output_is_folder(job: ResolvedJob) -> bool:
    return job.output_location.endswith("/")


def connect(ray: ModuleType, cluster: ClusterOptions) -> int:
    """Join or start the cluster; returns how many shards to run at once."""
    if not ray.is_initialized():
        if cluster.address is None:
            ray.init(
                num_cpus=cluster.workers or os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=False,
                logging_level="ERROR",
                _node_ip_address="127.0.0.1",
            )
        else:
            ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    return cluster.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))


def run_on_ray(
    job: ResolvedJob, options: RunOptions, cluster: ClusterOptions | None = None
) -> RunSummary:
    """Run a prepared job sharded over a Ray cluster and write its output."""
    ray = require_ray(local=(cluster or ClusterOptions()).address is None)
    started = time.monotonic()
    with ExitStack() as stack:
        # One run per job, as on one machine: a second driver (or a local run) exits 2.
        stack.enter_context(RunLock(job.run_dir.path))
        workers = connect(ray, cluster or ClusterOptions())
        root = StateRoot(job.cluster_state)
        if options.fresh:
            root.remove_all()
        shards, layout_id = _shards(root, job, workers)
        mark_driver(root, active=True)
        stack.callback(mark_driver, root, active=False)  # a killed driver never says so
        limits = job.spec.limits
        cap = limits.concurrency or ADAPTIVE_MAX_CONCURRENCY
        limiter = (
            ray.remote(ClusterLimiter)
            .options(num_cpus=0, name=f"pipeline-limiter-{uuid.uuid4().hex[:8]}")
            .remote(
                limits.requests_per_minute,
                limits.tokens_per_minute,
                concurrency=cap,
                initial_concurrency=limits.concurrency
                or min(cap, ADAPTIVE_START_CONCURRENCY * workers),
                budget=_budget(job, root, shards),
            )
        )
        stack.callback(ray.kill, limiter)  # one per run: a notebook's driver lives on
        share = max(1, math.ceil(cap / max(1, min(workers, len(shards)))))
        environment = {k: os.environ[k] for k in STORAGE_ENVIRONMENT if k in os.environ}
        parts = job.parts()
        task = ray.remote(run_shard).options(num_cpus=1, max_retries=SHARD_RETRIES)
        pending = {
            task.remote(
                ShardTask(
                    parts,
                    shard,
                    root.location,
                    options.retry_failed,
                    share,
                    environment,
                    layout_id,
                ),
                limiter,
            ): shard
            for shard in shards
        }
        progress = Progress(
            job.rows,
            enabled=options.show_progress,
            notebook=options.notebook,
            headline=f"starting: {job.rows:,} rows in {len(shards)} shards on {workers} workers",
        )
        stack.callback(progress.close)
        outcomes = _collect(ray, pending, limiter, progress, options)
        final = ray.get(limiter.progress.remote())
        return _finish(job, root, shards, outcomes, final, time.monotonic() - started, options)
    raise AssertionError("unreachable")  # pragma: no cover


DRIVER_MARK = "driver.json"


def mark_driver(root: StateRoot, *, active: bool) -> None:
    """Say in the shared folder which driver runs the job, for `pipeline status`."""
    mark = {"host": socket.gethostname(), "pid": os.getpid(), "active": active, "t": time.time()}
    root.write_bytes(root.join(DRIVER_MARK), orjson.dumps(mark))


def _budget(job: ResolvedJob, root: StateRoot, shards: list[Shard]) -> Allowances | None:
    """The job's spending limits for the limiter, counting what earlier runs spent."""
    limits = job.spec.limits
    if limits.max_cost_usd is None and limits.max_tokens_total is None:
        return None
    spent = committed_totals(root, shards)
    return Allowances(
        limits.max_cost_usd,
        limits.max_tokens_total,
        spent_usd=spent.cost_usd,
        spent_tokens=spent.prompt_tokens + spent.output_tokens + spent.reasoning_tokens,
    )


def committed_totals(root: StateRoot, shards: list[Shard]) -> Totals:
    """Rows, tokens and cost of everything the shards committed."""
    totals = Totals()
    for shard in shards:
        totals = totals + ShardStore(root, shard.index).read().totals()
    return totals


def _shards(root: StateRoot, job: ResolvedJob, workers: int) -> tuple[list[Shard], str]:
    """The saved layout (and its id) when the input is the same, else a new one (saved)."""
    manifest = root.join("shards.json")
    saved = root.read_bytes(manifest)
    layout = load(saved, job.rows) if saved is not None else None
    if layout is None:
        data = dump(plan_shards(job.table, job.rows, workers), job.rows)
        root.write_bytes(manifest, data)
        layout = load(data, job.rows)
        assert layout is not None
    return layout


def _collect(
    ray: ModuleType,
    pending: dict[Any, Shard],
    limiter: Any,
    progress: Progress,
    options: RunOptions,
) -> list[ShardOutcome]:
    outcomes: list[ShardOutcome] = []
    interrupted_at: float | None = None
    while pending:
        try:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=POLL_S)
            for ref in done:
                pending.pop(ref)
                try:
                    outcomes.append(ray.get(ref))
                except Exception:
                    # A shard failed for good (not a dead worker: Ray retried those):
                    # stop the others, then let the error say what happened.
                    limiter.stop.remote("a shard failed")
                    for other in pending:
                        ray.cancel(other, force=True)
                    raise
            _show(progress, ray.get(limiter.progress.remote()))
            if interrupted_at is not None and time.monotonic() - interrupted_at > GRACE_S:
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            if interrupted_at is not None or not options.handle_signals:
                for ref in pending:
                    ray.cancel(ref, force=True)
                outcomes.extend(ShardOutcome(s.index, interrupted=True) for s in pending.values())
                break
            # First ^C: every worker stops taking rows and commits what it has.
            interrupted_at = time.monotonic()
            limiter.stop.remote("interrupted")
    return outcomes


def _show(progress: Progress, cluster: ClusterProgress) -> None:
    counters = RunCounters(
        rows_reused=cluster.reused,
        rows_finished=cluster.rows,
        rows_failed=cluster.failed,
        requests_sent=cluster.sent,
        in_flight=cluster.in_flight,
        tokens=cluster.tokens,
        cost_usd=cluster.cost,
        priced=cluster.priced,
    )
    progress.update(
        counters,
        reused=cluster.reused,
        retries=cluster.retries,
        requests_per_minute=cluster.requests_per_s * 60,
    )


def _finish(
    job: ResolvedJob,
    root: StateRoot,
    shards: list[Shard],
    outcomes: list[ShardOutcome],
    cluster: ClusterProgress,
    wall_s: float,
    options: RunOptions,
) -> RunSummary:
    fatal = next((o.fatal for o in outcomes if o.fatal is not None), None)
    interrupted = any(o.interrupted for o in outcomes) or cluster.stop == "interrupted"
    sent = [o.first_sent_at for o in outcomes if o.first_sent_at is not None]
    answered = [o.last_answer_at for o in outcomes if o.last_answer_at is not None]
    outcome = Outcome(
        fatal=fatal,
        interrupted=interrupted and fatal is None,
        recorded=cluster.rows,
        retries=sum(o.retries for o in outcomes),
        rate_limited=sum(o.rate_limited for o in outcomes),
        first_sent_at=min(sent) if sent else None,
        last_answer_at=max(answered) if answered else None,
    )
    output_path: Path | None = None
    failed = 0
    totals = Totals()
    if fatal is not None or outcome.interrupted:
        end = RunEnd.STOPPED if fatal is not None else RunEnd.INTERRUPTED
        totals = committed_totals(root, shards)
        failed = totals.failed
    else:
        totals, failed = assemble(job, root, shards)
        output_path = job.output_path
        end = RunEnd.ROWS_FAILED if failed else RunEnd.ALL_OK
    write_run_log(job, root, shards)
    return RunSummary(
        rows=job.rows,
        reused=sum(o.reused for o in outcomes),
        sent=sum(o.planned for o in outcomes),
        totals=totals,
        outcome=outcome,
        wall_s=wall_s,
        output_path=output_path,
        end=end,
        fatal=fatal,
        run_cost=cluster.cost,
        run_failed=cluster.failed,
        counters=RunCounters(
            rows_reused=cluster.reused,
            rows_finished=cluster.rows,
            rows_failed=cluster.failed,
            requests_sent=cluster.sent,
            tokens=cluster.tokens,
            cost_usd=cluster.cost,
            priced=cluster.priced,
        ),
        output_uri=job.output_uri if output_path is not None else None,
        notes=[f"cluster: {len(shards)} shards, {cluster.leases} leases from the limiter"],
    )


def assemble(job: ResolvedJob, root: StateRoot, shards: list[Shard]) -> tuple[Totals, int]:
    """Write the output from the segments, in input order; returns totals and failed rows.

    The output writer of a local run, fed shard by shard: one file in the format of
    `output.path`, or one Parquet part file per shard when the path ends with `/`.
    Each file is built locally (beside the output, or in the local stage of a remote
    output) and moved or uploaded into place only when complete.
    """
    if output_is_folder(job):
        return _assemble_parts(job, root, shards)
    totals = Totals()
    failed = 0
    with OutputFile(job.output_path) as output:
        for shard in shards:
            results = ShardStore(root, shard.index).read()
            totals = totals + results.totals()
            failed += _write_shard(output, job, shard, results)
        if not shards:  # an input without rows: the columns alone, as a local run writes
            write_joined(output, job.table, ShardResults({}), job.layout, limit=0)
    _publish(job, job.output_path, None)
    return totals, failed


def _assemble_parts(job: ResolvedJob, root: StateRoot, shards: list[Shard]) -> tuple[Totals, int]:
    totals = Totals()
    failed = 0
    job.output_path.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        results = ShardStore(root, shard.index).read()
        totals = totals + results.totals()
        name = f"part-{shard.index:05d}{ParquetOutput.extension}"
        with OutputFile(job.output_path / name, ParquetOutput) as part:
            failed += _write_shard(part, job, shard, results)
        _publish(job, job.output_path / name, name)
    return totals, failed


def _write_shard(output: OutputFile, job: ResolvedJob, shard: Shard, results: ShardResults) -> int:
    """Write a shard's rows with their results; returns how many are in error."""
    plan = job.plan(results)
    written = write_joined(
        output,
        job.table,
        results,
        job.layout,
        hashes=plan.hashes_for,
        limit=job.limit,
        start=shard.start,
        stop=shard.stop,
    )
    return written.failed


def _publish(job: ResolvedJob, local: Path, part: str | None) -> None:
    if job.output_uri is None:
        return
    uri = job.output_uri + part if part else job.output_uri
    storage.upload(local, uri)


def write_run_log(job: ResolvedJob, root: StateRoot, shards: list[Shard]) -> None:
    """One run log for the whole cluster, in time order, where a local run keeps it."""
    lines = [line for s in shards for line in ShardStore(root, s.index).log_lines() if line]
    lines.sort(key=_time_of)
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    job.log_path.write_bytes(b"\n".join(lines) + b"\n" if lines else b"")


def _time_of(line: bytes) -> float:
    try:
        return float(orjson.loads(line).get("t", 0.0))
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0.0
