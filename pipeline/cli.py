"""The command line: arguments in, exit codes out. All the work happens in runner."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.errors import PipelineError, SpecError
from pipeline.runner import (
    EXIT_INVALID,
    EXIT_STOPPED,
    RunOptions,
    RunSummary,
    execute,
    export_partial,
    prepare,
    status,
)


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline")
def main() -> None:
    """Run an LLM prompt over every row of a CSV or Parquet table."""


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
def validate(job: Path) -> None:
    """Check JOB (spec, input, templates, output, key) without sending anything."""
    try:
        prepared = prepare(job)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    click.echo(
        f"ok: {job} is valid: {prepared.rows} rows from {prepared.spec.input.path}, "
        f"provider {prepared.settings.name}, model {prepared.settings.model}, "
        f"output {prepared.output_path}"
    )


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--limit", type=click.IntRange(min=0), help="Process only the first N rows.")
@click.option(
    "--output", type=click.Path(path_type=Path), help="Write here instead of output.path."
)
@click.option("--quiet", is_flag=True, help="No progress display.")
@click.option("--fresh", is_flag=True, help="Ignore results recorded by earlier runs.")
@click.option("--retry-failed", is_flag=True, help="Send rows that ended in error again.")
def run(
    job: Path, limit: int | None, output: Path | None, quiet: bool, fresh: bool, retry_failed: bool
) -> None:
    """Run JOB: send every row that has no result yet, then write the output Parquet.

    Rerun the same command to resume: finished rows whose request is unchanged are
    reused, so only new, changed or unfinished rows are sent.
    """
    try:
        prepared = prepare(job, output=output, limit=limit)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    try:
        options = RunOptions(
            handle_signals=True, show_progress=not quiet, fresh=fresh, retry_failed=retry_failed
        )
        summary = execute(prepared, options)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    except PipelineError as exc:
        _fail(str(exc), EXIT_STOPPED)
    _print_summary(summary, job, output)
    sys.exit(summary.exit_code)


def _print_summary(summary: RunSummary, job: Path, output: Path | None) -> None:
    totals = summary.totals
    rerun = f"pipeline run {job}" + (f" --output {output}" if output else "")
    lines = [
        f"rows: {summary.rows} ({summary.reused} reused from earlier runs, "
        f"{summary.sent} sent this run, {summary.run_failed} failed this run)",
        f"tokens (all finished rows): {totals.prompt_tokens} in, {totals.output_tokens} out, "
        f"{totals.reasoning_tokens} reasoning",
        f"cost: ${summary.run_cost:.6f} this run, ${totals.cost_usd:.6f} all finished rows",
        f"time: {summary.wall_s:.1f}s in all, {summary.outcome.active_s:.2f}s from first request "
        f"to last answer; retries {summary.outcome.retries}, "
        f"rate limited {summary.outcome.rate_limited}",
    ]
    if summary.fatal is not None:
        lines.append(
            f"stopped: {summary.fatal.describe()}\n"
            f"  what to do: {summary.fatal.advice}; then `{rerun}` resumes"
        )
    elif summary.outcome.interrupted:
        lines.append(f"interrupted: finished rows are saved; `{rerun}` resumes")
    elif summary.output_path is not None:
        lines.append(f"output: {summary.output_path}")
        if totals.failed:
            lines.append(
                f"{totals.failed} row(s) ended in error; see the `error` column, "
                f"or send them again with `{rerun} --retry-failed`"
            )
    click.echo("\n".join(lines), err=True)


@main.command(name="status")
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), help="The run's --output, if given.")
def status_command(job: Path, output: Path | None) -> None:
    """Show progress of JOB from its checkpoint: done, failed, pending, tokens, cost, ETA."""
    try:
        prepared = prepare(job, output=output, read_key=False)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    report = status(prepared)
    if report is None:
        click.echo(f"{prepared.spec.name}: not started ({prepared.rows} rows pending)")
        return
    totals = report.totals
    eta = report.eta_s
    lines = [
        f"{prepared.spec.name}: {report.finished}/{report.rows} rows finished "
        f"({report.failed} failed), {report.pending} pending",
        f"tokens: {totals.prompt_tokens} in, {totals.output_tokens} out, "
        f"{totals.reasoning_tokens} reasoning; cost ${totals.cost_usd:.6f}",
        f"rate: {report.recent_rows_per_s:.1f} rows/s over the last minute; "
        + ("done" if eta == 0 else f"about {eta:.0f}s left" if eta else "not running"),
    ]
    click.echo("\n".join(lines))


@main.command()
@click.argument("job", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(path_type=Path), help="The run's --output, if given.")
@click.option(
    "--to", "destination", type=click.Path(path_type=Path), help="Where to write the export."
)
def export(job: Path, output: Path | None, destination: Path | None) -> None:
    """Write the rows of JOB finished so far to a Parquet file (safe while it runs)."""
    try:
        prepared = prepare(job, output=output, read_key=False)
        target = destination or prepared.output_path.with_suffix(".partial.parquet")
        rows = export_partial(prepared, target)
    except SpecError as exc:
        _fail(str(exc), EXIT_INVALID)
    click.echo(f"wrote {rows} finished row(s) to {target}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def simulate(host: str, port: int, config: Path | None) -> None:
    """Run the bundled provider simulator in the foreground."""
    from pipeline.simulator import SimulatorConfig, serve

    settings = SimulatorConfig.from_yaml(config) if config else SimulatorConfig()
    serve(settings, host=host, port=port)


if __name__ == "__main__":
    main()
