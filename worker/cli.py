"""`worker run` and `worker doctor`: parse flags, load settings once, run, map the outcome to an exit code.

The flags of both commands are made from the settings table (worker.settings): each option's flag, help
and environment variables from `OPTIONS`, its type and default from the `Settings` field. A flag that is
not given is None, so that the environment, the job file or the default decides (see `load_settings`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, get_args

import structlog
import typer

from worker import logs
from worker.errors import ConfigError
from worker.lifecycle import EXIT_CONFIG, run_job
from worker.pipeline import Progress
from worker.report import RunResult, RunStats
from worker.settings import AUTH_MODES, OPTIONS, OPTIONS_BY_NAME, Settings, load_settings, shown_default

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Keyless, resumable batch worker for Azure OpenAI: prompt files in, Batch API result lines out.",
)

RUN_SETTINGS = tuple(option.name for option in OPTIONS if option.flag)
"""The settings `worker run` takes as flags: every one that has a flag."""
DOCTOR_SETTINGS = ("source", "sink", "deployment", "auth", "endpoint", "job_file")
BATCHES_SETTINGS = ("sink", "auth", "endpoint", "api_version", "job_file")
Command = TypeVar("Command", bound=Callable[..., None])


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


def _flag_type(name: str) -> type:
    """int or float when the setting's field is a number, else str (Settings validates the rest)."""
    annotation = Settings.model_fields[name].annotation
    kinds = get_args(annotation) or (annotation,)
    return next((kind for kind in (int, float) if kind in kinds), str)


def _flag(name: str) -> inspect.Parameter:
    """The command parameter of one setting: its flag, its help with its variables and default."""
    option = OPTIONS_BY_NAME[name]
    notes = [f"env: {', '.join(option.env)}"]
    default = shown_default(name)
    if default is not None:
        notes.append(f"default: {default}")
    help_text = option.help + "".join(f" \\[{note}]" for note in notes)  # \[: not rich markup
    kind: Any = _flag_type(name) | None
    flag = typer.Option(option.flag, help=help_text, show_default=False)
    annotation: object = Annotated[kind, flag]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def _setting_flags(*names: str) -> Callable[[Command], Command]:
    """Give a command one flag per setting in `names`, ahead of its own parameters; it gets them in
    `**flags` (None when not given)."""

    def add(command: Command) -> Command:
        own = inspect.signature(command, eval_str=True).parameters.values()
        parameters = [_flag(name) for name in names] + [p for p in own if p.kind is not p.VAR_KEYWORD]
        command.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
        return command

    return add


def _check_auth(flags: dict[str, Any]) -> None:
    auth = flags.get("auth")
    if auth is not None and auth not in AUTH_MODES:
        raise typer.BadParameter(f"must be one of {', '.join(AUTH_MODES)}", param_hint="--auth")


def _json_mode(settings_format: str) -> bool:
    return settings_format == "json" or (settings_format == "auto" and not sys.stdout.isatty())


def _load(flags: dict[str, Any]) -> Settings:
    try:
        return load_settings(flags, job_file=flags.pop("job_file"))
    except ConfigError as error:
        logs.configure(json_lines=not sys.stdout.isatty())
        structlog.get_logger("worker").error("run.config_error", error=str(error))
        _print_summary(RunResult(run_id="-", exit_code=EXIT_CONFIG, stats=RunStats(), error=str(error)), True)
        raise typer.Exit(EXIT_CONFIG) from None


@app.command()
@_setting_flags(*RUN_SETTINGS)
def run(
    *,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs (every retry).")] = False,
    **flags: Any,
) -> None:
    """Process every prompt file under SOURCE into result lines under SINK."""
    _check_auth(flags)
    settings = _load(flags)
    json_lines = _json_mode(settings.log_format)
    logs.configure(json_lines=json_lines, verbose=verbose)
    result = asyncio.run(_run_and_report(settings)) if json_lines else _run_with_progress(settings)
    raise typer.Exit(result.exit_code)


