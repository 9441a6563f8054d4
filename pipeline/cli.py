"""The command line: arguments in, exit codes out. The work happens behind `resolve`
and `executor`."""

from __future__ import annotations

import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TextIO

import click

if TYPE_CHECKING:
    from pipeline.counters import RunCounters
    from pipeline.estimate import Estimate

from pipeline.embedded import simulator_for
from pipeline.errors import PipelineError, RunCrashed, SpecError
from pipeline.executor import Cluster, executor_for
from pipeline.job import ResolvedJob
from pipeline.plan import template_failures
from pipeline.resolve import resolve_job
from pipeline.results import Status
from pipeline.runs import RunEnd, RunOptions, RunSummary, rerun_command
from pipeline.spec import with_cache
from pipeline.steps import job_has_steps

EXIT_INVALID, EXIT_STOPPED, EXIT_CRASHED, EXIT_INTERRUPTED = 2, 3, 4, 130
EXIT_CODES = {
    RunEnd.ALL_OK: 0,
    RunEnd.ROWS_FAILED: 1,
    RunEnd.STOPPED: EXIT_STOPPED,
    RunEnd.INTERRUPTED: EXIT_INTERRUPTED,
}


def _shown(path: str | Path) -> str:
    """A path as printed: `jobs/../out/x.parquet` as `out/x.parquet`, relative to the
    current folder when inside it (resolved, so a symlinked folder is not misread)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(resolved)


def _cost(usd: float | None) -> str:
    """Dollars, or "unknown" when no price is known (never a made-up $0)."""
    return f"${usd:.6f}" if usd is not None else "unknown"


def _crashed(error: RunCrashed, cause: BaseException, rerun: str) -> NoReturn:
    """One line, no traceback (PIPELINE_DEBUG=1 shows it): what broke, where the log is,
    how to resume; exit 4, a code of its own."""
    if os.environ.get("PIPELINE_DEBUG") == "1":
        traceback.print_exception(cause)
    log = f"; run log: {error.log_path}" if error.log_path else ""
    click.echo(
        f"error: the run stopped on an unexpected error: {error}{log}; finished rows are "
        f"saved and `{rerun}` resumes (PIPELINE_DEBUG=1 shows the traceback)",
        err=True,
    )
    sys.exit(EXIT_CRASHED)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _interrupted(message: str) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(EXIT_INTERRUPTED)


class _Guarded(click.Group):
    """Every command behind the last line of defence: an unexpected error is one line and
    exit 4, never a traceback (PIPELINE_DEBUG=1 shows it)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except SpecError as exc:
            _fail(str(exc), EXIT_INVALID)
        except Exception as exc:
            if os.environ.get("PIPELINE_DEBUG") == "1":
                traceback.print_exception(exc)
            click.echo(
                f"error: unexpected {type(exc).__name__}: {exc} "
                "(PIPELINE_DEBUG=1 shows the traceback)",
                err=True,
            )
            sys.exit(EXIT_CRASHED)


