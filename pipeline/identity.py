"""Which job a checkpoint serves, so one job never adopts another's results, and
opening it with a one-line answer when it is damaged.

The checkpoint records the job's name and job file (and, for the message, its
input). Paths are stored relative to the run directory, so moving a whole project
keeps its checkpoint; pointing a second job at the same output does not.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import orjson

from pipeline.checkpoint import Checkpoint
from pipeline.errors import SpecError

META_KEY = "serves"


def open_checkpoint(path: Path, *, fresh: bool = False) -> Checkpoint:
    """Open the checkpoint; a damaged one is refused in one line (or, with `fresh`,
    moved aside and replaced)."""
    try:
        return _open_and_read(path)
    except sqlite3.DatabaseError as exc:
        if not fresh:
            raise SpecError(
                f"checkpoint {path} is damaged ({exc}); nothing was sent. Move it aside "
                "and rerun (the rows of a complete output beside it are then reused), or "
                "rerun with --fresh to replace it"
            ) from None
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            source.rename(f"{aside}{suffix}")
    return Checkpoint(path)


def _open_and_read(path: Path) -> Checkpoint:
    checkpoint = Checkpoint(path)
    try:
        checkpoint.totals()  # reads every page of the results table's index
        return checkpoint
    except BaseException:
        checkpoint.close()
        raise


def describe_job(
    name: str, job_file: Path | None, input_path: str, run_dir: Path
) -> dict[str, str]:
    def relative(path: str | Path) -> str:
        return os.path.relpath(os.path.abspath(path), os.path.abspath(run_dir))

    return {
        "job": name,
        "job_file": relative(job_file) if job_file is not None else "",
        "input": relative(input_path),
    }


def claim(checkpoint: Checkpoint, identity: dict[str, str], *, fresh: bool) -> None:
    """Record that the checkpoint serves this job; refuse one that serves another."""
    stored = checkpoint.get_meta(META_KEY)
    if stored and not fresh:
        previous = orjson.loads(stored)
        if _other_job(previous, identity):
            raise SpecError(
                f"{checkpoint.path} holds the results of job '{previous.get('job')}' "
                f"({_where(previous)}), not of job '{identity['job']}' ({_where(identity)}). "
                "Give this job another output path (output.path or --output), or rerun "
                "with --fresh to start this output over for this job"
            )
    if stored != (encoded := orjson.dumps(identity).decode()):
        checkpoint.set_meta(META_KEY, encoded)


def _other_job(previous: dict[str, str], current: dict[str, str]) -> bool:
    if previous.get("job") != current["job"]:
        return True
    # A job built in code has no file; a job file moved with its output keeps its path.
    before, now = previous.get("job_file"), current["job_file"]
    return bool(before and now and before != now)


def _where(identity: dict[str, str]) -> str:
    parts = []
    if identity.get("job_file"):
        parts.append(f"job file {identity['job_file']}")
    parts.append(f"input {identity.get('input')}")
    return ", ".join(parts) + " relative to the run folder"
