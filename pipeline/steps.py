"""Multi-step jobs: map, filter (`when`) and reduce steps over one table, on the one engine.

Each step is resolved into a `ResolvedJob` of its own and run by the executor the job
asks for, like any job: its input is the job's input joined with the earlier steps'
result columns, materialised as Parquet in the job's run folder
(`<output>.run/steps/<name>/input.parquet`); its output and its checkpoint live in the
same folder. So every step has its own durable record keyed by request hash: it is
exactly-once, resumes after a kill, and a step whose requests did not change sends
nothing when the job is edited and run again.

    input -> [when] -> step 1 -> join -> [when] -> step 2 -> join -> ... -> output
                                      \\-> reduce: rows grouped by `by` -> <stem>.<step><suffix>

A map step adds its result columns to every row, prefixed with its name
(`sentiment_label`, `complaint_response`); a row its `when` skips gets nulls there
and is never sent. Its `output.schema` properties are also variables of later steps
under their own names (`label`), unless an input column has that name. A reduce step
renders one request per group with `rows` (the group's rows, as a list of mappings)
and the `by` columns as variables. Consecutive map steps stream rows into each other
(`steps_stream.py`); a reduce step waits for all of its rows.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow as pa
import yaml
from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from pipeline import storage
from pipeline.columns import RESULT_COLUMNS, RESULT_NAMES
from pipeline.errors import SpecError
from pipeline.job import ResolvedJob, RunDir, layout_of, limited_output, table_of
from pipeline.output import OutputFile, output_format
from pipeline.resolve import limited_uri, resolve_job
from pipeline.runs import RunSummary
from pipeline.spec import (
    InputSpec,
    JobSpec,
    OutputSpec,
    StepSpec,
    load_spec,
)
from pipeline.steps_reduce import combine_step, split_groups, splits, with_reduce_models

ROW_COLUMN = "_input_row"  # each input row's position, carried through every step to join on
ROWS_VARIABLE = "rows"  # a reduce step's template variable: the group's rows


def job_has_steps(job: str | Path) -> bool:
    """Whether a job file declares `steps:`. Only a glance at the YAML (libyaml's parser:
    a tenth of a millisecond): a file that cannot be read is the normal path's to report."""
    try:
        data = yaml.load(Path(job).read_text(encoding="utf-8"), Loader=_LOADER)
    except (OSError, UnicodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "steps" in data


_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --- what each step adds ------------------------------------------------------------


def result_columns(step: StepSpec, spec: JobSpec) -> list[str]:
    """The columns a step's answers carry, unprefixed: the standard ones, then
    `tool_calls` and the schema's properties where the step has them."""
    return [*RESULT_NAMES, *layout_of(step_job_spec(spec, step, "-", "-")).extra_columns]


def schema_properties(step: StepSpec, spec: JobSpec) -> list[str]:
    layout = layout_of(step_job_spec(spec, step, "-", "-"))
    return layout.schema.columns if layout.schema else []


def prefixed(step: StepSpec, column: str) -> str:
    return f"{step.name}_{column}"


# --- a step as a job ----------------------------------------------------------------


def step_job_spec(spec: JobSpec, step: StepSpec, input_path: str, output_path: str) -> JobSpec:
    """The job a step runs as: its prompt, the job's model and limits unless the step
    overrides them, over its materialised input, into its own output (and run folder).
    A reduce step's groups are keyed by their request; a map step's rows as the job's."""
    id_column = None if step.reduce is not None else spec.input.id_column
    return JobSpec(
        name=f"{spec.name}.{step.name}",
        input=InputSpec(path=input_path, id_column=id_column),
        model=step.model or spec.model,
        prompt=step.prompt,
        limits=step.limits or spec.limits,
        output=OutputSpec(
            path=output_path,
            schema=step.output.schema_,
            schema_retries=step.output.schema_retries,
        ),
        reuse_across_params=spec.reuse_across_params,
        cache=spec.cache,
    )


@dataclass(frozen=True)
class StepsLayout:
    """Where a multi-step job keeps its files: the one place their names are spelled."""

    output: Path  # the row output this run writes
    # The job's own output, whose run folder holds the steps' records: a `--limit` run
    # writes its outputs beside it and keeps its answers there for the full run.
    records: Path | None = None
    # Where the outputs go in object storage: `output` is then their local stage, and
    # each is uploaded once it is whole.
    uri: str | None = None

    @classmethod
    def of(cls, spec: JobSpec, output: str | Path | None = None) -> StepsLayout:
        """The layout of the job's outputs, an object-storage output staged locally (as a
        single-step job's is, so a rerun on this machine resumes)."""
        where = str(output) if output else str(spec.output.path or spec.output_path)
        if storage.is_remote(where):
            return cls(storage.local_stage(where), uri=where)
        return cls(Path(where))

    @property
    def run_dir(self) -> RunDir:
        return RunDir.beside(self.records or self.output)

    def folder(self, step: StepSpec) -> Path:
        return self.run_dir.step(step.name)

    def step_input(self, step: StepSpec) -> Path:
        return self.folder(step) / "input.parquet"

    def step_output(self, step: StepSpec) -> Path:
        return self.folder(step) / "output.parquet"

    def step_checkpoint(self, step: StepSpec) -> Path:
        return RunDir.beside(self.step_output(step)).checkpoint

    def reduce_output(self, step: StepSpec) -> Path:
        """`out/reviews.parquet` -> `out/reviews.per_label.parquet`."""
        return self.output.with_name(f"{self.output.stem}.{step.name}{self.output.suffix}")

    def combining_rounds(self, step: StepSpec) -> Path:
        """How many combining rounds a reduce step's last complete run took."""
        return self.folder(step) / "combining-rounds"

    def rounds_taken(self, step: StepSpec) -> int | None:
        try:
            return int(self.combining_rounds(step).read_text())
        except (OSError, ValueError):
            return None

    def reduce_uri(self, step: StepSpec) -> str | None:
        """`reduce_output`'s place in object storage, for an object-storage output."""
        if self.uri is None:
            return None
        folder = self.uri.rpartition("/")[0]
        return f"{folder}/{self.reduce_output(step).name}"

    def limited(self, limit: int) -> StepsLayout:
        """A `--limit` run's layout: outputs named for the limit, records the job's."""
        uri = limited_uri(self.uri, limit) if self.uri is not None else None
        return StepsLayout(limited_output(self.output, limit), self.output, uri)


def combine_rounds(step: StepSpec, layout: StepsLayout | None) -> list[StepSpec]:
    """A splitting reduce step's combining rounds: as many as its last complete run took
    (later ones, and all of them when it split no group, are an earlier run's records,
    kept for reuse but no longer part of the job); before that, the first and each later
    one whose folder a run has made."""
    if layout is None:
        return [combine_step(step)]
    taken = layout.rounds_taken(step)
    rounds: list[StepSpec] = []
    while taken is None or len(rounds) < taken:
        later = combine_step(step, len(rounds) + 1)
        if rounds and not layout.folder(later).exists():
            break
        rounds.append(later)
    return rounds


# --- `when` -------------------------------------------------------------------------


class RowFilter:
    """A step's `when`: a Jinja2 expression (sandboxed, strict undefined) over the
    variables a template of the step would see, evaluated per row."""

    def __init__(self, source: str, where: str) -> None:
        env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
        try:
            parsed = env.parse(f"{{{{ ({source}) }}}}")
            self._expression = env.compile_expression(source, undefined_to_none=False)
        except TemplateSyntaxError as exc:
            raise SpecError(f"{where}: not a valid expression: {exc.message}") from None
        self.variables = tuple(sorted(meta.find_undeclared_variables(parsed) - set(env.globals)))
        self.where = where

    def check_columns(self, columns: list[str]) -> None:
        if missing := sorted(set(self.variables) - set(columns)):
            raise SpecError(
                f"{self.where}: variable(s) {', '.join(missing)} not found among the columns "
                f"this step sees ({', '.join(columns)})"
            )

    def mask(self, frame: pl.DataFrame) -> pl.Series:
        """True for the rows the step keeps. A row the expression fails on is an error
        of the job's, not a row to skip silently."""
        rows = frame.select(self.variables).rows() if self.variables else [()] * frame.height
        # A `when` usually reads a few columns of few values (a label): each distinct
        # combination is evaluated once.
        seen: dict[tuple[Any, ...], bool] = {}
        kept = []
        for n, values in enumerate(rows):
            try:
                keep = seen.get(values)
            except TypeError:  # a list or a mapping among the values: not hashable
                keep = None
            if keep is None:
                keep = self._keeps(values, frame, n)
                with suppress(TypeError):
                    seen[values] = keep
            kept.append(keep)
        return pl.Series("kept", kept, dtype=pl.Boolean)

    def _keeps(self, values: tuple[Any, ...], frame: pl.DataFrame, n: int) -> bool:
        try:
            return bool(self._expression(**dict(zip(self.variables, values, strict=True))))
        except Exception as exc:
            row = frame.get_column(ROW_COLUMN)[n] if ROW_COLUMN in frame.columns else n
            raise SpecError(
                f"{self.where}: fails on row {row} ({type(exc).__name__}: {exc}); guard the "
                "expression (e.g. `x is not none and x > 3`) and rerun: the answers "
                "recorded so far are kept"
            ) from None


# --- the step's input ---------------------------------------------------------------


def reduce_groups(frame: pl.DataFrame, step: StepSpec) -> pl.DataFrame:
    """One row per group of `frame` by the step's `by` columns (in order of first
    appearance), with the group's rows as a list of mappings in `rows`."""
    assert step.reduce is not None
    by = step.reduce.by
    members = [c for c in frame.columns if c != ROW_COLUMN]
    return frame.group_by(by, maintain_order=True).agg(pl.struct(members).alias(ROWS_VARIABLE))


def write_parquet_atomically(frame: pl.DataFrame, path: Path) -> None:
    """A step's input is replaced whole or not at all: a kill never leaves half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        frame.write_parquet(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def resolve_step(
    spec: JobSpec,
    step: StepSpec,
    step_input: pl.DataFrame,
    layout: StepsLayout,
    *,
    read_key: bool | Literal["if_set"] = True,
    batch: bool = False,
    where: str | None = None,
) -> ResolvedJob:
    """The step as a `ResolvedJob` over `step_input` (written to the step's folder):
    every check of a job (provider, key, templates against these columns, output);
    a problem is named at `where` (default: the step's key)."""
    input_path = layout.step_input(step)
    write_parquet_atomically(step_input, input_path)
    derived = step_job_spec(spec, step, str(input_path), str(layout.step_output(step)))
    try:
        return resolve_job(derived, read_key=read_key, batch=batch)
    except SpecError as exc:
        raise SpecError(f"{where or f'steps.{step.name}'}: {exc}") from None


# --- what a step is sent -----------------------------------------------------------


def empty_answers(step: StepSpec, spec: JobSpec) -> pl.DataFrame:
    """A step's answers with no rows: the columns and types its output has."""
    layout = layout_of(step_job_spec(spec, step, "-", "-"))
    fields = [pa.field(c.name, c.type) for c in RESULT_COLUMNS]
    if layout.tool_calls:
        fields.append(pa.field("tool_calls", pa.string()))
    if layout.schema is not None:
        fields.extend(layout.schema.arrow_fields())
    schema = pa.schema([pa.field(ROW_COLUMN, pa.uint32()), *fields])
    frame = pl.from_arrow(schema.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def step_rows(chain: Chain, step: StepSpec, frame: pl.DataFrame) -> pl.DataFrame:
    """What a step is sent: the rows its `when` keeps (grouped, for a reduce step),
    without the plain names of earlier steps' properties that this step produces."""
    if (failed := failed_upstream(chain, step)) is not None:
        frame = frame.filter(failed.not_())
    if step.when is not None:
        row_filter = RowFilter(step.when, f"steps.{step.name}.when")
        row_filter.check_columns(_visible(frame))
        frame = frame.filter(row_filter.mask(frame)) if frame.height else frame
    own = set(result_columns(step, chain.spec))
    shadowed = [c for c in aliases_of_earlier(chain.spec, step) if c in own and c in frame.columns]
    frame = frame.drop(shadowed)
    if step.reduce is None:
        return frame
    if missing := [c for c in step.reduce.by if c not in frame.columns]:
        raise SpecError(
            f"steps.{step.name}.reduce.by: column(s) {', '.join(missing)} not found among "
            f"the columns this step sees ({', '.join(_visible(frame))})"
        )
    if ROWS_VARIABLE in step.reduce.by:
        raise SpecError(f"steps.{step.name}.reduce.by: '{ROWS_VARIABLE}' is the group's rows")
    groups = reduce_groups(frame, step)
    return split_groups(groups, step) if splits(step) else groups


def _visible(frame: pl.DataFrame) -> list[str]:
    return [c for c in frame.columns if c != ROW_COLUMN]


# --- the chain ----------------------------------------------------------------------


@dataclass
class StepResult:
    """How one step of a run went."""

    step: StepSpec
    rows: int  # rows (or groups) the step covered
    skipped: int  # rows its `when` left out
    summary: RunSummary
    failed: int = 0  # rows (or groups) of its output in error
    output: Path | None = None  # a reduce step's output
    unsent: int = 0  # rows an earlier step it reads failed on


@dataclass
class Chain:
    """A multi-step job checked and ready to run: the spec, its input, where it writes."""

    spec: JobSpec
    frame: pl.DataFrame  # the job's input rows (the first `limit`), with ROW_COLUMN
    layout: StepsLayout
    limit: int | None = None

    @property
    def steps(self) -> list[StepSpec]:
        assert self.spec.steps is not None
        return self.spec.steps


def open_chain(
    job: str | Path | JobSpec, *, output: str | Path | None = None, limit: int | None = None
) -> Chain:
    """Load a multi-step job and read its input (SpecError for any problem)."""
    spec = job if isinstance(job, JobSpec) else load_spec(job)
    if spec.steps is None:
        raise SpecError("this job has no steps")
    spec = with_reduce_models(spec)
    if limit is not None and limit < 0:
        raise SpecError("--limit must be zero or more")
    table = table_of(spec)
    table.check()
    if ROW_COLUMN in table.columns:
        raise SpecError(
            f"input.path: column {ROW_COLUMN} is reserved in a job with steps; rename it"
        )
    _check_step_columns(spec, table.columns)
    where = str(output) if output else str(spec.output.path or spec.output_path)
    if where.endswith("/"):
        raise SpecError(
            f"output.path: {where}: a job with steps writes one file per output "
            "(folders of part files are not supported for steps); name a file"
        )
    layout = StepsLayout.of(spec, output)
    if layout.uri is None and any(
        Path(p).resolve() == layout.output.resolve() for p in table.paths
    ):
        raise SpecError(f"output.path: {where} is the job's input; choose another path")
    if limit is not None and output is None:
        layout = layout.limited(limit)
    output_format(layout.output)  # an extension no format has is refused before anything runs
    if layout.uri is not None:
        storage.check_writable(layout.uri)
    # The chain joins every step's columns onto the rows, so they are held in memory.
    batches = list(table.batches(100_000, limit))
    frame = (
        pl.concat(batches, how="vertical_relaxed") if batches else pl.DataFrame(schema=table.schema)
    )
    frame = frame.with_row_index(ROW_COLUMN)
    return Chain(spec, frame, layout, limit)


def _check_step_columns(spec: JobSpec, columns: list[str]) -> None:
    """The output's columns must be unique: a step's prefixed column may not be an input's."""
    for step in spec.steps or []:
        if step.reduce is not None:
            continue
        if clashes := sorted(
            {prefixed(step, c) for c in result_columns(step, spec)} & set(columns)
        ):
            raise SpecError(
                f"steps.{step.name}: its column(s) {', '.join(clashes)} would clash with the "
                "input's columns of the same name; rename the step or the columns"
            )


def join_step(
    frame: pl.DataFrame, step: StepSpec, chain: Chain, answered: pl.DataFrame
) -> pl.DataFrame:
    """`frame` with a map step's result columns (prefixed), and its schema properties
    under their own names unless an input column has that name. A row not sent because
    an earlier step it reads failed on it says so in the step's error column."""
    spec = chain.spec
    columns = result_columns(step, spec)
    renamed = answered.select(ROW_COLUMN, *(pl.col(c).alias(prefixed(step, c)) for c in columns))
    joined = frame.join(renamed, on=ROW_COLUMN, how="left", maintain_order="left")
    joined = joined.with_columns(plain_aliases(step, spec, frame.columns))
    if (failed := failed_upstream(chain, step)) is None:
        return joined
    error = prefixed(step, "error")
    return joined.with_columns(
        pl.when(failed & pl.col(error).is_null())
        .then(pl.lit(unsent_error(chain, step)))
        .otherwise(pl.col(error))
        .alias(error)
    )


# --- rows an earlier step failed on ---------------------------------------------------


def failed_upstream(chain: Chain, step: StepSpec) -> pl.Expr | None:
    """Whether an earlier map step that `step` reads failed on the row (None: it reads
    none). Such a row is not sent: its request would be built from an answer that is
    not there. A step that reads an earlier step's `error` column handles that step's
    failures itself, and is sent them."""
    upstream = reads_from(chain, step)
    if not upstream:
        return None
    return pl.any_horizontal(pl.col(prefixed(s, "error")).is_not_null() for s in upstream)


def unsent_error(chain: Chain, step: StepSpec) -> str:
    names = " or ".join(s.name for s in reads_from(chain, step))
    return (
        f"not sent: step {names} failed on this row, and this step reads its answer; "
        "`pipeline run --retry-failed` asks again"
    )


def reads_from(chain: Chain, step: StepSpec) -> list[StepSpec]:
    """The earlier map steps whose answers `step` reads (in a template, its `when`, its
    `by`, or as a field of a reduce's `rows`) and whose errors it does not read."""
    spec, read = chain.spec, names_read(step)
    owner: dict[str, StepSpec] = {}
    for earlier in spec.steps or []:
        if earlier.name == step.name:
            break
        if earlier.reduce is not None:
            continue
        owner.update({prefixed(earlier, c): earlier for c in result_columns(earlier, spec)})
        plain = set(schema_properties(earlier, spec)) - set(chain.frame.columns)
        owner.update(dict.fromkeys(plain, earlier))  # a later step's property replaces it
    found = {owner[name].name: owner[name] for name in sorted(read) if name in owner}
    return [s for s in found.values() if prefixed(s, "error") not in read]


def names_read(step: StepSpec) -> set[str]:
    """Every name a step's templates and `when` read, the fields taken of them (`r.label`,
    `r['label']`) included, and its `by` columns."""
    env = SandboxedEnvironment()
    sources = [source for _, source, _ in step.prompt.parts()]
    if step.when is not None:
        sources.append(f"{{{{ ({step.when}) }}}}")
    names = set(step.reduce.by) if step.reduce is not None else set()
    for source in sources:
        try:
            parsed = env.parse(source)
        except TemplateSyntaxError:  # the step's own checks name it
            continue
        names |= meta.find_undeclared_variables(parsed)
        names |= {node.attr for node in parsed.find_all(nodes.Getattr)}
        names |= {
            node.arg.value
            for node in parsed.find_all(nodes.Getitem)
            if isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str)
        }
    return names


def plain_aliases(step: StepSpec, spec: JobSpec, taken: list[str]) -> list[pl.Expr]:
    """A later step's own names for this step's schema properties (`label`)."""
    base = set(taken) - set(aliases_of_earlier(spec, step))
    return [
        pl.col(prefixed(step, name)).alias(name)
        for name in schema_properties(step, spec)
        if name not in base
    ]


def aliases_of_earlier(spec: JobSpec, upto: StepSpec) -> list[str]:
    """The plain names earlier map steps gave their schema properties (a later step's
    property of the same name replaces them)."""
    names: list[str] = []
    for step in spec.steps or []:
        if step.name == upto.name:
            break
        if step.reduce is None:
            names.extend(schema_properties(step, spec))
    return names


def final_frame(chain: Chain, frame: pl.DataFrame) -> pl.DataFrame:
    """The job's output: input columns, then each map step's prefixed columns."""
    aliases = {
        name
        for step in chain.steps
        if step.reduce is None
        for name in schema_properties(step, chain.spec)
    }
    input_columns = set(chain.frame.columns)
    return frame.drop(ROW_COLUMN, *(a for a in aliases if a not in input_columns))


def reduce_frame(step: StepSpec, spec: JobSpec, answered: pl.DataFrame) -> pl.DataFrame:
    """A reduce step's output: the `by` columns, then the standard result columns."""
    assert step.reduce is not None
    return answered.select(*step.reduce.by, *result_columns(step, spec))


def write_frame(frame: pl.DataFrame, path: Path) -> None:
    """Written in the format `path`'s extension names, atomically."""
    with OutputFile(path, output_format(path)) as out:
        out.write(frame.to_arrow())


@contextmanager
def validation_folder() -> Iterator[Path]:
    """Where `validate` materialises empty step inputs: nothing of the job's is touched."""
    with tempfile.TemporaryDirectory(prefix="pipeline-validate-") as folder:
        yield Path(folder)