@click.group(cls=_Guarded, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline")
def main() -> None:
    """Run an LLM prompt over every row of a CSV or Parquet table."""
    _reopen_closed_std_streams()


def _reopen_closed_std_streams() -> None:
    """Point a closed stdin/stdout/stderr (`>&- 2>&-`) at /dev/null.

    Otherwise printing fails, and worse, the next file opened (the checkpoint) gets
    descriptor 1 or 2 and would receive whatever is printed.
    """
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 - process-long


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
def validate(job: Path) -> None:
    """Check JOB (spec, input, templates, output, key) without sending anything."""
    if job_has_steps(job):
        from pipeline.steps_cli import validate_steps

        return validate_steps(job)
    try:
        prepared = resolve_job(job)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    failures = template_failures(prepared.table, prepared.renderer, prepared.limit)
    if failures.count:
        shown = "\n".join(f"  - row {n} (key {key}): {error}" for n, key, error in failures.first)
        _fail(
            f"{job}: the prompt fails to render for {failures.count:,} of {prepared.rows:,} "
            "row(s); "
            f"a run would record them as template_error. First failures:\n{shown}\n"
            "Guard the template against these values (e.g. `{{ x or '' }}`, "
            "`{{ tags | default([], true) | join(', ') }}`) or fix the rows",
            EXIT_INVALID,
        )
    click.echo(
        f"ok: {job} is valid: {prepared.rows:,} rows from {prepared.spec.input.path}, "
        f"provider {prepared.settings.name}, model {prepared.settings.model}, "
        f"output {prepared.output_location}"
    )
    _warn_empty_prompts(prepared)


def _warn_empty_prompts(prepared: ResolvedJob) -> None:
    from pipeline.plan import empty_prompt_rows

    count, examples = empty_prompt_rows(prepared.table, prepared.renderer, prepared.limit)
    if not count:
        return
    which = prepared.spec.input.id_column or "row number"
    sample = f" ({which} {', '.join(examples)}{', ...' if count > len(examples) else ''})"
    if prepared.spec.the_prompt.skip_empty:
        click.echo(
            f"note: {count:,} row(s) render an empty prompt{sample}; prompt.skip_empty is on, "
            "so they are not sent (their output rows say finish_reason: skipped)",
            err=True,
        )
        return
    click.echo(
        f"warning: {count:,} row(s) render an empty prompt{sample}; they would be sent and "
        "paid for. Add `skip_empty: true` under `prompt:` to skip them (they still get an "
        "output row, with finish_reason: skipped)",
        err=True,
    )


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    help="Process only the first N rows (written to <output stem>.first-N.parquet).",
)
@click.option(
    "--output",
    type=str,
    help="Write here instead of output.path (a local path or an s3://, gs://, az:// URI).",
)
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--fresh", is_flag=True, help="Ignore results recorded by earlier runs.")
@click.option("--retry-failed", is_flag=True, help="Send rows that ended in error again.")
@click.option(
    "--batch", is_flag=True, help="Use the provider's batch API (half price, within 24 h)."
)
@click.option(
    "--detach", is_flag=True, help="Batch jobs: submit the batches and exit without waiting."
)
@click.option(
    "--ray", "use_ray", is_flag=True, help="Run sharded on a local Ray cluster started now."
)
@click.option(
    "--ray-address",
    metavar="auto|ADDRESS",
    help="Run sharded on an existing Ray cluster ('auto', or the head's host:port).",
)
@click.option(
    "--ray-workers",
    type=click.IntRange(min=1),
    help="Shards to run at once (default: the cluster's CPUs).",
)
@click.option(
    "--cache",
    "cache_dir",
    metavar="DIR",
    help="Reuse answers any job on this machine got for the same requests (shared folder).",
)
def run(
    job: Path,
    limit: int | None,
    output: str | None,
    quiet: bool,
    fresh: bool,
    retry_failed: bool,
    batch: bool,
    detach: bool,
    use_ray: bool,
    ray_address: str | None,
    ray_workers: int | None,
    cache_dir: str | None,
) -> None:
    """Run JOB: send every row that has no result yet, then write the output Parquet.

    Rerun the same command to resume: finished rows whose request is unchanged are
    reused, so only new, changed or unfinished rows are sent. With --limit N and no
    --output, the first N rows go to <output stem>.first-N.parquet, never over the
    job's output; they are kept for the full run.
    A batch job (--batch or model.batch) resumes its submitted batches instead of
    sending them again.
    """
    wants_cluster = use_ray or ray_address is not None or ray_workers is not None
    cluster = Cluster(ray_address, ray_workers) if wants_cluster else None
    rerun = rerun_command(job, output, batch)
    options = RunOptions(
        handle_signals=True,
        show_progress=not quiet,
        fresh=fresh,
        retry_failed=retry_failed,
        detach=detach,
        command=shlex.join(["pipeline", *sys.argv[1:]]),
    )
    if job_has_steps(job):
        from pipeline.steps_cli import run_steps

        sys.exit(
            run_steps(
                job,
                options,
                output=output,
                limit=limit,
                batch=batch,
                cluster=cluster,
                cache=cache_dir,
            )
        )
    try:
        if cluster is not None:
            cluster.require_ray()
        prepared = resolve_job(job, output=output, limit=limit, batch=batch)
        if cache_dir:
            prepared.spec = with_cache(prepared.spec, cache_dir)
        executor = executor_for(prepared, options, cluster)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    except KeyboardInterrupt:
        _interrupted("interrupted before anything was sent")
    except Exception as exc:  # the last line of defence, before anything was sent
        _crashed(RunCrashed(f"{type(exc).__name__}: {exc}"), exc, rerun)
    try:
        with simulator_for(prepared) as served:
            summary = executor.run(served, options)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    except KeyboardInterrupt:
        # After sending (while the output is written): every answer is committed.
        _interrupted(f"interrupted: finished rows are saved; `{rerun}` resumes")
    except RunCrashed as exc:
        _crashed(exc, exc.__cause__ or exc, rerun)
    except PipelineError as exc:
        _fail(str(exc), EXIT_STOPPED)
    except Exception as exc:  # the last line of defence
        _crashed(RunCrashed(f"{type(exc).__name__}: {exc}", log_path=prepared.log_path), exc, rerun)
    _print_summary(summary, rerun_command(job, output, batch))
    if prepared.replaced_output is not None and summary.output_path is not None:
        click.echo(
            f"--limit {limit}: the first {prepared.rows:,} rows are in "
            f"{_shown(summary.output_path)}; {_shown(prepared.replaced_output)} (the whole "
            "job's output) is left as it was",
            err=True,
        )
    sys.exit(EXIT_CODES[summary.end])


