"""`worker batches [cancel]`: this sink's batches, from its `_batches/` records, as the service sees them."""

from __future__ import annotations

from collections import Counter
from typing import Any

import structlog
from openai.types import Batch

from worker.batch.lines import LIVE_STATUSES, metadata_matches
from worker.batch.run import batch_service
from worker.batch.service import BatchGone, request_counts
from worker.batch.state import LIVE, SUBMITTING, BatchStore
from worker.services import open_clients
from worker.settings import Settings
from worker.storage.urls import parse_location

log = structlog.get_logger("worker.batch")


async def sink_batches(
    settings: Settings, *, cancel: bool = False
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One row per batch record of the sink (live ones looked up at the service, and cancelled when
    `cancel`), and a summary. The next `worker run --backend batch` collects what cancelled batches answered."""
    settings.require("sink", "endpoint")
    sink_at = parse_location(settings.sink or "", what="--sink")
    rows: list[dict[str, Any]] = []
    cancelled = 0
    listing: list[Batch] | None = None
    async with open_clients(settings) as clients:
        store = BatchStore(clients.sink(sink_at))
        service = batch_service(settings, clients)
        for record in sorted(await store.all_records(), key=lambda record: (record.unit, record.part)):
            row: dict[str, Any] = {
                "batch_id": record.batch_id,
                "input": record.unit,
                "part": record.part,
                "deployment": record.deployment,
                "lines": len(record.custom_ids),
                "state": record.state,
                "status": record.status,
                "request_counts": record.request_counts,
                "created_at": record.created_at,
            }
            if record.state == SUBMITTING:  # its create's answer was lost: the batch may exist all the same
                if listing is None:
                    listing = await service.list_all()
                found = next(
                    (
                        batch
                        for batch in listing
                        if metadata_matches(
                            batch.metadata, str(sink_at), record.unit, record.part, record.record_id
                        )
                    ),
                    None,
                )
                if found is not None:
                    row["batch_id"], record.batch_id, record.state = found.id, found.id, LIVE
            if record.state == LIVE and record.batch_id is not None:
                try:
                    batch = await service.retrieve(record.batch_id)
                    if cancel and batch.status in LIVE_STATUSES - {"cancelling"}:
                        batch = await service.cancel(record.batch_id)
                        cancelled += 1
                        log.info(
                            "batch.cancelled", batch_id=record.batch_id, input=record.unit, part=record.part
                        )
                    row["status"], row["request_counts"] = batch.status, request_counts(batch)
                except BatchGone:
                    row["status"] = "gone"
            rows.append(row)
    summary: dict[str, Any] = {
        "batches": len(rows),
        "by_status": dict(Counter(str(row["status"]) for row in rows)),
        "live": sum(1 for row in rows if row["status"] in LIVE_STATUSES),
    }
    if cancel:
        summary["cancelled"] = cancelled
    return rows, summary
