"""Outcomes that tell the truth: units held by others, outages, configuration errors, SIGTERM deadlines.

Every test drives the real `worker` CLI against the local stack; faults are switched on and off at the
fakes when an observed event says the run has reached the moment that matters.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import (
    batch_line,
    finish,
    new_container,
    results,
    run_worker,
    start_watched_worker,
    start_worker,
    upload,
    wait_for,
)
from tests.e2e.test_resilience import assert_exactly_once, batch_files
from tests.stack import LocalStack
from worker import formats
from worker.services import open_clients
from worker.settings import load_settings
from worker.storage.blob import SCANS_AT_ONCE, BlobSink
from worker.storage.urls import parse_location


def blob_args(stack: LocalStack, source: str, sink: str, *extra: str) -> list[str]:
    return ["--source", stack.blob_url(source), "--sink", stack.blob_url(sink), *extra]


def events_named(run: Any, name: str) -> list[dict[str, Any]]:
    return [event for event in run.events if event["event"] == name]


def wait_until(condition: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_live_holder_is_waited_out_for_one_lease_period_then_reported_held(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    files, ids = batch_files(1, 40, "live")
    upload(stack, source, files)
    stack.openai.configure(latency_ms=1500)
    args = blob_args(stack, source, sink, "--concurrency", "2", "--lease-seconds", "15")

    holder = start_worker(stack, *args)
    wait_for(stack, "successes", 1)
    other = run_worker(stack, *args)

    assert other.code == 0, other.stdout[-3000:]
    assert other.summary["held"] == 1
    assert other.summary["requests"] == 0
    assert events_named(other, "unit.held_elsewhere")
    first = finish(holder)
    assert first.code == 0, first.stdout[-3000:]
    assert_exactly_once(results(stack, sink), ids)


@pytest.mark.parametrize("fault", ["503", "dropped connections"])
def test_an_outage_mid_run_pauses_dispatch_and_turns_nothing_into_errors(
    stack: LocalStack, fault: str
) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    files, ids = batch_files(3, 100, "outage")
    upload(stack, source, files)
    stack.openai.configure(latency_ms=100, jitter_ms=50)  # about 2 s of work: the outage comes mid-run

    worker = start_watched_worker(stack, *blob_args(stack, source, sink, "--concurrency", "16"))
    try:
        wait_for(stack, "successes", 60)
        stack.openai.configure(**({"outage_status": 503} if fault == "503" else {"outage_drop": True}))
        # The calls in flight fail, five failures in a row open the circuit, probes fail (1 s, 2 s, ...).
        # The fake counts a failure before the worker sees it, and answers already on their way reset the
        # count: wait for the worker's own word that the circuit opened.
        worker.wait_for_event("deployment.unavailable")
        stack.openai.configure(outage_status=0, outage_drop=False)
    finally:
        run = worker.finish()
    failed_during_outage = stack.openai.stats()["by_status"]["503"]

    assert run.code == 0, run.stdout[-3000:]
    records = results(stack, sink)
    assert_exactly_once(records, ids)
    assert [r for r in records if r["error"] is not None] == []
    assert run.summary["failed"] == 0
    assert events_named(run, "deployment.unavailable")
    assert events_named(run, "deployment.recovered")
    assert failed_during_outage < 100  # the circuit stopped dispatch instead of burning attempts


def test_an_outage_past_outage_seconds_stops_the_run_with_exit_1_and_no_records(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    prompts = {f"o{i}.txt": f"outage {i}".encode() for i in range(10)}
    upload(stack, source, prompts)
    stack.openai.configure(outage_status=503)

    run = run_worker(stack, *blob_args(stack, source, sink, "--outage-seconds", "3", "--concurrency", "4"))

    assert run.code == 1, run.stdout[-3000:]
    assert results(stack, sink) == []
    assert run.summary["failed"] == 0
    assert run.summary["interrupted"] >= 1
    (down,) = events_named(run, "deployment.down")
    assert "--outage-seconds" in down["reason"]

    stack.openai.configure(outage_status=0)
    rerun = run_worker(stack, *blob_args(stack, source, sink))
    assert rerun.code == 0, rerun.stdout[-3000:]
    assert_exactly_once(results(stack, sink), set(prompts))


def test_an_item_that_keeps_failing_while_others_succeed_is_left_interrupted(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    good = {f"g{i}.txt": f"good {i}".encode() for i in range(20)}
    upload(stack, source, {**good, "poison.txt": b"ALWAYS_500 for this one"})
    stack.openai.configure(latency_ms=20)

    run = run_worker(stack, *blob_args(stack, source, sink, "--max-attempts", "3", "--concurrency", "4"))

    assert run.code == 1, run.stdout[-3000:]
    assert_exactly_once(results(stack, sink), set(good))
    assert (run.summary["failed"], run.summary["interrupted"]) == (0, 1)
    (unfinished,) = events_named(run, "item.unfinished")
    assert unfinished["custom_id"] == "poison.txt"
    assert "3 attempts failed" in unfinished["reason"]


def test_a_429_asking_for_hours_stops_the_deployment_at_once_with_exit_1(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {f"q{i}.txt": f"quota {i}".encode() for i in range(5)})
    stack.openai.configure(force_429=1, force_429_retry_after_ms=86_400_000)

    run = run_worker(stack, *blob_args(stack, source, sink, "--concurrency", "1"), timeout=60)

    assert run.code == 1, run.stdout[-3000:]
    assert results(stack, sink) == []
    (down,) = events_named(run, "deployment.down")
    assert "86400 s" in down["reason"]
    assert "quota" in down["reason"]
    assert stack.openai.stats()["requests"] == 1


@pytest.mark.parametrize(
    ("case", "names"),
    [
        ("retired api-version", "OPENAI_API_VERSION"),
        ("endpoint with a path", "AZURE_OPENAI_ENDPOINT"),
        ("chat on an embeddings deployment", "AZURE_OPENAI_DEPLOYMENT"),
    ],
)
def test_a_misconfigured_deployment_exits_2_recording_nothing_and_the_fixed_rerun_does_it_all(
    stack: LocalStack, case: str, names: str
) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    prompts = {f"c{i}.txt": f"config {i}".encode() for i in range(6)}
    upload(stack, source, prompts)
    stack.openai.configure(api_versions=["2024-10-21"])
    endpoint = stack.worker_env()["AZURE_OPENAI_ENDPOINT"]
    wrong = {
        "retired api-version": {"OPENAI_API_VERSION": "2023-03-15-preview"},
        "endpoint with a path": {"AZURE_OPENAI_ENDPOINT": endpoint + "/openai/v1"},
        "chat on an embeddings deployment": {"AZURE_OPENAI_DEPLOYMENT": "text-embedding-3-small"},
    }[case]

    run = run_worker(stack, *blob_args(stack, source, sink, "--concurrency", "4"), env=wrong)

    assert run.code == 2, run.stdout[-3000:]
    assert names in run.summary["error"]
    assert run.summary["duration_s"] >= 0
    assert results(stack, sink) == []
    rerun = run_worker(stack, *blob_args(stack, source, sink))
    assert rerun.code == 0, rerun.stdout[-3000:]
    assert_exactly_once(results(stack, sink), set(prompts))


def test_a_missing_deployment_named_by_some_lines_fails_just_those_lines(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    lines = [batch_line(f"ok-{i}", f"fine {i}") for i in range(5)]
    lines[1:1] = [batch_line(f"nope-{i}", f"missing {i}", model="no-such-deployment") for i in range(2)]
    upload(stack, source, {"mixed.jsonl": b"\n".join(lines)})

    run = run_worker(stack, *blob_args(stack, source, sink, "--concurrency", "1"))

    assert run.code == 0, run.stdout[-3000:]
    codes = {r["custom_id"]: (r["error"] or {}).get("code") for r in results(stack, sink)}
    assert codes == {
        **{f"ok-{i}": None for i in range(5)},
        **{f"nope-{i}": "DeploymentNotFound" for i in range(2)},
    }


def test_sigterm_while_storage_hangs_still_prints_the_summary_inside_30_s(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    files, ids = batch_files(2, 60, "frozen")
    upload(stack, source, files)
    stack.openai.configure(latency_ms=300)
    args = blob_args(stack, source, sink, "--concurrency", "8", "--lease-seconds", "15")

    process = start_worker(stack, *args)
    wait_for(stack, "successes", 10)
    stack.freeze_azurite()
    try:
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        run = finish(process, timeout=60)
        elapsed = time.monotonic() - signalled
    finally:
        stack.thaw_azurite()

    assert elapsed < 30, elapsed
    assert run.code == 1
    assert run.summary["exit_code"] == 1
    assert events_named(run, "run.hard_stop")
    rerun = run_worker(stack, *args)
    assert rerun.code == 0, rerun.stdout[-3000:]
    assert_exactly_once(results(stack, sink), ids)


def test_sigterm_during_start_up_is_honoured(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"s.txt": b"start-up"})
    stack.identity.configure(down=True)

    process = start_worker(stack, *blob_args(stack, source, sink))
    wait_until(lambda: stack.identity.stats()["requests"] >= 1, "the worker never asked for a token")
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    run = finish(process, timeout=60)

    assert time.monotonic() - signalled < 15
    assert run.code == 1, run.stdout[-3000:]
    assert run.summary["exit_code"] == 1
    assert stack.openai.stats()["requests"] == 0


def test_a_failed_token_refresh_keeps_the_valid_token_in_use(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    files, ids = batch_files(1, 100, "refresh")
    upload(stack, source, files)
    # Tokens live 310 s: after 10 s they are due for refresh (5 minutes before expiry) yet valid; the
    # credential itself asks again 30 s after its last request. The run lasts about 50 s.
    stack.identity.configure(token_lifetime_s=310)
    stack.openai.configure(latency_ms=1000)

    process = start_worker(stack, *blob_args(stack, source, sink, "--concurrency", "2"))
    wait_for(stack, "successes", 2)
    stack.identity.configure(down=True)
    asked_before = stack.identity.stats()["requests"]
    run = finish(process)
    refresh_attempts = stack.identity.stats()["requests"] - asked_before
    stack.identity.configure(down=False)

    assert run.code == 0, run.stdout[-3000:]
    assert refresh_attempts >= 1  # a refresh was due and failed, and the valid token stayed in use
    assert_exactly_once(results(stack, sink), ids)


async def test_a_claim_keeps_its_lease_while_it_waits_to_scan_a_partial_result(
    stack: LocalStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim renews its lease from the moment it is acquired: waiting for a scan slot (or scanning a
    big partial result) for longer than a lease period loses nothing."""
    for name, value in stack.worker_env("managed-identity").items():
        monkeypatch.setenv(name, value)
    url = stack.blob_url(new_container(stack, "out"))
    settings = load_settings({"sink": url, "auth": "managed-identity", "lease_seconds": 15})
    result_path = "big.jsonl.results.jsonl"
    async with open_clients(settings) as clients:
        sink = clients.sink(parse_location(url, what="--sink"))
        assert isinstance(sink, BlobSink)
        await sink.prepare()
        first = await sink.claim(result_path, "v1")
        assert first is not None
        for block in range(20):
            lines = (formats.result_line(f"done-{block}-{i}", error=None) for i in range(1000))
            await first.append(b"".join(lines))
        await first.release()

        for _ in range(SCANS_AT_ONCE):  # every scan slot busy: the next claim waits with its lease held
            await sink.scan_slots.acquire()
        claim = asyncio.create_task(sink.claim(result_path, "v1"))
        blob = stack.blob_service().get_blob_client(url.rsplit("/", 1)[1], result_path)
        held_since = time.monotonic()
        while time.monotonic() - held_since < 17:  # longer than the lease: only renewals keep it
            await asyncio.sleep(0.5)
            assert blob.get_blob_properties().lease.state == "leased"
        for _ in range(SCANS_AT_ONCE):
            sink.scan_slots.release()
        unit = await claim

        assert unit is not None
        assert "done-19-999" in unit.done_ids
        await unit.append(formats.result_line("new-1", error=None))  # the lease is still this claim's
        await unit.finish(20_001)