def _print_summary(summary: RunSummary, rerun: str) -> None:
    from pipeline.report import OutputStats

    totals = summary.totals
    stats = OutputStats.read(summary.output_path) if summary.output_path is not None else None
    counters = summary.counters
    unfinished = max(
        0, summary.rows - summary.reused - summary.deduplicated - counters.rows_finished
    )
    lines = [
        f"rows: {summary.rows:,} ({summary.reused:,} reused from earlier runs, "
        f"{counters.rows_finished:,} finished this run of which {counters.rows_failed:,} "
        f"failed" + (f", {unfinished:,} not finished" if unfinished else "") + ")",
    ]
    if summary.deduplicated:
        lines.append(
            f"deduplicated: {summary.deduplicated:,} row(s) made the same request as another "
            "row and share its answer (sent once)"
        )
    if stats is not None:
        failed = ", ".join(f"{kind} {n:,}" for kind, n in stats.failed)
        skipped = dict(stats.finish_reasons).get("skipped", 0)
        lines.append(
            f"results: {stats.rows - stats.failed_rows:,} ok"
            + (f" ({skipped:,} of them skipped: empty prompt)" if skipped else "")
            + f", {stats.failed_rows:,} failed"
            + (f" ({failed})" if failed else "")
        )
        lines.append(
            f"tokens (this output): {stats.prompt_tokens:,} in, {stats.output_tokens:,} out, "
            f"{stats.reasoning_tokens:,} reasoning, {stats.cached_tokens:,} cached"
        )
    else:
        lines.append(
            f"finished so far: {totals.rows - totals.failed:,} ok, {totals.failed:,} failed; "
            f"tokens {totals.prompt_tokens:,} in, {totals.output_tokens:,} out, "
            f"{totals.reasoning_tokens:,} reasoning"
        )
    lines.append(
        f"cost: {_cost(counters.cost if counters.requests_sent else 0.0)} this run, "
        f"{_cost(totals.cost_usd if totals.cost_known else None)} all finished rows"
        + (
            f" ({totals.unpriced_rows:,} of them at an unknown price)"
            if totals.cost_known and totals.unpriced_rows
            else ""
        )
    )
    lines.append(
        f"time: {summary.wall_s:,.2f}s in all, "
        + (
            f"{summary.outcome.active_s:,.2f}s from first request to last answer"
            if summary.outcome.last_answer_at is not None
            else "no answer received"
        )
    )
    if stats is not None and stats.latency:
        lines.append(
            "latency (final attempts): "
            + ", ".join(f"{name} {value:.2f}s" for name, value in stats.latency.items())
        )
    # In flight is an online figure: a batch run's requests wait at the provider instead.
    in_flight = (
        f", at most {counters.peak_in_flight:,} in flight at once"
        if counters.peak_in_flight
        else ""
    )
    lines.append(
        f"requests this run: {counters.requests_sent:,} sent ({_retries_sent(summary):,} of "
        f"them retries), {summary.outcome.rate_limited:,} rate limited (429){in_flight}"
    )
    lines.extend(_learned_limits(counters))
    if summary.fatal is not None:
        lines.append(
            f"stopped: {summary.fatal.describe()}\n"
            f"  what to do: {summary.fatal.advice}; then `{rerun}` resumes"
        )
    elif summary.outcome.interrupted:
        lines.append(f"interrupted: finished rows are saved; `{rerun}` resumes")
        if summary.outcome.abandoned:
            lines.append(
                f"  abandoned: {summary.outcome.abandoned:,} request(s) in flight at the second "
                "Ctrl-C (sent and paid for; their rows are sent again on resume)"
            )
    lines.extend(summary.notes)
    stopped = summary.fatal is not None or summary.outcome.interrupted
    if not stopped and summary.output_path is not None:
        where = shlex.quote(_shown(summary.output_path))
        if summary.output_uri is not None:
            lines.append(
                f"output: {summary.output_uri} (built locally at {_shown(summary.output_path)})"
            )
        else:
            lines.append(f"output: {_shown(summary.output_path)}")
        if totals.failed or (stats is not None and stats.failed_rows):
            count = stats.failed_rows if stats is not None else totals.failed
            lines.append(
                f"{count:,} row(s) ended in error: `pipeline show {where} --errors` lists them; "
                f"`{rerun} --retry-failed` sends them again"
            )
        lines.append(f"report: `pipeline report {where}` writes charts and sample rows to HTML")
    click.echo(_fit_to_terminal("\n".join(lines), sys.stderr), err=True)