async def _run_and_report(
    settings: Settings, on_progress: Progress = lambda _done, _seen: None, *, json_lines: bool = True
) -> RunResult:
    """Run, then print the summary at once: before the event loop's shutdown waits for any thread."""
    result = await run_job(settings, on_progress=on_progress)
    _print_summary(result, json_lines)
    sys.stdout.flush()
    return result


@app.command()
@_setting_flags(*DOCTOR_SETTINGS)
def doctor(
    *,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object instead of the screen.")] = False,
    **flags: Any,
) -> None:
    """Explain what is misconfigured: credential and principal, DNS, tokens, source, sink, deployment."""

    from worker.doctor import diagnose, render

    _check_auth(flags)
    try:
        settings = load_settings(flags, job_file=flags.pop("job_file"))
    except ConfigError as error:
        typer.echo(f"FAIL  settings: {error}")
        raise typer.Exit(EXIT_CONFIG) from None
    logs.configure(json_lines=True, stream=sys.stderr)
    report = asyncio.run(diagnose(settings))
    typer.echo(json.dumps(report.as_dict()) if as_json else render(report))
    raise typer.Exit(0 if report.ok else EXIT_CONFIG)


@app.command()
@_setting_flags(*BATCHES_SETTINGS)
def batches(
    *,
    action: Annotated[
        str, typer.Argument(help="list (the default): this sink's batches; cancel: cancel the live ones.")
    ] = "list",
    **flags: Any,
) -> None:
    """List this sink's Batch API batches (status, counts), or cancel the live ones; the next
    `worker run --backend batch` collects what they answered."""
    from worker.batch.commands import sink_batches

    if action not in ("list", "cancel"):
        raise typer.BadParameter("must be list or cancel", param_hint="ACTION")
    _check_auth(flags)
    settings = _load(flags)
    logs.configure(json_lines=True, stream=sys.stderr)
    try:
        rows, summary = asyncio.run(sink_batches(settings, cancel=action == "cancel"))
    except ConfigError as error:
        typer.echo(json.dumps({"event": "batches.error", "error": str(error)}))
        raise typer.Exit(EXIT_CONFIG) from None
    for row in rows:
        typer.echo(json.dumps({"event": "batch", **row}))
    typer.echo(json.dumps({"event": "batches.summary", **summary}))


def _run_with_progress(settings: Settings) -> RunResult:
    """A progress bar whose total grows as files are opened (the listing is streamed), with an ETA from
    the rate items finish at (for a quota-bound job: the paced rate)."""
    from rich import progress as bar

    columns = (
        bar.SpinnerColumn(),
        bar.TextColumn("items"),
        bar.BarColumn(),
        bar.MofNCompleteColumn(),
        bar.TimeElapsedColumn(),
        bar.TextColumn("ETA"),
        bar.TimeRemainingColumn(),
    )
    with bar.Progress(*columns, transient=True) as progress:
        task = progress.add_task("items", total=None)

        def advance(done: int, seen: int) -> None:
            progress.update(task, advance=done, total=max(seen, 1))

        return asyncio.run(_run_and_report(settings, advance, json_lines=False))


def _print_summary(result: RunResult, json_lines: bool) -> None:
    summary = result.summary()
    if json_lines:
        structlog.get_logger("worker").info("run.summary", **summary)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"run {result.run_id}", show_header=False)
    deployments = summary.pop("deployments", {})
    for key, value in summary.items():
        if value not in (None, {}, 0) or key in ("total", "succeeded", "failed", "skipped", "exit_code"):
            table.add_row(key, str(value))
    for label, counts in deployments.items():
        table.add_row(f"deployment {label}", _deployment_line(counts))
    Console().print(table)


def _deployment_line(counts: dict[str, Any]) -> str:
    """`120 calls, 3 × 429, 51,200 + 9,800 tokens, tpm 30000, rpm —` (limits configured or learned)."""
    line = (
        f"{counts['calls']} calls, {counts['throttled']} × 429, "
        f"{counts['prompt_tokens']:,} + {counts['completion_tokens']:,} tokens, "
        f"tpm {counts['tpm'] or '—'}, rpm {counts['rpm'] or '—'}"
    )
    return line + (", down" if counts.get("down") else "")


def main() -> None:
    app()
