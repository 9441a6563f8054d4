"""The Python API: DataFrame in, DataFrame out, on the same engine as the CLI.

    import pipeline
    job = pipeline.Job.from_yaml("jobs/classify.yaml")
    results = pipeline.run(job, data=my_dataframe)        # scripts
    results = await pipeline.arun(job, data=my_dataframe) # notebooks, async code

Runs checkpoint and resume exactly as `pipeline run` does: the run is identified
by the job's output path (`output=` overrides it), and calling `run` again after
an interruption sends only what is not finished yet.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import anyio
import polars as pl
import pyarrow as pa

from pipeline import storage
from pipeline.embedded import simulator_for
from pipeline.errors import PipelineError, RunCrashed, SpecError
from pipeline.executor import Cluster, execute_async
from pipeline.job import ResolvedJob, RunDir
from pipeline.output import scan_output
from pipeline.resolve import resolve_job
from pipeline.runs import RunOptions, RunSummary
from pipeline.spec import JobSpec, load_spec, parse_spec
from pipeline.types import RowResult

# A polars or pandas DataFrame, an Arrow table, or a path (pandas is optional, hence Any).
DataLike: TypeAlias = Any
NO_INPUT = "(pass data= to run)"


class Job:
    """A validated job spec. Build it from YAML or from keyword arguments / dicts."""

    def __init__(self, spec: JobSpec | None = None, /, **sections: Any) -> None:
        if spec is not None and sections:
            raise TypeError("pass either a JobSpec or keyword sections, not both")
        if spec is None:
            sections.setdefault("name", "job")
            sections.setdefault("input", {"path": NO_INPUT})
            spec = parse_spec(sections, source="Job(...)")
        self.spec = spec

    @classmethod
    def from_yaml(cls, path: str | Path) -> Job:
        return cls(load_spec(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return cls(**data)

    def __repr__(self) -> str:
        return f"Job(name={self.spec.name!r}, model={self.spec.model.model!r})"


class RunFailed(PipelineError):
    """The run stopped before every row had a result: a job-level stop, an interrupt, or
    an unexpected error (then `summary` is None and the error is the `__cause__`)."""

    def __init__(self, message: str, summary: RunSummary | None) -> None:
        super().__init__(message)
        self.summary = summary


def run(
    job: Job,
    data: DataLike | None = None,
    *,
    output: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    fresh: bool = False,
    retry_failed: bool = False,
    on_result: Callable[[RowResult], None] | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    ray_workers: int | None = None,
) -> pl.DataFrame:
    """Run `job` over `data` (or the job's own input) and return the output rows.

    `ray=True` runs it sharded on a local Ray cluster started on the spot;
    `ray_address="auto"` (or "host:port") on an existing one (`pip install 'pipeline[ray]'`).
    Raises RuntimeError inside a running event loop: use `await arun(...)` there.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "pipeline.run() was called inside a running event loop (a notebook or async "
            "code); use `await pipeline.arun(...)` instead"
        )
    return anyio.run(
        lambda: arun(
            job,
            data,
            output=output,
            limit=limit,
            progress=progress,
            fresh=fresh,
            retry_failed=retry_failed,
            on_result=on_result,
            ray=ray,
            ray_address=ray_address,
            ray_workers=ray_workers,
            _notebook=False,
        ),
        backend="asyncio",
        backend_options={"use_uvloop": True},
    )


