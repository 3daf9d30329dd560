"""Source → requests → calls → sink, with bounded concurrency and flat memory.

- Files are listed as a stream; a unit (input file) is opened only when the open ones cannot keep the
  call slots busy, and never more than `2 × concurrency` at once.
- A unit is claimed (lease/lock) before it is read; what its result file already holds is skipped.
- Items are dispatched only when a call slot is free, so parsing never runs ahead. The call slots follow
  the budgets' adaptive windows on requests in flight (`slots_for`: twice the window and a few more, for
  answers being written and calls waiting to retry), never more than `--concurrency`.
- Results are written by a per-unit group-commit writer: whatever finished while the previous append was
  in flight goes out in the next one, so a crash loses at most the in-flight calls and one batch.
- A unit whose every item is recorded is marked complete and released.

`request_stop` (SIGTERM/SIGINT) stops dispatching at once and, after the drain deadline, cancels the calls
still in flight: they are "interrupted", not failed, and the next run picks them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from worker import formats
from worker.calls import Caller, Outcome
from worker.errors import ConfigError, DeploymentDown, LeaseLost, Unfinished, UnitHeld
from worker.formats import Duplicate, InputLimits, Rejected, Request
from worker.idset import FingerprintCounts
from worker.report import RunStats
from worker.storage import SKIP_REASONS, ClaimedUnit, Sink, Source, SourceFile, names

log = structlog.get_logger("worker.pipeline")


@dataclass(frozen=True, kw_only=True)
class PipelineLimits(InputLimits):
    concurrency: int
    lease_seconds: float


SLOTS_PER_WINDOW = 2  # call slots per request the budgets let in flight ...
EXTRA_SLOTS = 16  # ... and this many more


def slots_for(window: int, concurrency: int) -> int:
    """Call slots (calls in flight, waiting for their turn or to retry, answers not yet written) for a
    budget window of `window` requests in flight, under the `concurrency` ceiling."""
    return max(1, min(concurrency, SLOTS_PER_WINDOW * window + EXTRA_SLOTS))


Release = Callable[[], None]
Progress = Callable[[int, int], None]
"""Told (items newly finished, items seen so far) as results are written: the total grows as files open."""


def _nothing() -> None:
    return None


class UnitWriter:
    """Group commit for one unit: one append at a time, each taking every line that is waiting.

    A line's `release` runs once its append has finished (or failed): the pipeline holds a call slot
    until then, so "in flight" means called-or-unwritten and a crash loses at most `--concurrency` calls.
    """

    def __init__(self, unit: ClaimedUnit, stats: RunStats, on_written: Callable[[int], None]) -> None:
        self._unit = unit
        self._stats = stats
        self._on_written = on_written
        self._pending: list[tuple[bytes, str | None, Release]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.failed: BaseException | None = None
        self.unwritten = 0

    def add(self, line: bytes, error_code: str | None, release: Release = _nothing) -> None:
        """Queue one result line; `error_code` None means a success. A line longer than the result file
        takes becomes a final `response_too_large` error record: writing it would fail at every run."""
        if self.failed is not None:
            self.interrupt()
            release()
            return
        limit = self._unit.max_line_bytes
        if limit is not None and len(line) > limit:
            line, error_code = _too_large(line, limit), "response_too_large"
        self._pending.append((line, error_code, release))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending and self.failed is None:
            batch, self._pending = self._pending, []
            try:
                await asyncio.shield(self._unit.append(b"".join(entry[0] for entry in batch)))
            except Exception as exc:  # noqa: BLE001 - the unit stops; every unwritten line is counted
                self.failed = exc
                for *_, release in batch + self._pending:
                    self.interrupt()
                    release()
                self._pending = []
                return
            for _, code, release in batch:
                if code is None:
                    self._stats.succeeded += 1
                else:
                    self._stats.failed += 1
                    self._stats.errors_by_code[code] += 1
                release()
            self._on_written(len(batch))

    def interrupt(self) -> None:
        """An item of this unit ends this run without a record: the unit stays open for the next run."""
        self.unwritten += 1
        self._stats.interrupted += 1

    async def close(self) -> None:
        """Wait until every queued line is written (or the writer failed)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.shield(self._flusher)
        if self._pending and self.failed is None:
            await self._flush()


