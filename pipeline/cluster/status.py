"""`pipeline status` and `pipeline export` for a job run on a cluster.

A cluster run keeps no local checkpoint: its finished rows are the segments under
`<output>.cluster/shards/`, which any machine that reaches the output can read while
the run goes on. Status and export read them through the same planner and output
writer a local run's checkpoint goes through. A job that has both (run locally and on
a cluster) is described by whichever finished a row last.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import orjson

from pipeline.cluster.driver import DRIVER_MARK
from pipeline.cluster.segments import ShardResults, ShardStore, StateRoot
from pipeline.counters import RunState
from pipeline.errors import SpecError
from pipeline.job import ResolvedJob
from pipeline.results import Status, export_from, export_partial, status, status_of

ACTIVE_S = 60.0  # a driver on another machine whose shards committed this recently runs


def cluster_results(job: ResolvedJob) -> tuple[ShardResults, int] | None:
    """Every shard's committed rows, and how many shards there are; None when the job
    never ran on a cluster."""
    root = StateRoot(job.cluster_state)
    folders = root.list_folders(root.join("shards"))
    if not folders:
        return None
    results = ShardResults({})
    for folder in folders:
        results.merge(ShardStore(root, int(folder.rsplit("/", 1)[1])).read())
    return results, len(folders)


def job_status(job: ResolvedJob, *, window_s: float = 60.0) -> Status | None:
    """The job's status from its checkpoint or its cluster segments, the more recent."""
    local = status(job, window_s=window_s)
    found = cluster_results(job)
    if found is None:
        return local
    results, shards = found
    cluster = status_of(job, results, window_s=window_s)
    if local is not None and (local.last_finished_at or 0) > (cluster.last_finished_at or 0):
        return local
    cluster.shards = shards
    cluster.running = cluster.pending > 0 and _driver_runs(job, cluster.last_finished_at)
    return cluster


def _driver_runs(job: ResolvedJob, last_finished_at: float | None) -> bool:
    """Whether a driver is running the job: it said so when it started and has not said
    it ended, and (on this machine) its process is alive, or (on another) the shards
    committed a row within the last minute."""
    root = StateRoot(job.cluster_state)
    try:
        mark = orjson.loads(root.read_bytes(root.join(DRIVER_MARK)) or b"{}")
    except orjson.JSONDecodeError:
        return False
    if not mark.get("active"):
        return False
    if mark.get("host") == socket.gethostname():
        return RunState(int(mark["pid"]), None, 0, 0.0).running
    return last_finished_at is not None and time.time() - last_finished_at < ACTIVE_S


def export_job(job: ResolvedJob, path: Path) -> int:
    """Write the rows finished so far, from the checkpoint or the cluster segments."""
    found = cluster_results(job)
    if found is None:
        return export_partial(job, path)
    results = found[0]
    if job.checkpoint_path.exists():
        local = status(job)
        newest = results.recent(0)[1] or 0
        if local is not None and (local.last_finished_at or 0) > newest:
            return export_partial(job, path)
    if not results.records:
        raise SpecError(f"no results yet for {job.spec.name}: no shard has committed a row")
    return export_from(job, results, path)