def _fit_to_terminal(text: str, stream: TextIO) -> str:
    """In a terminal, each line wrapped at its width between words (continuations
    indented), where the terminal itself would cut words in two; elsewhere unchanged."""
    if not stream.isatty():
        return text
    import textwrap

    try:
        width = os.get_terminal_size(stream.fileno()).columns - 1
    except (OSError, ValueError):
        return text
    wrapped = []
    for line in text.splitlines():
        indent = line[: len(line) - len(line.lstrip())]
        wrapped.append(
            textwrap.fill(
                line,
                width=width,
                subsequent_indent=indent + "  ",
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    return "\n".join(wrapped)


def _retries_sent(summary: RunSummary) -> int:
    """Retries as sent; counters that never saw a request go out (batch, cluster) can't say."""
    counters = summary.counters
    return counters.retries_sent if counters.started_at is not None else summary.outcome.retries


def _learned_limits(counters: RunCounters) -> list[str]:
    return [
        f"limit learned: {per_minute:,.0f} {dimension} a minute from the server's headers, "
        "and paced to"
        for dimension, per_minute in counters.learned_limits.items()
    ]


@main.command(name="status")
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), help="The run's --output, if given.")
def status_command(job: Path, output: Path | None) -> None:
    """Show progress of JOB from its checkpoint: done, failed, pending, tokens, cost, ETA."""
    if job_has_steps(job):
        from pipeline.steps_cli import status_steps

        return status_steps(job, output)
    try:
        prepared = resolve_job(job, output=output, read_key=False)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    from pipeline.cluster.status import job_status

    try:
        report = job_status(prepared)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    if report is None:
        click.echo(f"{prepared.spec.name}: not started ({prepared.rows:,} rows pending)")
        return
    lines = _describe_status(prepared.spec.name, report, job, output)
    click.echo("\n".join([*lines, *_batch_lines(prepared)]))


