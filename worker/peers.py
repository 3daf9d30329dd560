"""Who else is working on this sink now: replicas of one job (Container Apps `parallelism`, overlapping
executions) that share a deployment learn from its headers how much of the quota the others use, but the
headers cannot say when the others have stopped. Without that, the last replica at work finishes the last
file alone at the share it had while the others ran, and the quota idles (`make bench`'s `replicas3`).

Each process with a unit in progress keeps a small record under the sink's `_state/active/` folder whose
name says until when it holds (`<process>.<until epoch s>`): rewritten every `REFRESH_SECONDS` while it
works, deleted at the first refresh with nothing in progress (waiting on files others hold counts as
nothing) and at the end of the run. A process that crashes leaves a record that expires `RECORD_SECONDS` later; records
long expired are deleted by whoever lists them. The listing, every `REFRESH_SECONDS`, gives the number of
other processes at work; `on_count` hears it (`Budgets.set_peers`: the one left alone claims the whole
quota at once as the others' usage leaves the window). A process counts itself alone only once it has
been at work for a refresh period, so that replicas started together see each other first.

Nothing here can fail a run: storage trouble is logged once, and the count is then unknown (None), which
leaves the budgets to the headers alone, as without this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable

import structlog

from worker.storage import STATE_FOLDER, Sink

log = structlog.get_logger()

ACTIVE_FOLDER = f"{STATE_FOLDER}/active/"
REFRESH_SECONDS = 1.0  # how often the record is renewed and the others are counted
RECORD_SECONDS = 10.0  # how long a record holds without renewal (a crashed process stops counting then)
STALE_SECONDS = 3600.0  # records expired this long ago are deleted by whoever lists them


class Peers:
    """This process's record under `_state/active/` and its count of the other processes at work."""

    def __init__(
        self,
        sink: Sink,
        *,
        busy: Callable[[], bool],
        on_count: Callable[[int | None], None],
        clock: Callable[[], float] = time.time,
        process: str | None = None,
    ) -> None:
        self._sink = sink
        self._busy = busy
        self._on_count = on_count
        self._clock = clock
        self.process = process or uuid.uuid4().hex[:16]
        self._record: str | None = None  # the name of this process's record, while it has one
        self._busy_since: float | None = None
        self._warned = False
        self.count: int | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Refresh and count every REFRESH_SECONDS in the background, until `stop`."""
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Stop counting and delete this process's record."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.leave()

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(REFRESH_SECONDS)

    async def refresh(self) -> None:
        """Renew (or drop) this process's record, then count the others at work."""
        try:
            now = self._clock()
            await self._keep_record(now)
            others = await self._others(now)
        except Exception as exc:  # noqa: BLE001 - knowing the others is an optimisation, never a failure
            if not self._warned:
                self._warned = True
                log.warning("peers.unknown", error=type(exc).__name__, detail=str(exc)[:300])
            self._tell(None)
            return
        settled = self._busy_since is not None and now - self._busy_since >= REFRESH_SECONDS
        self._tell(others if others or settled else None)

    async def leave(self) -> None:
        """Delete this process's record (the end of the run)."""
        record, self._record = self._record, None
        if record is not None:
            with contextlib.suppress(Exception):
                await self._sink.delete_state(record)

    def _tell(self, count: int | None) -> None:
        if count != self.count:
            self.count = count
            self._on_count(count)
            if count is not None:
                log.info("peers.at_work", others=count)

    async def _keep_record(self, now: float) -> None:
        if not self._busy():
            self._busy_since = None
            await self.leave()
            return
        if self._busy_since is None:
            self._busy_since = now
        record = f"{ACTIVE_FOLDER}{self.process}.{int(now + RECORD_SECONDS)}"
        await self._sink.write_state(record, b"{}")
        previous, self._record = self._record, record
        if previous is not None and previous != record:
            await self._sink.delete_state(previous)

    async def _others(self, now: float) -> int:
        others: set[str] = set()
        for name in await self._sink.list_state(ACTIVE_FOLDER):
            process, _, until = name[len(ACTIVE_FOLDER) :].rpartition(".")
            if not until.isdigit() or process == self.process or "/" in process:
                continue
            if int(until) >= now:
                others.add(process)
            elif int(until) < now - STALE_SECONDS:
                await self._sink.delete_state(name)
        return len(others)
