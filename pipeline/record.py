"""A job's record opened for a run: its checkpoint, claimed for the job, with a killed
run's journal folded in, the answers of the job's other runs (`--limit` runs, or the
full run for a `--limit` run) adopted, and on `--fresh` what was recorded set aside.

Every executor that keeps a checkpoint (the local pool, the batch engine) opens it
here, so they reuse exactly the same answers.
"""

from __future__ import annotations

import time

from pipeline.cache import fill_from_cache
from pipeline.carry import carry_answers
from pipeline.checkpoint import Checkpoint
from pipeline.identity import claim, describe_job, open_checkpoint
from pipeline.job import ResolvedJob


def open_record(job: ResolvedJob, *, fresh: bool) -> tuple[Checkpoint, list[str]]:
    """The job's checkpoint ready for a run, and notes for the operator."""
    checkpoint = open_checkpoint(job.checkpoint_path, fresh=fresh)
    notes: list[str] = []
    try:
        claim(checkpoint, _identity(job), fresh=fresh)
        checkpoint.recover()
        if fresh:
            notes.extend(_set_aside(job, checkpoint))
            checkpoint.start_fresh()
        else:
            for related in job.related_runs:
                checkpoint.adopt(related.checkpoint)
        if job.table.id_column is None:
            checkpoint.key_by_request()
        elif checkpoint.get_meta("keyed_by_request") == "1":
            checkpoint.set_meta("keyed_by_request", "0")  # keyed by id again from now on
        if not fresh:
            notes.extend(carry_answers(job, checkpoint))
            notes.extend(fill_from_cache(job, checkpoint))
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint, notes


def _set_aside(job: ResolvedJob, checkpoint: Checkpoint) -> list[str]:
    """Copy what `--fresh` is about to ignore into a dated folder, and say so."""
    totals = checkpoint.totals()
    if totals.rows == 0:
        return []
    folder = job.run_dir.set_aside(time.strftime("%Y%m%d-%H%M%S"))
    checkpoint.copy_to(folder / job.checkpoint_path.name)
    cost = f" (${totals.cost_usd:,.4f} paid)" if totals.priced_rows else ""
    return [
        f"--fresh: the {totals.rows:,} row(s) recorded so far{cost} are set aside, not "
        f"deleted: a copy is in {folder}"
    ]


def _identity(job: ResolvedJob) -> dict[str, str]:
    return describe_job(job.spec.name, job.job_file, job.spec.input.path, job.run_dir.path)
