"""The batch backend in a run: its pipeline, and `--wait` (look again every poll interval until done)."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable

import structlog

from worker.batch.pipeline import BatchOptions, BatchPipeline
from worker.batch.service import BatchService
from worker.report import RunStats, tokens_cost
from worker.services import Clients
from worker.settings import Settings
from worker.storage.urls import Location

log = structlog.get_logger("worker.batch")


def batch_service(settings: Settings, clients: Clients) -> BatchService:
    return BatchService(
        clients.openai,
        tokens=clients.tokens if clients.uses_entra_for_openai else None,
        api_version=settings.api_version,
    )


def batch_pipeline(settings: Settings, clients: Clients, sink_at: Location) -> Callable[..., BatchPipeline]:
    """Makes a BatchPipeline from the online Pipeline's keyword arguments (the same source, sink, caller,
    limits and stats), with the Batch API service and options of these settings."""
    options = BatchOptions(
        sink=str(sink_at),
        max_lines=settings.batch_max_lines,
        max_bytes=settings.batch_max_bytes,
        fallback_online=settings.batch_fallback == "online",
        max_attempts=settings.max_attempts,
        cost=lambda prompt, completion: tokens_cost(prompt, completion, settings, batch=True),
    )
    return functools.partial(BatchPipeline, service=batch_service(settings, clients), options=options)


async def wait_for_batches(
    settings: Settings,
    first: BatchPipeline,
    stats: RunStats,
    next_cycle: Callable[[], BatchPipeline],
    run: Callable[[BatchPipeline], Awaitable[None]],
) -> BatchPipeline:
    """With `--wait`: while items are pending in live batches, wait a poll interval and run again (collect,
    resubmit, submit). Counts stay those of one run: items are counted once, where they ended.
    Returns the last cycle's pipeline, whose `entries` hold every batch seen."""
    pipeline = first
    deadline = time.monotonic() + settings.wait
    entries = dict(first.entries)
    while settings.wait > 0 and _waiting_for(stats) and not pipeline.work_remains and pipeline.fatal is None:
        left = deadline - time.monotonic()
        if left <= 0:
            log.info("batch.wait_over", pending=stats.pending, waited_s=settings.wait)
            break
        log.info("batch.waiting", pending=stats.pending, next_look_s=min(left, settings.batch_poll_seconds))
        if await pipeline.stopped_within(min(left, settings.batch_poll_seconds)):
            break
        done_before = stats.succeeded + stats.failed
        problems = len(stats.problems)
        for name in (
            "total",
            "skipped",
            "pending",
            "deferred",
            "interrupted",
            "units_done",
            "units_skipped",
            "units_held",
            "changed_inputs",
        ):
            setattr(stats, name, 0)
        pipeline = next_cycle()
        await run(pipeline)
        stats.skipped -= done_before  # recorded by an earlier cycle of this run, not before it
        del stats.problems[problems:]  # the same input problems, met again
        entries.update(pipeline.entries)
    pipeline.entries = entries
    return pipeline


def _waiting_for(stats: RunStats) -> bool:
    return stats.pending - stats.deferred > 0
