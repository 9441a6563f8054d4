"""A job resolved once: every mode, `status`, `export`, `report` and the API take it.

`resolve.resolve_job` builds a `ResolvedJob` from the spec after every check; nothing
past that point reads the spec's input, prompt or output sections again. The job
owns what must be the same however it runs: the input table (with `input.types`),
the renderer (with `prompt.skip_empty`), request identity (what the request hash
covers), the result columns and output format (`Layout`), and the run folder
(`RunDir`). Its `plan` is the only way a `WorkPlan` is made, so the local pool, the
batch engine and the Ray workers plan the same requests for the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline import storage
from pipeline.config import ProviderSettings
from pipeline.inputs import InputTable
from pipeline.output import Layout
from pipeline.plan import WorkPlan
from pipeline.render import PromptRenderer
from pipeline.spec import JobSpec
from pipeline.store import ResultStore
from pipeline.structured import OutputSchema

RUN_SUFFIX = ".run"
CLUSTER_SUFFIX = ".cluster"
LIMITED_INFIX = ".first-"


def limited_output(path: Path, limit: int) -> Path:
    """Where `run --limit N` writes without --output: beside the job's output."""
    return path.with_name(f"{path.stem}{LIMITED_INFIX}{limit}{path.suffix}")


@dataclass(frozen=True, order=True)
class RunDir:
    """The run folder beside an output (`<output>.run/`): the one place its layout is
    spelled. It holds the checkpoint, the run log, the run lock, batch request files
    and the staged input of a Python API run."""

    path: Path

    @classmethod
    def beside(cls, output: Path) -> RunDir:
        return cls(output.with_name(f"{output.name}{RUN_SUFFIX}"))

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.sqlite"

    @property
    def log(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def batches(self) -> Path:
        """Request files of batches not yet uploaded."""
        return self.path / "batches"

    def limited(self) -> list[RunDir]:
        """The run folders of `--limit` runs beside this one's output."""
        output = self.path.with_name(self.path.name.removesuffix(RUN_SUFFIX))
        pattern = f"{output.stem}{LIMITED_INFIX}*{output.suffix}{RUN_SUFFIX}"
        return sorted(RunDir(found) for found in output.parent.glob(pattern) if found.is_dir())

    def set_aside(self, stamp: str) -> Path:
        """A dated folder for what `--fresh` sets aside."""
        return self.path / "set-aside" / stamp

    def step(self, name: str) -> Path:
        """A multi-step job's folder for one step: its input, output and run folder."""
        return self.path / "steps" / name

    @property
    def streaming(self) -> Path:
        """A multi-step job's account of the waves its steps have finished while the rows
        stream, for `status`; gone once every wave is through."""
        return self.path / "steps" / "streaming.json"

    @property
    def staged_input(self) -> Path:
        """Where the Python API writes a DataFrame it was given, to read it as a file."""
        return self.path / "input.parquet"


def table_of(spec: JobSpec) -> InputTable:
    """The job's input, read with the types the job names."""
    return InputTable(spec.input.path, spec.input.id_column, spec.input.types)


def layout_of(spec: JobSpec) -> Layout:
    """The result columns the job's output carries beyond the input's."""
    schema = OutputSchema(spec.output.schema_) if spec.output.schema_ else None
    return Layout(tool_calls=bool(spec.model.tools), schema=schema)


@dataclass
class ResolvedJob:
    spec: JobSpec
    settings: ProviderSettings
    table: InputTable
    renderer: PromptRenderer
    rows: int
    output_path: Path
    limit: int | None = None
    layout: Layout = field(default_factory=Layout)
    job_file: Path | None = None
    # Set when output.path is an object-storage URI: the run builds the file at
    # output_path (a local stage) and uploads it there when it is complete.
    output_uri: str | None = None
    # output.path ends with "/": a folder of part files (cluster runs write one per shard)
    output_folder: bool = False
    # The job's own output, when this (--limit) run writes beside it and leaves it alone.
    replaced_output: Path | None = None

    @property
    def output_location(self) -> str:
        """Where the output ends up, as the user named it."""
        if self.output_uri is not None:
            return self.output_uri
        return f"{self.output_path}/" if self.output_folder else str(self.output_path)

    @property
    def cluster_state(self) -> str:
        """Where a cluster run's shards commit: beside the output, where every node can
        read it."""
        return self.output_location.rstrip("/") + CLUSTER_SUFFIX

    @property
    def run_dir(self) -> RunDir:
        return RunDir.beside(self.output_path)

    @property
    def related_runs(self) -> list[RunDir]:
        """Other runs of this job whose answers this one reuses: the full run's, for a
        `--limit` run; the `--limit` runs', for the full run. Each keeps its own folder,
        so a `--limit --fresh` never sets the full run's answers aside."""
        if self.replaced_output is not None:
            return [RunDir.beside(self.replaced_output)]
        return self.run_dir.limited()

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir.checkpoint

    @property
    def log_path(self) -> Path:
        return self.run_dir.log

    @property
    def request_extra(self) -> dict[str, object]:
        """What shapes the answer beyond model, params and messages: part of the hash."""
        model = self.spec.model
        schema = self.layout.schema.schema if self.layout.schema else None
        return {"schema": schema, "tools": model.tools, "tool_choice": model.tool_choice}

    def plan(
        self, results: ResultStore, *, retry_failed: bool = False, start_at: int = 0
    ) -> WorkPlan:
        """Which rows still need a request, given the results recorded so far."""
        return WorkPlan(
            self.table,
            self.renderer,
            results,
            self.settings.model,
            self.settings.params,
            self.limit,
            retry_failed=retry_failed,
            request_extra=self.request_extra,
            start_at=start_at,
            skip_empty=self.spec.the_prompt.skip_empty,
            context_window=self.settings.context_window,
        )

    def parts(self) -> JobParts:
        """What another process (a Ray worker) builds this job from. Templates and lazy
        input scans do not travel; the parts do, and are built there the same way."""
        spec = self.spec
        path = spec.input.path
        if not storage.is_remote(path) and not Path(path).is_absolute():
            # Workers run in other folders.
            absolute = spec.input.model_copy(update={"path": str(Path(path).absolute())})
            spec = spec.model_copy(update={"input": absolute})
        return JobParts(
            spec,
            self.settings,
            self.rows,
            self.output_path,
            self.limit,
            self.output_uri,
            self.output_folder,
        )


@dataclass(frozen=True)
class JobParts:
    """A checked job as it travels to another process; `build` there makes the same
    table, renderer and layout `resolve_job` made, without checking the input again."""

    spec: JobSpec
    settings: ProviderSettings
    rows: int
    output_path: Path
    limit: int | None
    output_uri: str | None
    output_folder: bool

    def build(self) -> ResolvedJob:
        spec = self.spec
        return ResolvedJob(
            spec,
            self.settings,
            table_of(spec),
            PromptRenderer(spec.the_prompt),
            self.rows,
            self.output_path,
            self.limit,
            layout_of(spec),
            output_uri=self.output_uri,
            output_folder=self.output_folder,
        )
