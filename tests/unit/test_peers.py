"""Replicas counting each other through records in a real local sink (worker/peers.py), on a given clock.

Each `refresh` is driven by the test, as the background loop would every REFRESH_SECONDS; the e2e test
`test_replicas_on_one_blob_sink_see_each_other_at_work` runs the same over Azurite with real processes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from worker.peers import ACTIVE_FOLDER, RECORD_SECONDS, REFRESH_SECONDS, STALE_SECONDS, Peers
from worker.storage.local import LocalSink


class Replica:
    """One process's Peers, with the busy flag and the counts it was told."""

    def __init__(self, sink: LocalSink, clock: list[float], name: str) -> None:
        self.busy = True
        self.told: list[int | None] = []
        self.peers = Peers(
            sink, busy=lambda: self.busy, on_count=self.told.append, clock=lambda: clock[0], process=name
        )

    def refresh(self) -> int | None:
        asyncio.run(self.peers.refresh())
        return self.peers.count


def records(sink: LocalSink) -> list[str]:
    return asyncio.run(sink.list_state(ACTIVE_FOLDER))


def test_replicas_at_work_count_each_other_and_one_that_goes_idle_stops_counting(tmp_path: Path) -> None:
    sink, clock = LocalSink(tmp_path), [1_000.0]
    a, b, c = (Replica(sink, clock, name) for name in "abc")
    for replica in (a, b, c):
        replica.refresh()
    assert [a.refresh(), b.refresh(), c.refresh()] == [2, 2, 2]

    c.busy = False  # c waits on files the others hold: it sends nothing
    assert c.refresh() == 2
    assert [a.refresh(), b.refresh()] == [1, 1]
    assert len(records(sink)) == 2  # c's record went at once, not when it expired

    b.busy = False
    b.refresh()
    clock[0] += REFRESH_SECONDS
    assert a.refresh() == 0
    assert a.told == [2, 1, 0]


def test_a_process_that_just_started_does_not_call_itself_alone_before_a_refresh_period(
    tmp_path: Path,
) -> None:
    sink, clock = LocalSink(tmp_path), [1_000.0]
    first = Replica(sink, clock, "first")
    assert first.refresh() is None  # replicas started together may not have written their records yet
    clock[0] += REFRESH_SECONDS / 2
    assert first.refresh() is None
    clock[0] += REFRESH_SECONDS / 2
    assert first.refresh() == 0


def test_the_record_of_a_crashed_process_expires_and_old_ones_are_swept(tmp_path: Path) -> None:
    sink, clock = LocalSink(tmp_path), [1_000.0]
    crashed, survivor = Replica(sink, clock, "crashed"), Replica(sink, clock, "survivor")
    crashed.refresh()
    assert survivor.refresh() == 1
    clock[0] += RECORD_SECONDS + 1  # the crashed process renews nothing
    assert survivor.refresh() == 0
    assert any("crashed" in name for name in records(sink))
    clock[0] += STALE_SECONDS
    survivor.refresh()
    assert [name for name in records(sink) if "crashed" in name] == []


def test_a_record_is_renewed_under_a_new_name_and_deleted_at_the_end(tmp_path: Path) -> None:
    sink, clock = LocalSink(tmp_path), [1_000.0]
    replica = Replica(sink, clock, "p")
    replica.refresh()
    clock[0] += 5
    replica.refresh()
    assert records(sink) == [f"{ACTIVE_FOLDER}p.{int(clock[0] + RECORD_SECONDS)}"]
    asyncio.run(replica.peers.stop())
    assert records(sink) == []


def test_names_that_are_not_records_are_ignored(tmp_path: Path) -> None:
    sink, clock = LocalSink(tmp_path), [1_000.0]
    for name in ("no-digits.abc", "nodot", "x.12.tmp2", "deep/er.99999999999"):
        asyncio.run(sink.write_state(f"{ACTIVE_FOLDER}{name}", b"{}"))
    replica = Replica(sink, clock, "p")
    replica.refresh()
    clock[0] += REFRESH_SECONDS
    assert replica.refresh() == 0


class BrokenSink(LocalSink):
    async def list_state(self, prefix: str) -> list[str]:
        raise PermissionError("This request is not authorized to perform this operation.")


def test_storage_trouble_leaves_the_count_unknown_and_is_logged_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = [1_000.0]
    replica = Replica(BrokenSink(tmp_path), clock, "p")
    for _ in range(3):
        assert replica.refresh() is None
    assert capsys.readouterr().out.count("peers.unknown") == 1
