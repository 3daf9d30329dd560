"""`worker run` and `worker doctor`: parse flags, load settings once, run, map the outcome to an exit code."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Annotated, Any

import structlog
import typer

from worker import logs
from worker.errors import ConfigError
from worker.lifecycle import EXIT_CONFIG, run_job
from worker.report import RunResult, RunStats
from worker.settings import AUTH_MODES, OPTIONS_BY_NAME, Settings, load_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Keyless, resumable batch worker for Azure OpenAI: prompt files in, Batch API result lines out.",
)


def _print_version(value: bool) -> None:
    if value:
        from worker import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", help="Print the version and exit.", callback=_print_version, is_eager=True),
    ] = False,
) -> None:
    """Keyless, resumable batch worker for Azure OpenAI."""


def _help(name: str) -> str:
    option = OPTIONS_BY_NAME[name]
    return f"{option.help} [env: {', '.join(option.env)}]"


def _json_mode(settings_format: str) -> bool:
    return settings_format == "json" or (settings_format == "auto" and not sys.stdout.isatty())


def _load(flags: dict[str, Any], job: str | None) -> Settings:
    try:
        return load_settings(flags, job_file=job)
    except ConfigError as error:
        logs.configure(json_lines=not sys.stdout.isatty())
        structlog.get_logger("worker").error("run.config_error", error=str(error))
        _print_summary(RunResult(run_id="-", exit_code=EXIT_CONFIG, stats=RunStats(), error=str(error)), True)
        raise typer.Exit(EXIT_CONFIG) from None


@app.command()
def run(
    source: Annotated[str | None, typer.Option(help=_help("source"), show_default=False)] = None,
    sink: Annotated[str | None, typer.Option(help=_help("sink"), show_default=False)] = None,
    deployment: Annotated[str | None, typer.Option(help=_help("deployment"), show_default=False)] = None,
    auth: Annotated[
        str | None, typer.Option(help=_help("auth") + " [default: auto]", show_default=False)
    ] = None,
    concurrency: Annotated[int | None, typer.Option(help=_help("concurrency") + " [default: 32]")] = None,
    job: Annotated[
        str | None, typer.Option(help="TOML job file (see jobs/example.toml) [env: WORKER_JOB_FILE]")
    ] = None,
    request_timeout: Annotated[
        float | None, typer.Option(help=_help("request_timeout") + " [default: 120]")
    ] = None,
    max_attempts: Annotated[int | None, typer.Option(help=_help("max_attempts") + " [default: 6]")] = None,
    tpm: Annotated[int | None, typer.Option(help=_help("tpm"))] = None,
    rpm: Annotated[int | None, typer.Option(help=_help("rpm"))] = None,
    drain_seconds: Annotated[
        float | None, typer.Option(help=_help("drain_seconds") + " [default: 15]")
    ] = None,
    outage_seconds: Annotated[
        float | None, typer.Option(help=_help("outage_seconds") + " [default: 300]")
    ] = None,
    lease_seconds: Annotated[int | None, typer.Option(help=_help("lease_seconds") + " [default: 30]")] = None,
    endpoint: Annotated[str | None, typer.Option(help=_help("endpoint"))] = None,
    api_version: Annotated[str | None, typer.Option(help=_help("api_version"))] = None,
    run_id: Annotated[str | None, typer.Option(help=_help("run_id"))] = None,
    log_format: Annotated[str | None, typer.Option(help=_help("log_format") + " [default: auto]")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs (every retry).")] = False,
) -> None:
    """Process every prompt file under SOURCE into result lines under SINK."""
    if auth is not None and auth not in AUTH_MODES:
        raise typer.BadParameter(f"must be one of {', '.join(AUTH_MODES)}", param_hint="--auth")
    flags = {
        "source": source,
        "sink": sink,
        "deployment": deployment,
        "auth": auth,
        "concurrency": concurrency,
        "request_timeout": request_timeout,
        "max_attempts": max_attempts,
        "tpm": tpm,
        "rpm": rpm,
        "drain_seconds": drain_seconds,
        "outage_seconds": outage_seconds,
        "lease_seconds": lease_seconds,
        "endpoint": endpoint,
        "api_version": api_version,
        "run_id": run_id,
        "log_format": log_format,
    }
    settings = _load(flags, job)
    json_lines = _json_mode(settings.log_format)
    logs.configure(json_lines=json_lines, verbose=verbose)
    result = asyncio.run(_run_and_report(settings)) if json_lines else _run_with_progress(settings)
    raise typer.Exit(result.exit_code)


async def _run_and_report(
    settings: Settings, on_progress: Callable[[int], None] = lambda _n: None, *, json_lines: bool = True
) -> RunResult:
    """Run, then print the summary at once: before the event loop's shutdown waits for any thread."""
    result = await run_job(settings, on_progress=on_progress)
    _print_summary(result, json_lines)
    sys.stdout.flush()
    return result


@app.command()
def doctor(
    source: Annotated[str | None, typer.Option(help=_help("source"), show_default=False)] = None,
    sink: Annotated[str | None, typer.Option(help=_help("sink"), show_default=False)] = None,
    deployment: Annotated[str | None, typer.Option(help=_help("deployment"), show_default=False)] = None,
    auth: Annotated[str | None, typer.Option(help=_help("auth"), show_default=False)] = None,
    endpoint: Annotated[str | None, typer.Option(help=_help("endpoint"), show_default=False)] = None,
    job: Annotated[str | None, typer.Option(help="TOML job file [env: WORKER_JOB_FILE]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of the screen.")] = False,
) -> None:
    """Explain what is misconfigured: credential and principal, DNS, tokens, source, sink, deployment."""
    import json

    from worker.doctor import diagnose, render

    if auth is not None and auth not in AUTH_MODES:
        raise typer.BadParameter(f"must be one of {', '.join(AUTH_MODES)}", param_hint="--auth")
    flags = {"source": source, "sink": sink, "deployment": deployment, "auth": auth, "endpoint": endpoint}
    try:
        settings = load_settings(flags, job_file=job)
    except ConfigError as error:
        typer.echo(f"FAIL  settings: {error}")
        raise typer.Exit(EXIT_CONFIG) from None
    logs.configure(json_lines=True, stream=sys.stderr)
    report = asyncio.run(diagnose(settings))
    typer.echo(json.dumps(report.as_dict()) if as_json else render(report))
    raise typer.Exit(0 if report.ok else EXIT_CONFIG)


def _run_with_progress(settings: Settings) -> RunResult:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (SpinnerColumn(), TextColumn("items"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("items", total=None)
        return asyncio.run(_run_and_report(settings, lambda n: progress.advance(task, n), json_lines=False))


def _print_summary(result: RunResult, json_lines: bool) -> None:
    summary = result.summary()
    if json_lines:
        structlog.get_logger("worker").info("run.summary", **summary)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {result.run_id}", show_header=False)
    for key, value in summary.items():
        if value not in (None, {}, 0) or key in ("total", "succeeded", "failed", "skipped", "exit_code"):
            table.add_row(key, str(value))
    Console().print(table)


def main() -> None:
    app()