async def arun(
    job: Job,
    data: DataLike | None = None,
    *,
    output: str | Path | None = None,
    limit: int | None = None,
    progress: bool = True,
    fresh: bool = False,
    retry_failed: bool = False,
    on_result: Callable[[RowResult], None] | None = None,
    ray: bool = False,
    ray_address: str | None = None,
    ray_workers: int | None = None,
    _notebook: bool = True,
) -> pl.DataFrame:
    """`run` for code that already has an event loop (Jupyter, async applications)."""
    wants_cluster = ray or ray_address is not None or ray_workers is not None
    cluster = Cluster(ray_address, ray_workers) if wants_cluster else None
    if cluster is not None:
        cluster.require_ray()
        if on_result is not None:
            raise SpecError("on_result is called by local runs only; drop it or ray=")
    options = RunOptions(
        show_progress=progress,
        notebook=_notebook,
        fresh=fresh,
        retry_failed=retry_failed,
        on_result=on_result,
    )
    if job.spec.steps is not None:
        return await anyio.to_thread.run_sync(
            lambda: _run_steps(job, data, output, limit, options, cluster)
        )
    prepared = await anyio.to_thread.run_sync(lambda: _prepare(job, data, output, limit))
    try:
        with simulator_for(prepared) as served:
            summary = await execute_async(served, options, cluster)
    except RunCrashed as exc:
        message = f"the run stopped on an unexpected error: {exc}; finished rows are kept"
        raise RunFailed(message, None) from exc.__cause__
    if not summary.finished or summary.output_path is None:
        raise RunFailed(
            f"{summary.why_unfinished}; finished rows are kept, call again to resume", summary
        )
    if prepared.output_folder:
        source = str(summary.output_path / "part-*.parquet")
        return await anyio.to_thread.run_sync(pl.read_parquet, source)
    output = summary.output_path
    return await anyio.to_thread.run_sync(lambda: scan_output(output).collect())


def _prepare(
    job: Job, data: DataLike | None, output: str | Path | None, limit: int | None
) -> ResolvedJob:
    spec, target = _with_data(job, data, output)
    return resolve_job(spec, output=target, limit=limit)


def _with_data(job: Job, data: DataLike | None, output: str | Path | None) -> tuple[JobSpec, str]:
    """The job reading `data` (staged beside the run when it is not a path), and where
    its output goes."""
    spec = job.spec
    target = str(output) if output else str(spec.output.path or spec.output_path)
    output_path = storage.local_stage(target) if storage.is_remote(target) else Path(target)
    if data is None and spec.input.path == NO_INPUT:
        raise SpecError("this job names no input: pass data= (a DataFrame, Arrow table or path)")
    if data is not None:
        source = _stage(data, output_path)
        spec = spec.model_copy(update={"input": spec.input.model_copy(update={"path": source})})
    return spec, target


def _run_steps(
    job: Job,
    data: DataLike | None,
    output: str | Path | None,
    limit: int | None,
    options: RunOptions,
    cluster: Cluster | None,
) -> pl.DataFrame:
    """A job with steps (pipeline/steps.py): the row output; reduce outputs are beside it."""
    from pipeline.steps import open_chain
    from pipeline.steps_run import run_chain

    spec, target = _with_data(job, data, output)
    chain = open_chain(spec, output=target, limit=limit)
    summary = run_chain(chain, options, cluster)
    if summary.output_path is None:
        stopped = summary.steps[-1]
        raise RunFailed(
            f"step {stopped.step.name}: {stopped.summary.why_unfinished}; finished rows are "
            "kept, call again to resume",
            stopped.summary,
        )
    return scan_output(summary.output_path).collect()


def _stage(data: DataLike, output_path: Path) -> str:
    """A path polars can scan: the given file, or the data written beside the run."""
    if isinstance(data, str | Path):
        return str(data)
    frame = _to_polars(data)
    run_dir = RunDir.beside(output_path)
    run_dir.path.mkdir(parents=True, exist_ok=True)
    path = run_dir.staged_input
    frame.write_parquet(path)
    # Keep the staged copy's modification time stable when the data is unchanged, so a
    # rerun on the same data can recognise its finished output.
    digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    marker = path.with_name(f"input.{digest}.parquet")
    if not marker.exists():
        for old in run_dir.path.glob("input.*.parquet"):
            old.unlink()
        path.replace(marker)
    else:
        path.unlink()
    return str(marker)


def _to_polars(data: Any) -> pl.DataFrame:
    if isinstance(data, pl.DataFrame):
        return data
    if isinstance(data, pa.Table):
        return pl.from_arrow(data)  # type: ignore[return-value]
    if type(data).__module__.startswith("pandas"):
        return pl.from_pandas(data)
    raise SpecError(
        f"data: expected a polars or pandas DataFrame, an Arrow table or a path, "
        f"not {type(data).__name__}"
    )