def _describe_status(name: str, report: Status, job: Path, output: Path | None) -> list[str]:
    totals = report.totals
    lines = [
        f"{name}: {report.finished:,}/{report.rows:,} rows finished "
        f"({report.failed:,} failed), {report.pending:,} pending",
        f"tokens: {totals.prompt_tokens:,} in, {totals.output_tokens:,} out, "
        f"{totals.reasoning_tokens:,} reasoning; "
        f"cost {_cost(totals.cost_usd if totals.cost_known else None)}",
    ]
    run = report.run
    sent = (run.counters or {}) if run is not None else {}
    if report.shards is not None:
        lines.append(_cluster_line(report, job, output))
    elif report.running and run is not None:
        scope = f" with --limit {run.limit:,}" if report.run_pending is not None else ""
        lines.append(
            f"run: active{scope} (pid {run.pid}): {sent.get('requests_sent', 0):,} requests "
            f"sent, {sent.get('in_flight', 0):,} in flight at its last commit"
        )
        eta = report.eta_s
        left = (
            f"{report.run_pending:,} of its {run.rows:,} rows left, "
            if report.run_pending is not None
            else ""
        )
        lines.append(
            f"rate: {report.recent_rows_per_s:,.1f} rows/s over the last minute; {left}"
            + (f"about {_duration(eta)} left" if eta else "time left unknown")
        )
    elif report.pending == 0:
        lines.append("run: none active; done, every row has a result")
    else:
        rerun = rerun_command(job, output)
        last = "" if run is None else f" (the last one sent {sent.get('requests_sent', 0):,})"
        lines.append(f"run: none active{last}; `{rerun}` resumes")
    return lines


