"""UnitWriter: group commit, slot release after the write, a result file that takes no more lines."""

import asyncio
import json

from worker import formats
from worker.pipeline import UnitWriter
from worker.report import RunStats
from worker.storage import ResultFileFull


class MemoryUnit:
    """An in-memory result file whose appends wait until the test lets them finish."""

    def __init__(self, *, full: bool = False, max_line_bytes: int | None = None) -> None:
        self.done_ids: set[str] = set()
        self.full = full
        self.max_line_bytes = max_line_bytes
        self.appends: list[bytes] = []
        self.gate = asyncio.Event()

    async def append(self, data: bytes) -> None:
        await self.gate.wait()
        if self.full:
            raise ResultFileFull("the result file reached 49900 appends; split this input into smaller files")
        self.appends.append(data)

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
    unit, stats, released = MemoryUnit(full=True), RunStats(), []
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


async def test_a_line_longer_than_one_append_takes_becomes_a_response_too_large_record() -> None:
    unit, stats, released = MemoryUnit(max_line_bytes=2000), RunStats(), []
    unit.gate.set()
    writer = UnitWriter(unit, stats, on_written=lambda n: None)
    response = {"status_code": 200, "request_id": "req-1", "body": {"data": [{"embedding": [0.5] * 1000}]}}
    big = formats.result_line("big", response=response)
    small = formats.result_line("small", response={"status_code": 200, "request_id": "req-2", "body": {}})
    writer.add(big, None, lambda: released.append("big"))
    writer.add(small, None, lambda: released.append("small"))
    await writer.close()

    assert writer.failed is None
    records = [json.loads(line) for line in b"".join(unit.appends).splitlines()]
    assert [record["custom_id"] for record in records] == ["big", "small"]
    assert records[0]["error"]["code"] == "response_too_large"
    assert str(len(big)) in records[0]["error"]["message"]
    assert records[0]["response"] == {"status_code": 200, "request_id": "req-1", "body": None}
    assert records[1]["error"] is None
    assert (stats.succeeded, stats.failed, dict(stats.errors_by_code)) == (1, 1, {"response_too_large": 1})
    assert released == ["big", "small"]
