"""The process around a run: signals, the drain deadline, the clients, writing the manifest, the exit code.

Exit codes (the contract with the platform):
    0  every item reached a final state (succeeded, or failed permanently and recorded); with the batch
       backend also: pending in a live batch
    1  work remains (interrupted, a unit could not be read or written, with the batch backend lines
       deferred by a full enqueued-token quota) — a rerun resumes it
    2  configuration or usage error, with a message that says what to fix
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from worker.azure_monitor import FLUSH_SECONDS, open_telemetry
from worker.batch.pipeline import BatchPipeline
from worker.batch.run import batch_pipeline, wait_for_batches
from worker.calls import Caller
from worker.errors import ConfigError, first_line
from worker.health import Health
from worker.peers import Peers
from worker.pipeline import Pipeline, PipelineLimits, Progress
from worker.pool import Router
from worker.ratelimit import Budgets
from worker.report import RunResult, RunStats, manifest
from worker.services import Clients, open_clients
from worker.settings import Settings, check_pool
from worker.storage import Sink
from worker.storage.urls import Location, overlap_filter, parse_location

log = structlog.get_logger("worker")

EXIT_DONE, EXIT_WORK_REMAINS, EXIT_CONFIG = 0, 1, 2


def new_run_id(settings: Settings) -> str:
    """The Container Apps execution name when there is one, else a sortable timestamp + random suffix."""
    if settings.run_id:
        return re.sub(r"[^A-Za-z0-9._-]", "-", settings.run_id)[:120]
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


async def run_job(settings: Settings, *, on_progress: Progress = lambda _done, _seen: None) -> RunResult:
    """Run one job to an exit code. Never raises for configuration problems: they become exit 2.

    After a SIGTERM everything is bounded: the drain, then writing what finished, then (best effort)
    releasing leases and writing the manifest until `STOP_DEADLINE_SECONDS`, then the telemetry flush.
    """
    result = RunResult(run_id=new_run_id(settings), exit_code=EXIT_DONE, stats=RunStats())
    telemetry = open_telemetry(settings, run_id=result.run_id)
    telemetry.attach(result.stats)
    with Stopper(settings.drain_seconds) as stopper:
        try:
            await _run(settings, result, stopper, on_progress)
        except Stopped:
            result.exit_code = EXIT_WORK_REMAINS
            result.error = "stopped by a signal before the work began; the next run does it"
        except ConfigError as error:
            result.exit_code, result.error = EXIT_CONFIG, str(error)
        except Exception as exc:  # noqa: BLE001 - e.g. storage unreachable: nothing is lost, a rerun resumes
            result.exit_code = EXIT_WORK_REMAINS
            result.error = f"{type(exc).__name__}: {first_line(str(exc))}"
            log.error("run.failed", error=result.error)
        result.ended = time.time()
        telemetry.record_run(result.stats, result.ended - result.started, exit_code=result.exit_code)
        flush_seconds = TELEMETRY_FLUSH_AFTER_SIGNAL_SECONDS if stopper.requested else FLUSH_SECONDS
        await asyncio.to_thread(telemetry.close, flush_seconds)
    if result.error and result.exit_code == EXIT_CONFIG:
        log.error("run.config_error", error=result.error)
    result.ended = time.time()
    return result


async def _run(settings: Settings, result: RunResult, stopper: Stopper, on_progress: Progress) -> None:
    settings.require("source", "sink")
    check_pool(settings)
    source_at = parse_location(settings.source or "", what="--source")
    sink_at = parse_location(settings.sink or "", what="--sink")
    async with open_clients(settings) as clients:
        sink = clients.sink(sink_at)
        await stopper.startup(sink.prepare())
        budgets = Budgets(tpm=settings.tpm, rpm=settings.rpm, concurrency=settings.concurrency)
        health = Health(outage_seconds=settings.outage_seconds)
        router = Router(settings.deployments, client_for=clients.openai_for, budgets=budgets, health=health)
        if router.pooled and settings.deployment not in {entry.serves for entry in settings.deployments}:
            log.warning(
                "config.deployment_outside_pool",
                deployment=settings.deployment,
                aliases=sorted({entry.serves for entry in settings.deployments}),
                detail="requests that name no model do not reach the pool's alias; AZURE_OPENAI_DEPLOYMENT "
                "in the environment beats the job file's `deployment`",
            )
        pipeline = _pipeline(settings, clients, sink, router, result.stats, source_at, sink_at, on_progress)
        log.info(
            "run.started",
            run_id=result.run_id,
            source=str(source_at),
            sink=str(sink_at),
            auth=settings.auth,
            concurrency=settings.concurrency,
            **({"deployments": [d.label for d in router.deployments]} if router.pooled else {}),
            backend=settings.backend,
        )
        peers = None
        if isinstance(pipeline, Pipeline):  # replicas sharing the quota: see worker/peers.py
            peers = Peers(sink, busy=pipeline.has_units_in_progress, on_count=budgets.set_peers)
            peers.start()
        try:
            try:
                await stopper.run(pipeline)
            finally:
                if peers is not None:
                    await stopper.cleanup(peers.stop(), "peers.leave_failed")
            if isinstance(pipeline, BatchPipeline):
                pipeline = await _wait_for_batches(
                    settings, clients, sink, router, result, stopper, (source_at, sink_at), pipeline
                )
        except ConfigError as error:
            result.exit_code, result.error = EXIT_CONFIG, str(error)
        if result.exit_code == EXIT_DONE and (
            pipeline.work_remains or result.stats.interrupted or result.stats.deferred or stopper.requested
        ):
            result.exit_code = EXIT_WORK_REMAINS
        await stopper.cleanup(pipeline.release_claimed_units(), "unit.release_failed")
        result.rate_limits = budgets.snapshot()
        result.deployments = router.report()
        if result.rate_limits:
            log.info("run.rate_limits", deployments=result.rate_limits)
        result.ended = time.time()
        document = manifest(result, settings)
        result.manifest = await stopper.cleanup(
            sink.write_manifest(result.run_id, document), "run.manifest_failed"
        )


async def _wait_for_batches(
    settings: Settings,
    clients: Clients,
    sink: Sink,
    router: Router,
    result: RunResult,
    stopper: Stopper,
    locations: tuple[Location, Location],
    first: BatchPipeline,
) -> BatchPipeline:
    """The batch backend: with --wait, look again until the batches are done; the manifest lists them."""

    def next_cycle() -> BatchPipeline:
        pipeline = _pipeline(settings, clients, sink, router, result.stats, *locations, first.progress)
        assert isinstance(pipeline, BatchPipeline)
        return pipeline

    last = await wait_for_batches(settings, first, result.stats, next_cycle, stopper.run)
    result.batches = list(last.entries.values())
    return last


def _pipeline(
    settings: Settings,
    clients: Clients,
    sink: Sink,
    router: Router,
    stats: RunStats,
    source_at: Location,
    sink_at: Location,
    on_progress: Progress,
) -> Pipeline:
    caller = Caller(
        router,
        tokens=clients.tokens if clients.uses_entra_for_openai else None,
        stats=stats,
        default_deployment=settings.deployment,
        max_attempts=settings.max_attempts,
        request_timeout=settings.request_timeout,
    )
    make: Callable[..., Pipeline] = (
        batch_pipeline(settings, clients, sink_at) if settings.backend == "batch" else Pipeline
    )
    return make(
        source=clients.source(source_at),
        sink=sink,
        caller=caller,
        limits=PipelineLimits(
            concurrency=settings.concurrency,
            lease_seconds=settings.lease_seconds,
            max_prompt_bytes=settings.max_prompt_bytes,
            max_jsonl_bytes=settings.max_jsonl_bytes,
            system_prompt=settings.system_prompt,
            parameters=settings.parameters,
        ),
        stats=stats,
        exclude=overlap_filter(source_at, sink_at),
        on_progress=on_progress,
        window=router.window,
        windows_full=router.windows_full,
    )


HARD_STOP_GRACE_SECONDS = 4.0
STOP_DEADLINE_SECONDS = 26.0  # after the first signal: leases and manifest are given up by then
CLEANUP_SECONDS = 60.0  # without a signal: how long the final writes may take
TELEMETRY_FLUSH_AFTER_SIGNAL_SECONDS = 2.0  # after SIGTERM most of the platform's 30 s are spent

T = TypeVar("T")


class Stopped(Exception):
    """A signal stopped the run before its work began."""


class Stopper:
    """SIGTERM/SIGINT handling, installed before anything else (Python as PID 1 ignores SIGTERM otherwise).

    What a signal does depends on the phase the run is in:
    - start-up (`startup`: credential, sink checks): the step is cancelled at once (`Stopped`).
    - the pipeline (`run`): it stops taking work and gets `drain_seconds` for in-flight calls, then
      writes what finished; still running `HARD_STOP_GRACE_SECONDS` after that (or at once when nothing
      is in flight), it is cancelled. Unwritten items are simply redone by the next run.
    - the final writes (`cleanup`): each is bounded by what is left until `STOP_DEADLINE_SECONDS`.
    A second signal skips the drain.
    """

    def __init__(self, drain_seconds: float) -> None:
        self._drain = drain_seconds
        self._pipeline: Pipeline | None = None
        self._current: asyncio.Future[Any] | None = None
        self._cancelling: asyncio.Future[Any] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._signalled_at: float | None = None
        self.requested = 0

    def __enter__(self) -> Stopper:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        return self

    def __exit__(self, *exc: object) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        for timer in self._timers:
            timer.cancel()

    def _on_signal(self, signum: signal.Signals) -> None:
        self.requested += 1
        log.warning("run.signal", signal=signum.name, count=self.requested)
        loop = asyncio.get_running_loop()
        if self._signalled_at is None:
            self._signalled_at = loop.time()
        if self._pipeline is None:
            self._cancel_current()  # start-up: nothing is in flight
            return
        drain = self._drain if self.requested == 1 else 0.0
        self._pipeline.request_stop(drain)
        if self._pipeline.idle or self.requested > 1:
            self._timers.append(
                loop.call_later(HARD_STOP_GRACE_SECONDS if drain else 0.0, self._cancel_current)
            )
        elif self.requested == 1:
            self._timers.append(loop.call_later(drain + HARD_STOP_GRACE_SECONDS, self._cancel_current))

    def _cancel_current(self) -> None:
        current = self._current
        if current is not None and not current.done():
            if self._pipeline is not None and current is self._pipeline_task:
                log.warning("run.hard_stop", reason="drain deadline passed")
            self._cancelling = current
            current.cancel()

    _pipeline_task: asyncio.Future[Any] | None = None

    async def _guard(self, awaitable: Awaitable[T]) -> T:
        task = asyncio.ensure_future(awaitable)
        self._current = task
        try:
            return await task
        except asyncio.CancelledError:
            if self._cancelling is task:
                raise Stopped from None
            task.cancel()
            raise
        finally:
            self._current = None

    async def startup(self, awaitable: Awaitable[T]) -> T:
        """A start-up step: a signal cancels it at once (raises Stopped)."""
        if self.requested:
            close = getattr(awaitable, "close", None)
            if close is not None:
                close()
            raise Stopped
        return await self._guard(awaitable)

    async def run(self, pipeline: Pipeline) -> None:
        """Run the pipeline under this stopper; a hard stop returns normally with work remaining."""
        self._pipeline = pipeline
        self._pipeline_task = asyncio.ensure_future(pipeline.run())
        if self.requested:  # signalled between start-up steps: nothing to drain
            pipeline.request_stop(0)
            loop = asyncio.get_running_loop()
            self._timers.append(loop.call_later(HARD_STOP_GRACE_SECONDS, self._cancel_current))
        try:
            await self._guard(self._pipeline_task)
        except Stopped:
            pipeline.work_remains = True

    async def cleanup(self, awaitable: Awaitable[T], failure_event: str) -> T | None:
        """A final write, best effort: bounded by CLEANUP_SECONDS, or by what is left until
        STOP_DEADLINE_SECONDS after a signal. Failures are logged as `failure_event`; None then."""
        timeout = CLEANUP_SECONDS
        if self._signalled_at is not None:
            timeout = self._signalled_at + STOP_DEADLINE_SECONDS - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(self._guard(awaitable), max(0.0, timeout))
        except (TimeoutError, Stopped):
            log.warning(
                failure_event, error="TimeoutError", detail=f"gave up after {max(0.0, timeout):.1f} s"
            )
        except Exception as exc:  # noqa: BLE001 - the results are written; a missing manifest is reported
            log.warning(failure_event, error=type(exc).__name__, detail=str(exc)[:300])
        return None