def _cluster_line(report: Status, job: Path, output: Path | None) -> str:
    """A cluster run: its progress is what the shards committed."""
    where = f"cluster: {report.shards:,} shards"
    if report.pending == 0:
        return f"{where}; done, every row has a result"
    if report.running:
        eta = report.eta_s
        return (
            f"{where}, committing: {report.recent_rows_per_s:,.1f} rows/s over the last "
            "minute; " + (f"about {_duration(eta)} left" if eta else "time left unknown")
        )
    rerun = f"pipeline run {shlex.quote(str(job))} --ray" + (
        f" --output {shlex.quote(str(output))}" if output else ""
    )
    return f"{where}, nothing committed in the last minute; `{rerun}` resumes"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _batch_lines(prepared: ResolvedJob) -> list[str]:
    """One line per batch of the job, as last seen by a run or a cancel."""
    from pipeline.batch.engine import batch_chunks

    lines = []
    for chunk in batch_chunks(prepared):
        answered = f"{chunk.done + chunk.failed:,}/{chunk.requests:,} answered"
        failed = f" ({chunk.failed:,} failed)" if chunk.failed else ""
        status = f", provider status {chunk.status}" if chunk.status else ""
        detail = f": {chunk.detail}" if chunk.detail else ""
        lines.append(
            f"batch {chunk.chunk_id} {chunk.batch_id or '(not created)'}: {chunk.state}"
            f"{status}, {answered}{failed}{detail}"
        )
    return lines


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), help="The run's --output, if given.")
def cancel(job: Path, output: Path | None) -> None:
    """Cancel the open provider batches of JOB; a rerun sends their unfinished rows again."""
    import anyio

    from pipeline.batch.engine import cancel_batches

    try:
        prepared = resolve_job(job, output=output)
        cancelled = anyio.run(cancel_batches, prepared)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    except PipelineError as exc:
        _fail(str(exc), EXIT_STOPPED)
    if not cancelled:
        click.echo(f"{prepared.spec.name}: no open batches")
        return
    for chunk, state in cancelled:
        click.echo(f"batch {chunk.chunk_id} {state.batch_id}: {state.status}")


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), help="The run's --output, if given.")
@click.option(
    "--to", "destination", type=click.Path(path_type=Path), help="Where to write the export."
)
def export(job: Path, output: Path | None, destination: Path | None) -> None:
    """Write the rows of JOB finished so far to a Parquet file (safe while it runs)."""
    from pipeline.cluster.status import export_job

    try:
        prepared = resolve_job(job, output=output, read_key=False)
        target = destination or prepared.output_path.with_suffix(".partial.parquet")
        rows = export_job(prepared, target)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    click.echo(f"wrote {rows:,} finished row(s) to {_shown(target)}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def simulate(host: str, port: int, config: Path | None) -> None:
    """Run the bundled provider simulator in the foreground."""
    from pipeline.simulator import SimulatorConfig, serve

    settings = SimulatorConfig.from_yaml(config) if config else SimulatorConfig()
    serve(settings, host=host, port=port)


@main.command()
@click.argument("target", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--to",
    "destination",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the HTML (default: beside the output, <output stem>.report.html).",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The output of a run made with `run --output` (default: the job's output.path).",
)
def report(target: Path, destination: Path | None, output: Path | None) -> None:
    """Write an HTML report of a run: charts, summary and sample rows, viewable offline.

    TARGET is a job YAML or a results .parquet; the run log beside the output
    (<output>.run/events.jsonl) adds the charts over time when it is there.
    """
    from pipeline.report import locate, write_report

    try:
        if target.suffix.lower() != ".parquet" and job_has_steps(target):
            from pipeline.steps_report import write_steps_report

            written = write_steps_report(target, destination, output)
        else:
            with locate(target, output) as found:
                written = write_report(found, destination or found.default_report)
    except (SpecError, OSError) as exc:
        _fail(str(exc), EXIT_INVALID)
    for note in written.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"wrote {_shown(written.path)} ({written.charts} charts)")