def _too_large(line: bytes, limit: int) -> bytes:
    """The error record standing in for a result line longer than `limit`: the same custom_id, the
    response's status and request id without its body."""
    record = json.loads(line)
    response = record.get("response")
    log.warning("item.response_too_large", custom_id=record["custom_id"], bytes=len(line), limit=limit)
    return formats.result_line(
        record["custom_id"],
        response=None
        if response is None
        else {
            "status_code": response.get("status_code"),
            "request_id": response.get("request_id"),
            "body": None,
        },
        error=formats.error_record(
            "response_too_large",
            f"the result line is {len(line)} bytes; a result file in this sink takes lines of at most {limit} bytes",
        ),
    )


class Pipeline:
    """One run over a source into a sink."""

    def __init__(
        self,
        *,
        source: Source,
        sink: Sink,
        caller: Caller,
        limits: PipelineLimits,
        stats: RunStats,
        exclude: Callable[[str], bool] = lambda _path: False,
        on_progress: Progress = lambda _done, _seen: None,
        window: Callable[[], int] | None = None,
        windows_full: Callable[[], bool] = lambda: False,
    ) -> None:
        self._source = source
        self._sink = sink
        self._caller = caller
        self._limits = limits
        self._stats = stats
        self._exclude = exclude
        self._on_progress: Callable[[int], None] = lambda done: on_progress(done, stats.total)
        self._window = window or (lambda: limits.concurrency)  # requests the budgets let in flight now
        self._windows_full = windows_full  # ... and whether the work taken already fills them
        self._busy = 0  # slots held: calls in flight and answers not yet written
        self._wanting = 0  # units waiting for a call slot
        self._starting: dict[
            str, int
        ] = {}  # units opened, not asking for call slots yet → slots they may take
        self._capacity = asyncio.Event()  # set when _busy, _wanting or _starting changed
        self._open_units = asyncio.Semaphore(max(4, 2 * limits.concurrency))
        self._calls: set[asyncio.Task[Outcome]] = set()
        self._claimed: set[ClaimedUnit] = set()
        self._stopping = asyncio.Event()
        self._drain_timer: asyncio.TimerHandle | None = None
        self.work_remains = False
        self.fatal: ConfigError | None = None

    def request_stop(self, drain_seconds: float) -> None:
        """Stop taking work now; cancel calls still in flight after `drain_seconds`."""
        if self._stopping.is_set():
            if drain_seconds <= 0:
                self._cancel_calls()
            return
        self._stopping.set()
        self._capacity_changed()
        log.warning("run.stopping", in_flight=len(self._calls), drain_seconds=drain_seconds)
        self._drain_timer = asyncio.get_running_loop().call_later(drain_seconds, self._cancel_calls)

    @property
    def idle(self) -> bool:
        """No call is in flight and no answer waits to be written."""
        return self._busy == 0

    def _free_slot(self) -> None:
        self._busy -= 1
        self._capacity_changed()

    def _slots(self) -> int:
        """Call slots now: what the budgets' windows need, never more than `--concurrency`."""
        return slots_for(self._window(), self._limits.concurrency)

    def stop_taking_work(self, reason: str) -> None:
        """Dispatch nothing more; calls in flight run to their end (no drain deadline)."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._capacity_changed()
            self.work_remains = True
            log.warning("run.stopping", reason=reason, in_flight=len(self._calls))

    def has_units_in_progress(self) -> bool:
        """Whether this run holds a claimed unit now (waiting on a unit another process holds is not
        holding one): what `worker/peers.py` advertises to the other replicas."""
        return bool(self._claimed)

    async def release_claimed_units(self) -> None:
        """Best effort, after a hard stop: give up the claims of units that were not closed."""
        units, self._claimed = list(self._claimed), set()
        await asyncio.gather(*(unit.release() for unit in units), return_exceptions=True)

    def _cancel_calls(self) -> None:
        for task in list(self._calls):
            task.cancel()

    def _fail(self, error: ConfigError) -> None:
        if self.fatal is None:
            self.fatal = error
            log.error("run.fatal", error=str(error))
        self.request_stop(0)

    async def run(self) -> None:
        finished = await self._sink.finished_units()
        units: set[asyncio.Task[None]] = set()
        try:
            async for file in self._source.list_files():
                if self._stopping.is_set():
                    self.work_remains = True
                    break
                if not await self._wanted(file, finished):
                    continue
                await self._open_units.acquire()
                await self._until_slots_go_unused()
                single = formats.input_kind(file.path) != "batch"
                self._starting[file.path] = 1 if single else self._slots()
                task = asyncio.create_task(self._run_unit(file), name=f"unit:{file.path}")
                units.add(task)
                task.add_done_callback(units.discard)
        except ConfigError as error:
            self._fail(error)
        finally:
            if units:
                await asyncio.gather(*units, return_exceptions=True)
            if self._drain_timer is not None:
                self._drain_timer.cancel()
        if self.fatal is not None:
            raise self.fatal

    async def _until_slots_go_unused(self) -> None:
        """Open another unit only when the open ones cannot keep the call slots busy: none of them waits
        for a slot, more slots are free than the units still starting (claiming, reading) may take (a
        prompt or body file one, a .jsonl file all), and the budgets' windows are not full (calls queued
        for their turn at a deployment say the open units already keep it busy). So a replica takes only
        the files it can work on, and other replicas get their share."""
        while not self._stopping.is_set():
            free = self._slots() - self._busy
            if self._wanting == 0 and free > sum(self._starting.values()) and not self._windows_full():
                return
            self._capacity.clear()
            await self._capacity.wait()

    def _capacity_changed(self) -> None:
        self._capacity.set()

    def _started(self, path: str) -> None:
        """A unit no longer counts as starting: it asks for call slots, waits for a holder, or ended."""
        if self._starting.pop(path, None) is not None:
            self._capacity_changed()

    async def _wanted(self, file: SourceFile, finished: FingerprintCounts) -> bool:
        """Whether a listed file is a unit to work on; what is not is reported or counted here."""
        if self._exclude(file.path):
            return False
        if file.skip is not None:
            self._skip(file.path, file.skip, SKIP_REASONS[file.skip])
            return False
        if (problem := names.name_problem(file.path)) is not None:
            self._skip(file.path, "invalid_name", problem)
            return False
        if formats.input_kind(file.path) is None:
            log.info("input.skipped", file=file.path, reason="not an input type (.txt .md .json .jsonl)")
            self._stats.problem(file=file.path, code="unsupported_file_type")
            return False
        result_path = formats.result_path(file.path)
        done_items = finished.get(result_path)
        if done_items is not None and not finished.changed(result_path, file.version):
            self._stats.total += done_items
            self._stats.skipped += done_items
            self._stats.units_skipped += 1
            self._on_progress(done_items)
            return False
        if await self._sink.collides(result_path):
            reason = f"its result path {result_path} under SINK holds a file the worker did not create"
            self._skip(file.path, "name_collision", reason)
            return False
        if done_items is not None:
            log.info("input.changed", file=file.path, items_before=done_items)
            self._stats.changed_inputs += 1
        return True

    def _skip(self, path: str, code: str, reason: str) -> None:
        """An entry of SOURCE that is not read: logged and listed in the manifest, with no record."""
        log.warning("input.skipped", file=names.shown(path), code=code, reason=reason)
        self._stats.problem(file=names.shown(path), code=code)

    async def _run_unit(self, file: SourceFile) -> None:
        """Claim one unit and work it; called holding an open-unit slot, which it releases."""
        try:
            unit = await self._claim_or_report(file)
            if unit is not None:
                self._claimed.add(unit)
                try:
                    await self._work_unit(file, unit)
                finally:
                    self._claimed.discard(unit)
        finally:
            self._started(file.path)
            self._open_units.release()

    async def _claim_or_report(self, file: SourceFile) -> ClaimedUnit | None:
        """The claimed unit, or None when there is nothing to work on (reported here)."""
        try:
            unit = await self._claim(file.path, file.version)
        except ConfigError as error:
            self._fail(error)
            return None
        except UnitHeld:
            if self._stopping.is_set():
                self.work_remains = True
                log.info("unit.left_held", file=file.path, reason="stopping")
            else:
                self._stats.units_held += 1
                log.info("unit.held", file=file.path, reason="another live process keeps renewing its lease")
            return None
        except Exception as exc:  # noqa: BLE001 - one unit's storage trouble does not stop the others
            self.work_remains = True
            log.warning("unit.claim_failed", file=file.path, error=type(exc).__name__, detail=str(exc)[:300])
            return None
        if unit is None:
            self._stats.units_skipped += 1
            log.info("unit.finished_elsewhere", file=file.path)
        return unit

    async def _claim(self, path: str, version: str) -> ClaimedUnit | None:
        """Claim a unit; None when it is (or becomes) finished.

        While another process holds it, the open-unit slot is given up and the claim is tried again
        every few seconds: a dead holder's lease runs out within `lease_seconds`, and then this run takes
        the unit over. A holder that keeps its claim for longer than a full lease period is alive
        (it renews): UnitHeld is raised, as it is when the run is stopping.
        """
        result_path = formats.result_path(path)
        try:
            return await self._sink.claim(result_path, version)
        except UnitHeld:
            pass
        self._started(path)  # waiting for another holder: it uses no call slots meanwhile
        self._open_units.release()
        try:
            loop = asyncio.get_running_loop()
            held_since = loop.time()
            poll = max(1.0, self._limits.lease_seconds / 6)
            log.info("unit.held_elsewhere", result=result_path, polling_every_s=poll)
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), poll)
                if self._stopping.is_set():
                    raise UnitHeld(result_path)
                try:
                    return await self._sink.claim(result_path, version)
                except UnitHeld:
                    if loop.time() - held_since > self._limits.lease_seconds + poll:
                        raise
        finally:
            await self._open_units.acquire()

    async def _work_unit(self, file: SourceFile, unit: ClaimedUnit) -> None:
        writer = UnitWriter(unit, self._stats, self._on_progress)
        pending: set[asyncio.Task[None]] = set()
        with structlog.contextvars.bound_contextvars(file=file.path):
            items, read_to_the_end = await self._dispatch(file, unit, writer, pending)
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            await writer.close()
            complete = read_to_the_end and writer.failed is None and writer.unwritten == 0
            await self._close_unit(unit, writer, complete, items)

    async def _dispatch(
        self, file: SourceFile, unit: ClaimedUnit, writer: UnitWriter, pending: set[asyncio.Task[None]]
    ) -> tuple[int, bool]:
        """Read the unit's items; record each rejected one, call each one not recorded yet.
        Returns the number of items and whether every item was dispatched."""
        items = 0
        try:
            async for parsed in formats.read_items(self._source, file, self._limits):
                if isinstance(parsed, Duplicate):
                    self._report_duplicate(file.path, parsed)
                    continue
                items += 1
                self._stats.total += 1
                if parsed.custom_id in unit.done_ids:
                    self._stats.skipped += 1
                    self._on_progress(1)
                elif isinstance(parsed, Rejected):
                    self._record_rejected(file.path, parsed, writer)
                elif not await self._start_call(file.path, parsed, writer, pending):
                    return items, False
        except ConfigError as error:
            self._fail(error)
            return items, False
        except Exception as exc:  # noqa: BLE001 - reading failed: the unit stays open for the next run
            self.work_remains = True
            log.warning("unit.read_failed", error=type(exc).__name__, detail=str(exc)[:300])
            return items, False
        return items, True

    def _report_duplicate(self, path: str, duplicate: Duplicate) -> None:
        log.warning("input.duplicate_custom_id", custom_id=duplicate.custom_id, line=duplicate.line)
        self._stats.problem(
            file=path, line=duplicate.line, custom_id=duplicate.custom_id, code="duplicate_custom_id"
        )

    def _record_rejected(self, path: str, rejected: Rejected, writer: UnitWriter) -> None:
        log.warning(
            "input.rejected", custom_id=rejected.custom_id, code=rejected.code, reason=rejected.message
        )
        self._stats.problem(file=path, line=rejected.line, custom_id=rejected.custom_id, code=rejected.code)
        error = formats.error_record(rejected.code, rejected.message)
        writer.add(formats.result_line(rejected.custom_id, error=error), rejected.code)

    async def _start_call(
        self, path: str, request: Request, writer: UnitWriter, pending: set[asyncio.Task[None]]
    ) -> bool:
        """Take a call slot and start the call and its recording; False when the run is stopping or
        the unit's results can no longer be written."""
        if self._stopping.is_set() or writer.failed is not None:
            return False
        self._started(path)
        self._wanting += 1
        self._capacity_changed()
        try:
            while self._busy >= self._slots() and not self._stopping.is_set():
                self._capacity.clear()
                await self._capacity.wait()
        finally:
            self._wanting -= 1
            self._capacity_changed()
        self._busy += 1
        if self._stopping.is_set():
            self._free_slot()
            return False
        call = asyncio.create_task(self._caller.call(request))
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)
        task = asyncio.create_task(self._record(request, call, writer))
        pending.add(task)
        task.add_done_callback(pending.discard)
        return True

    async def _close_unit(
        self, unit: ClaimedUnit, writer: UnitWriter, complete: bool, items: int, *, pending_ok: bool = False
    ) -> None:
        """Mark a complete unit done, else release it. An incomplete unit is work left, unless
        `pending_ok` (the batch backend: its items wait in live batches) and nothing failed to be written."""
        try:
            if complete:
                await unit.finish(items)
                self._stats.units_done += 1
                log.info("unit.done", items=items)
            else:
                if not pending_ok or writer.failed is not None:
                    self.work_remains = True
                await unit.release()
                if isinstance(writer.failed, LeaseLost):
                    log.warning("unit.lease_lost")
                elif writer.failed is not None:
                    log.warning(
                        "unit.write_failed",
                        error=type(writer.failed).__name__,
                        detail=str(writer.failed)[:300],
                    )
            if isinstance(writer.failed, ConfigError):
                self._fail(writer.failed)
        except ConfigError as error:
            self._fail(error)
        except Exception as exc:  # noqa: BLE001 - the results are written; the marker is retried next run
            self.work_remains = True
            log.warning("unit.close_failed", error=type(exc).__name__, detail=str(exc)[:300])

    async def _record(self, request: Request, call: asyncio.Task[Outcome], writer: UnitWriter) -> None:
        """Wait for one call and queue its result line; an item that gets no line is interrupted.

        The call slot is released when the line is written, not when the answer arrives; on every
        other path it is released here.
        """
        handed_over = False
        try:
            outcome = await asyncio.shield(call)
            if outcome.error is not None:
                log.warning("item.failed", custom_id=request.custom_id, code=outcome.error["code"])
            line = formats.result_line(request.custom_id, response=outcome.response, error=outcome.error)
            writer.add(line, None if outcome.error is None else outcome.error["code"], self._free_slot)
            handed_over = True
        except asyncio.CancelledError:
            call.cancel()
        except ConfigError as error:
            self._fail(error)
        except DeploymentDown as down:
            if down.deployment == self._caller.default_deployment:
                self.stop_taking_work(str(down))
        except Unfinished as unfinished:
            log.warning("item.unfinished", custom_id=request.custom_id, reason=str(unfinished))
        except Exception as exc:  # noqa: BLE001 - an unexpected failure leaves the item for the next run
            log.error(
                "item.crashed", custom_id=request.custom_id, error=type(exc).__name__, detail=str(exc)[:300]
            )
        finally:
            if not handed_over:
                writer.interrupt()
                self._free_slot()
