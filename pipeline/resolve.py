"""Turn a job file (or spec) into a `ResolvedJob`: every check, nothing sent.

spec -> provider settings -> input -> templates -> output destination. Any problem is a
`SpecError` (exit 2) naming the file, key, column or row.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline import storage
from pipeline.batch.support import require_batch_api
from pipeline.columns import RESULT_NAMES
from pipeline.config import resolve_provider
from pipeline.errors import SpecError
from pipeline.inputs import InputTable
from pipeline.job import ResolvedJob, layout_of, limited_output, table_of
from pipeline.output import Layout, output_format
from pipeline.render import PromptRenderer
from pipeline.spec import JobSpec, load_spec


def resolve_job(
    job: str | Path | JobSpec,
    *,
    output: str | Path | None = None,
    limit: int | None = None,
    read_key: bool | Literal["if_set"] = True,
    batch: bool = False,
) -> ResolvedJob:
    """Load and check everything a run needs; raises SpecError naming the problem.

    `batch` switches the job to the provider's batch API, as `model.batch: true` does."""
    spec = _batch_if_asked(job if isinstance(job, JobSpec) else load_spec(job), batch)
    if limit is not None and limit < 0:
        raise SpecError("--limit must be zero or more")
    layout = layout_of(spec)
    settings = resolve_provider(spec.model, read_key=read_key, schema=layout.schema)
    require_batch_api(spec.model, settings.preset)
    renderer = PromptRenderer(spec.the_prompt)
    table = table_of(spec)
    renderer.check_columns(table.columns)
    _check_column_names(spec, table, layout)
    rows = table.check()
    job_file = None if isinstance(job, JobSpec) else Path(job)
    destination = _destination(spec, output, table, job_file, layout)
    if limit is not None and limit < rows and output is None and not destination.folder:
        # A partial run never replaces the job's (possibly complete) output.
        destination = destination.limited(limit)
    _check_writable(destination.path / "part.parquet" if destination.folder else destination.path)
    return ResolvedJob(
        spec,
        settings,
        table,
        renderer,
        rows if limit is None else min(rows, limit),
        destination.path,
        limit,
        layout,
        job_file=job_file,
        output_uri=destination.uri,
        output_folder=destination.folder,
        replaced_output=destination.replaced,
    )


def _batch_if_asked(spec: JobSpec, batch: bool) -> JobSpec:
    if batch and not spec.model.batch:
        return spec.model_copy(update={"model": spec.model.model_copy(update={"batch": True})})
    return spec


@dataclass(frozen=True)
class _Destination:
    """Where a run writes its output (`path`, a local stage when `uri` is remote)."""

    path: Path
    uri: str | None
    folder: bool
    replaced: Path | None = None  # the job's own output, when a --limit run writes beside it

    def limited(self, limit: int) -> _Destination:
        uri = limited_uri(self.uri, limit) if self.uri is not None else None
        return _Destination(limited_output(self.path, limit), uri, self.folder, self.path)


def _destination(
    spec: JobSpec,
    output: str | Path | None,
    table: InputTable,
    job_file: Path | None,
    layout: Layout,
) -> _Destination:
    target = str(output) if output else str(spec.output.path or spec.output_path)
    uri = target if storage.is_remote(target) else None
    if uri is not None:
        storage.check_writable(uri)
        path = storage.local_stage(uri)
    else:
        path = Path(target)
    folder = target.endswith("/")
    _check_not_overwriting(path, table, job_file)
    if not folder:
        output_format(path, layout)
    return _Destination(path, uri, folder)


def limited_uri(uri: str, limit: int) -> str:
    """`limited_output` for an object-storage output."""
    folder, _, name = uri.rpartition("/")
    stem, dot, suffix = name.rpartition(".")
    return f"{folder}/{stem}.first-{limit}.{suffix}" if dot else f"{uri}.first-{limit}"


def _check_column_names(spec: JobSpec, table: InputTable, layout: Layout) -> None:
    reserved = set(RESULT_NAMES) | {"tool_calls"}
    if clashes := sorted(reserved & set(layout.schema.columns if layout.schema else [])):
        raise SpecError(
            f"output.schema: propert(ies) {', '.join(clashes)} would clash with the output "
            "columns of the same name; rename them"
        )
    produced = [*RESULT_NAMES, *layout.extra_columns]
    if clashes := sorted(set(produced) & set(table.columns)):
        raise SpecError(
            f"input.path: column(s) {', '.join(clashes)} would clash with the output columns "
            f"of the same name; rename them in {spec.input.path}"
        )


def _check_not_overwriting(output: Path, table: InputTable, job_file: Path | None) -> None:
    target = output.resolve()
    for source in table.paths:
        if not storage.is_remote(source) and Path(source).resolve() == target:
            raise SpecError(
                f"output.path: {output} is the job's input; writing the output there would "
                "destroy it; choose another output path"
            )
    if job_file is not None and job_file.resolve() == target:
        raise SpecError(f"output.path: {output} is the job file itself; choose another output path")


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise SpecError(f"output.path: {path} is a folder; name a .parquet file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".pipeline-write-test"):
            pass
    except OSError as exc:
        raise SpecError(f"output.path: cannot write to {path.parent} ({exc.strerror})") from None