@main.command()
@click.argument("target", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--errors", "errors_only", is_flag=True, help="Only the rows that ended in error.")
@click.option("--id", "row_id", help="Only the row with this id (or row number).")
@click.option("--id-column", help="The column --id refers to (default: the job's id column).")
@click.option("--columns", default="", help="Input columns to show too, comma-separated.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="At most N rows; 0 shows all.",
)
def show(
    target: Path,
    errors_only: bool,
    row_id: str | None,
    id_column: str | None,
    columns: str,
    limit: int,
) -> None:
    """Print the rows of a results .parquet (or a job YAML's output) readably.

    Each row: a header (id, status, tokens, cost, latency, attempts), then its
    error, the --columns asked for, and its reasoning and response, wrapped.
    """
    from pipeline.report import locate
    from pipeline.show import ShowError, ShowOptions, render_rows

    options = ShowOptions(
        errors_only=errors_only,
        row_id=row_id,
        id_column=id_column,
        columns=tuple(c.strip() for c in columns.split(",") if c.strip()),
        limit=limit,
    )
    try:
        with locate(target) as found:
            for block in render_rows(found, options):
                click.echo(block)
    except (SpecError, ShowError, OSError) as exc:
        _fail(str(exc), EXIT_INVALID)


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option(
    "--sample",
    type=click.IntRange(min=0),
    default=0,
    help="Run the first N rows for real (paid, and kept for the full run) to measure output.",
)
@click.option("--limit", type=click.IntRange(min=0), help="Estimate only the first N rows.")
def estimate(job: Path, sample: int, limit: int | None) -> None:
    """Estimate JOB's tokens, cost and time. Sends no completion unless --sample is given."""
    if job_has_steps(job):
        from pipeline.steps_cli import estimate_steps

        return estimate_steps(job, sample, limit)
    import anyio

    from pipeline.estimate import estimate as make_estimate

    try:
        prepared = resolve_job(job, limit=limit, read_key=True if sample else "if_set")
        with simulator_for(prepared) as served:
            report = anyio.run(lambda: make_estimate(served, sample=sample))
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    except PipelineError as exc:
        _fail(str(exc), EXIT_STOPPED)
    click.echo(_describe_estimate(report))


def _describe_estimate(report: Estimate) -> str:
    def money(value: float | None) -> str:
        return "unknown (no price for this model)" if value is None else f"${value:,.4f}"

    earlier = (
        f" ({report.answered:,} answered by earlier runs are paid for and not priced again)"
        if report.answered
        else ""
    )
    lines = [
        f"rows: {report.rows:,} to send{earlier}",
        f"input tokens: {report.input_tokens:,} ({report.counted_with})",
        f"output tokens: at most {report.max_output_per_row:,} a row "
        f"({report.rows * report.max_output_per_row:,} in all, the worst case)",
    ]
    if report.output_per_row is not None:
        sent_now = (
            " (answered earlier: nothing sent)"
            if not report.sample_sent
            else f", {report.sample_sent:,} of them sent now"
            if report.sample_sent < report.sample_rows
            else ""
        )
        lines.append(
            f"measured on {report.sample_rows:,} sampled row(s){sent_now}: "
            f"{report.output_per_row:,.0f} "
            f"output tokens a row, {report.reasoning_per_row or 0:,.0f} of them reasoning, "
            f"{report.latency_s or 0:.2f}s latency"
        )
        lines.append(f"expected cost: {money(report.cost_expected)}")
    lines.append(
        f"cost range: {money(report.cost_input)} (input only) to {money(report.cost_worst)} "
        "(every reply at max_tokens)"
    )
    if report.batch_cost_input is not None or report.batch_cost_worst is not None:
        expected = (
            f"expected {money(report.batch_cost_expected)}; "
            if report.batch_cost_expected is not None
            else ""
        )
        lines.append(
            f"online vs batch: online {money(report.cost_input)} to {money(report.cost_worst)}"
            f" | batch {expected}{money(report.batch_cost_input)} to "
            f"{money(report.batch_cost_worst)} (provider batch API, results within 24 h)"
        )
    wall = f"about {report.wall_s:,.0f}s" if report.wall_s is not None else "unknown"
    lines.append(f"time at the configured limits: {wall} ({report.wall_basis})")
    return "\n".join(lines)


@main.command()
@click.option("--provider", "provider_name", required=True, help="A preset name, e.g. openai.")
@click.option("--base-url", help="Overrides the preset's base URL.")
@click.option("--api-key-env", help="Overrides the preset's key variable.")
def models(provider_name: str, base_url: str | None, api_key_env: str | None) -> None:
    """List the models a provider serves (GET /v1/models)."""
    import anyio

    from pipeline.config import resolve_provider
    from pipeline.connect import open_provider
    from pipeline.spec import ModelSpec

    fields: dict[str, object] = {"provider": provider_name, "model": "-", "base_url": base_url}
    if api_key_env is not None:
        fields["api_key_env"] = api_key_env or None

    async def listing() -> list[str]:
        settings = resolve_provider(ModelSpec.model_validate(fields))
        async with open_provider(settings, connections=4, timeout_s=30.0) as provider:
            return await provider.list_models()

    try:
        names = anyio.run(listing)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    except PipelineError as exc:
        _fail(str(exc), EXIT_STOPPED)
    click.echo("\n".join(sorted(names)))


if __name__ == "__main__":
    main()
