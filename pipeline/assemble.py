"""Assembly: the recorded results joined with the input into the job's output file.

Every executor ends here: the local pool and the batch engine from the job's
checkpoint, the Ray driver from its shards' segments. Only a result for a row's
current request is attached, so an input that changed under a run never puts an
answer beside a text it did not answer.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import storage
from pipeline.cache import remember_answers
from pipeline.checkpoint import Checkpoint
from pipeline.job import ResolvedJob
from pipeline.output import write_output
from pipeline.plan import WorkPlan


def assemble_output(job: ResolvedJob, results: Checkpoint, plan: WorkPlan | None = None) -> Path:
    """Write the job's output from `results` (atomically) and upload it where the job
    names a remote output; returns the local file."""
    hashes = (plan or job.plan(results)).hashes_for
    write_output(job.table, results, job.output_path, job.limit, layout=job.layout, hashes=hashes)
    remember_answers(job, results)
    if job.output_uri is not None:
        storage.upload(job.output_path, job.output_uri)
    return job.output_path