def test_storage_refusing_appends_mid_run_exits_2_naming_the_role(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    files, _ids = batch_files(2, 60, "role")
    upload(stack, source, files)
    stack.openai.configure(latency_ms=100)
    with stack.storage_proxy().running() as proxy:
        through_proxy = f"https://127.0.0.1:{proxy.port}/devstoreaccount1/{sink}"
        process = start_worker(
            stack, "--source", stack.blob_url(source), "--sink", through_proxy, "--concurrency", "4"
        )
        wait_for(stack, "successes", 8)
        proxy.deny_appends = True  # the role assignment was removed
        run = finish(process)

    assert run.code == 2, run.stdout[-3000:]
    assert proxy.appends_denied >= 1
    assert "Storage Blob Data Contributor" in run.summary["error"]
    assert run.summary["exit_code"] == 2


def test_three_replicas_started_at_once_each_take_a_share_of_the_files_and_see_each_other_at_work(
    stack: LocalStack,
) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    files, ids = batch_files(12, 100, "share")
    upload(stack, source, files)
    stack.openai.configure(latency_ms=150, jitter_ms=20)  # seconds of work each: peers refresh every 1 s
    args = blob_args(stack, source, sink, "--concurrency", "8")

    replicas = [start_worker(stack, *args) for _ in range(3)]
    runs = [finish(replica) for replica in replicas]

    assert [run.code for run in runs] == [0, 0, 0], [run.stdout[-2000:] for run in runs]
    assert_exactly_once(results(stack, sink), ids)
    assert all(run.summary["succeeded"] > 0 for run in runs), [run.summary for run in runs]
    assert sum(run.summary["requests"] for run in runs) <= len(ids) * 1.05
    # Each counted the others through their records under _state/active/ (worker/peers.py) ...
    for run in runs:
        assert any(event["others"] >= 1 for event in events_named(run, "peers.at_work")), run.stdout[-2000:]
    # ... and each deleted its own at the end.
    container = stack.blob_service().get_container_client(sink)
    assert [blob.name for blob in container.list_blobs(name_starts_with="_state/active/")] == []


def test_a_worker_whose_deployment_is_busy_claims_no_more_files(stack: LocalStack, tmp_path: Path) -> None:
    """Files smaller than the call slots: the worker claims the next only when the calls it already has
    no longer fill the deployment's window, not while they queue for their turn (else the first replica
    started holds several files that others could work on)."""
    source, sink = tmp_path / "source", tmp_path / "sink"
    files, ids = batch_files(4, 10, "busy")
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    stack.openai.configure(rpm=120)  # two requests a second once learned: every file takes seconds
    process = start_worker(stack, "--source", str(source), "--sink", str(sink))
    wait_for(stack, "successes", 12)  # the first file is done and the pace is learned

    claimed = list((sink / "_state").rglob("*.lock"))
    run = finish(process)

    assert len(claimed) <= 2, claimed  # the file in work, and the next as the last calls finish
    assert run.code == 0, run.stdout[-3000:]
    assert_exactly_once(
        [
            json.loads(line)
            for path in sorted(sink.rglob("*.results.jsonl"))
            for line in path.read_text().splitlines()
        ],
        ids,
    )
