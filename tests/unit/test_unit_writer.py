"""UnitWriter: group commit, slot release after the write, the append limit of a result file."""

import asyncio

from worker.metrics import RunStats
from worker.pipeline import ResultFileFull, UnitWriter


class MemoryUnit:
    """An in-memory result file whose appends wait until the test lets them finish."""

    def __init__(self, *, max_appends: int | None = None, appends_used: int = 0) -> None:
        self.done_ids: set[str] = set()
        self.max_appends = max_appends
        self.appends_used = appends_used
        self.appends: list[bytes] = []
        self.gate = asyncio.Event()

    async def append(self, data: bytes) -> None:
        await self.gate.wait()
        self.appends.append(data)
        self.appends_used += 1

    async def finish(self, items: int) -> None: ...

    async def release(self) -> None: ...


async def test_lines_waiting_during_an_append_go_out_together_and_release_after_writing() -> None:
    unit, stats, released = MemoryUnit(), RunStats(), []
    writer = UnitWriter(unit, stats, on_written=lambda n: None)
    writer.add(b"a\n", None, lambda: released.append("a"))
    await asyncio.sleep(0)  # the first append starts and waits at the gate
    writer.add(b"b\n", "content_filter", lambda: released.append("b"))
    writer.add(b"c\n", None, lambda: released.append("c"))
    assert released == []
    unit.gate.set()
    await writer.close()
    assert unit.appends == [b"a\n", b"b\nc\n"]
    assert released == ["a", "b", "c"]
    assert (stats.succeeded, stats.failed, dict(stats.errors_by_code)) == (2, 1, {"content_filter": 1})


async def test_a_full_result_file_stops_the_unit_and_counts_the_lines_as_interrupted() -> None:
    unit, stats, released = MemoryUnit(max_appends=1000, appends_used=900), RunStats(), []
    unit.gate.set()
    writer = UnitWriter(unit, stats, on_written=lambda n: None)
    writer.add(b"a\n", None, lambda: released.append("a"))
    await writer.close()
    assert isinstance(writer.failed, ResultFileFull)
    assert "split this input" in str(writer.failed)
    assert (writer.unwritten, stats.interrupted, stats.succeeded) == (1, 1, 0)
    assert released == ["a"]
    writer.add(b"b\n", None, lambda: released.append("b"))
    assert released == ["a", "b"] and stats.interrupted == 2
