"""One batch-backend run over a source into a sink: the online pipeline's listing, claims and result
writer, with another way of working a unit.

For each unit (claimed under a lease, as online):
1. its `submitting` records are healed: the batch is adopted by its metadata, or the record dropped;
2. its live batches are looked at; a finished one's output and error files become result lines (ids the
   result file holds already are skipped: exactly once), and only then is its record marked collected;
3. its items are read again (the same reader as online): rejected ones get their error record, ids in a
   live batch are `pending`, the rest (new ones, and lines that expired or failed retryably) go into new
   Batch input files, or online with `--batch-fallback online`;
4. the unit is marked complete when every item has a record, else released for a later run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from openai.types import Batch

from worker import formats
from worker.batch.lines import (
    LIVE_STATUSES,
    Chunk,
    Chunker,
    LineTooLarge,
    batch_metadata,
    endpoint_of,
    input_line,
    judge_validation,
    metadata_matches,
    read_result_line,
)
from worker.batch.service import (
    BatchGone,
    BatchService,
    CreateUnknown,
    QuotaFull,
    request_counts,
    validation_errors,
)
from worker.batch.state import COLLECTED, LIVE, SUBMITTING, BatchRecord, BatchStore, now_iso
from worker.errors import ConfigError
from worker.formats import Duplicate, Rejected, Request
from worker.pipeline import Pipeline, Progress, UnitWriter
from worker.ratelimit import estimate_tokens
from worker.storage import ClaimedUnit, SourceFile

log = structlog.get_logger("worker.batch")

Cost = Callable[[int, int], float | None]


@dataclass(frozen=True, kw_only=True)
class BatchOptions:
    sink: str
    """The sink's URL or path, as it names the batches in their metadata."""
    max_lines: int
    max_bytes: int
    fallback_online: bool
    max_attempts: int
    """Batches a line may go into without an answer (expired, 5xx) before it is left `interrupted`."""
    cost: Cost
    """Estimated cost of (prompt, completion) tokens at the batch price (None: no price configured)."""


@dataclass
class UnitWork:
    """One unit's work in this run."""

    path: str
    unit: ClaimedUnit
    writer: UnitWriter
    chunker: Chunker
    collected: set[str] = field(default_factory=set)
    """Ids recorded by this run's collection."""
    live: set[str] = field(default_factory=set)
    """Ids in a live batch."""
    tries: Counter[str] = field(default_factory=Counter)
    """Per id, the collected batches it was in: those not recorded expired or failed retryably there."""
    next_part: int = 1
    online: set[asyncio.Task[None]] = field(default_factory=set)
    open: int = 0
    """Items left without a record (pending, deferred or interrupted)."""


class BatchPipeline(Pipeline):
    def __init__(self, *, service: BatchService, options: BatchOptions, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.progress: Progress = kwargs.get("on_progress", lambda _done, _seen: None)
        """What the run reports progress to (the next --wait cycle reports to it too)."""
        self._service = service
        self._options = options
        self._store = BatchStore(self._sink)
        self._quota_full: set[str] = set()
        self._listing: list[Batch] | None = None
        self._listing_lock = asyncio.Lock()
        self.entries: dict[str, dict[str, Any]] = {}
        """Per batch, for the manifest: key = batch id (or the record name while it has none)."""

    async def stopped_within(self, seconds: float) -> bool:
        """Wait `seconds` unless a stop is requested meanwhile; True when it was."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    # ---- a unit ------------------------------------------------------------------------------------

    async def _work_unit(self, file: SourceFile, unit: ClaimedUnit) -> None:
        writer = UnitWriter(unit, self._stats, self._on_progress)
        complete, items = False, 0
        with structlog.contextvars.bound_contextvars(file=file.path):
            try:
                complete, items = await self._batch_unit(file, unit, writer)
            except ConfigError as error:
                self._fail(error)
            except Exception as exc:  # noqa: BLE001 - one unit's trouble does not stop the others
                self.work_remains = True
                log.warning("unit.batch_failed", error=type(exc).__name__, detail=str(exc)[:300])
            with contextlib.suppress(Exception):
                await writer.close()
            complete = complete and writer.failed is None and writer.unwritten == 0
            await self._close_unit(unit, writer, complete, items, pending_ok=True)

    async def _batch_unit(self, file: SourceFile, unit: ClaimedUnit, writer: UnitWriter) -> tuple[bool, int]:
        """Collect, then submit; (whether every item has a record, the number of items)."""
        records = await self._store.unit_records(file.path)
        work = UnitWork(file.path, unit, writer, Chunker(self._options.max_lines, self._options.max_bytes))
        for record in records:
            if record.state == SUBMITTING:
                await self._adopt(record)
        for record in records:
            if record.state == LIVE and not self._stopping.is_set():
                await self._collect(record, unit, writer, work.collected)
        work.live = {
            custom_id for record in records if record.state == LIVE for custom_id in record.custom_ids
        }
        work.tries = Counter(
            custom_id for record in records if record.state == COLLECTED for custom_id in record.custom_ids
        )
        work.next_part = max((record.part for record in records), default=0) + 1
        items, read_all = 0, True
        async for parsed in formats.read_items(self._source, file, self._limits):
            if isinstance(parsed, Duplicate):
                self._report_duplicate(file.path, parsed)
                continue
            items += 1
            self._stats.total += 1
            if not await self._item(work, parsed):
                read_all = False
                break
        for chunk in work.chunker.rest():
            if self._stopping.is_set():  # stopping: these lines wait for the next run
                self._stats.interrupted += len(chunk.custom_ids)
                work.open += len(chunk.custom_ids)
                continue
            await self._submit(chunk, work)
        if work.online:
            await asyncio.gather(*work.online, return_exceptions=True)
        return read_all and work.open == 0, items

    async def _item(self, work: UnitWork, parsed: Request | Rejected) -> bool:
        """Place one item: skipped, recorded, pending, online or into a Batch file; False when stopping."""
        custom_id = parsed.custom_id
        if custom_id in work.unit.done_ids:
            self._stats.skipped += 1
            self._on_progress(1)
        elif custom_id in work.collected:
            pass  # recorded by this run's collection and counted there
        elif isinstance(parsed, Rejected):
            self._record_rejected(work.path, parsed, work.writer)
        elif custom_id in work.live:
            self._stats.pending += 1
            work.open += 1
        elif self._stopping.is_set():
            self._stats.interrupted += 1
            work.open += 1
            return False
        elif work.tries[custom_id] and self._options.fallback_online:  # no answer from a batch: online now
            if not await self._start_call(work.path, parsed, work.writer, work.online):
                self._stats.interrupted += 1
                work.open += 1
                return False
        elif work.tries[custom_id] >= self._options.max_attempts:
            self._stats.interrupted += 1
            work.open += 1
            log.warning(
                "item.unfinished",
                custom_id=custom_id,
                reason=f"{work.tries[custom_id]} batches returned no answer for it (expired or failed "
                "retryably); it is not submitted again: run it with --batch-fallback online or --backend online",
            )
        else:
            full = self._add(work.chunker, work.path, parsed, work.writer)
            if full is not None:
                await self._submit(full, work)
        return True

    def _add(self, chunker: Chunker, path: str, request: Request, writer: UnitWriter) -> Chunk | None:
        deployment, _ = self._caller.deployment_for(request)
        body = {**request.body, "model": deployment}
        line = input_line(request, deployment)
        try:
            return chunker.add(deployment, request.url, request.custom_id, line, estimate_tokens(body))
        except LineTooLarge as exc:
            rejected = Rejected(request.custom_id, "request_too_large", str(exc), request.line)
            self._record_rejected(path, rejected, writer)
            return None

    # ---- submitting ---------------------------------------------------------------------------------

    async def _submit(self, chunk: Chunk, work: UnitWork) -> None:
        unit, part = work.path, work.next_part
        work.next_part += 1
        count = len(chunk.custom_ids)
        work.open += count
        self._stats.pending += count
        if chunk.deployment in self._quota_full:
            self._stats.deferred += count
            return
        record = BatchRecord(
            unit=unit,
            part=part,
            deployment=chunk.deployment,
            url=chunk.url,
            custom_ids=chunk.custom_ids,
            size=chunk.size,
            estimated_tokens=chunk.estimated_tokens,
        )
        await self._store.save(record)  # before the create: a lost answer is adopted, never submitted twice
        try:
            record.input_file_id = await self._service.upload(
                f"{unit.replace('/', '_')}.{part}.jsonl", chunk.data
            )
        except BaseException:
            self._stats.pending -= count
            self._stats.interrupted += count
            with contextlib.suppress(Exception):
                await self._store.delete(record)
            raise
        try:
            batch = await self._service.create(
                record.input_file_id,
                endpoint_of(chunk.url),
                batch_metadata(self._options.sink, unit, part, record.record_id),
            )
        except QuotaFull as full:
            self._quota_full.add(chunk.deployment)
            self._stats.deferred += count
            log.warning("batch.quota_full", deployment=chunk.deployment, lines=count, detail=str(full)[:300])
            await self._store.delete(record)
            return
        except CreateUnknown as unknown:
            self._stats.pending -= count
            self._stats.interrupted += count
            self.work_remains = True
            log.warning("batch.create_unknown", part=part, lines=count, failure=str(unknown))
            return
        except BaseException:  # the record stays: the next run adopts the batch if there is one
            self._stats.pending -= count
            self._stats.interrupted += count
            raise
        record.batch_id, record.state, record.status = batch.id, LIVE, batch.status
        log.info("batch.submitted", batch_id=batch.id, part=part, lines=count, deployment=chunk.deployment)
        self._note(record, submitted=True)
        await self._store.save(record)

    # ---- adopting and collecting --------------------------------------------------------------------

    async def _adopt(self, record: BatchRecord) -> None:
        """A record whose create answer was lost: adopt the batch its metadata names, or drop the record."""
        async with self._listing_lock:
            if self._listing is None:
                self._listing = await self._service.list_all()
        found = next(
            (
                batch
                for batch in self._listing
                if metadata_matches(
                    batch.metadata, self._options.sink, record.unit, record.part, record.record_id
                )
            ),
            None,
        )
        if found is None:
            log.info("batch.never_created", part=record.part, lines=len(record.custom_ids))
            await self._store.delete(record)
            record.state = COLLECTED  # nothing of it is live; its lines are submitted again
            record.custom_ids = []
            return
        record.batch_id, record.state, record.status = found.id, LIVE, found.status
        await self._store.save(record)
        log.info("batch.adopted", batch_id=found.id, part=record.part, lines=len(record.custom_ids))
        self._note(record, adopted=True)

    async def _collect(
        self, record: BatchRecord, unit: ClaimedUnit, writer: UnitWriter, collected: set[str]
    ) -> None:
        assert record.batch_id is not None
        try:
            batch = await self._service.retrieve(record.batch_id)
        except BatchGone as gone:
            log.warning("batch.gone", batch_id=record.batch_id, detail=str(gone))
            record.status = "gone"
            await self._mark_collected(record)
            return
        record.status, record.request_counts = batch.status, request_counts(batch)
        if batch.status in LIVE_STATUSES:
            self._note(record)
            return
        ids = set(record.custom_ids)
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                data = await self._service.content(file_id)
                self._record_lines(data, ids, unit, writer, collected, record)
        problem = None
        if batch.status == "failed":
            problem = self._judge_failure(batch, record, unit, writer, collected)
        await writer.close()
        if writer.failed is not None:
            raise writer.failed
        await self._mark_collected(record)
        log.info(
            "batch.collected", batch_id=record.batch_id, status=batch.status, counts=record.request_counts
        )
        if problem is not None:
            raise ConfigError(
                f"batch {record.batch_id} for {record.unit} failed validation ({problem}): check that "
                f"{record.deployment!r} is a Global Batch deployment and that --batch-max-lines fits the service"
            )

    def _record_lines(
        self,
        data: bytes,
        ids: set[str],
        unit: ClaimedUnit,
        writer: UnitWriter,
        collected: set[str],
        record: BatchRecord,
    ) -> None:
        for raw in data.splitlines():
            if not raw.strip():
                continue
            outcome = read_result_line(raw)
            if outcome is None or outcome.custom_id not in ids:
                continue
            custom_id = outcome.custom_id
            if custom_id in unit.done_ids or custom_id in collected or outcome.retry:
                continue
            code = None if outcome.error is None else outcome.error["code"]
            if code is not None:
                log.warning("item.failed", custom_id=custom_id, code=code)
            writer.add(formats.result_line(custom_id, response=outcome.response, error=outcome.error), code)
            collected.add(custom_id)
            self._add_tokens(record, outcome.prompt_tokens, outcome.completion_tokens)

    def _add_tokens(self, record: BatchRecord, prompt: int, completion: int) -> None:
        stats = self._stats
        stats.prompt_tokens += prompt
        stats.completion_tokens += completion
        stats.batch_prompt_tokens += prompt
        stats.batch_completion_tokens += completion
        record.tokens["prompt"] = record.tokens.get("prompt", 0) + prompt
        record.tokens["completion"] = record.tokens.get("completion", 0) + completion

    def _judge_failure(
        self, batch: Batch, record: BatchRecord, unit: ClaimedUnit, writer: UnitWriter, collected: set[str]
    ) -> str | None:
        """A batch that failed validation: quota → back off; lines named → their error records; anything
        else is returned (a configuration problem)."""
        verdict = judge_validation(validation_errors(batch), record.custom_ids)
        if verdict.quota:
            self._quota_full.add(record.deployment)
            log.warning("batch.quota_full", batch_id=record.batch_id, deployment=record.deployment)
        for custom_id, error in verdict.line_errors.items():
            if custom_id in unit.done_ids or custom_id in collected:
                continue
            log.warning("item.failed", custom_id=custom_id, code=error["code"])
            writer.add(formats.result_line(custom_id, error=error), error["code"])
            collected.add(custom_id)
        return verdict.problem if not verdict.quota else None

    async def _mark_collected(self, record: BatchRecord) -> None:
        record.state, record.collected_at = COLLECTED, now_iso()
        await self._store.save(record)
        self._note(record, collected=True)

    def _note(self, record: BatchRecord, **flags: bool) -> None:
        """The manifest's entry for a batch: counts, tokens, estimated cost at the batch price."""
        key = record.batch_id or record.name
        entry = self.entries.setdefault(key, {"batch_id": record.batch_id})
        entry.update(
            {
                "input": record.unit,
                "part": record.part,
                "deployment": record.deployment,
                "status": record.status,
                "lines": len(record.custom_ids),
                "request_counts": record.request_counts,
                "tokens": dict(record.tokens),
                "estimated_cost": self._options.cost(
                    record.tokens.get("prompt", 0), record.tokens.get("completion", 0)
                ),
            }
        )
        entry.update(flags)
