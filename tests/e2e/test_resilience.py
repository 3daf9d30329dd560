"""Never lose, never duplicate — kill -9, overlapping runs, SIGTERM, bad input, faults."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from typing import Any

from tests.e2e.helpers import (
    answer_text,
    batch_line,
    finish,
    new_container,
    results,
    run_worker,
    start_worker,
    upload,
    wait_for,
)
from tests.stack import LocalStack


def batch_files(files: int, lines: int, tag: str) -> tuple[dict[str, bytes], set[str]]:
    data: dict[str, bytes] = {}
    ids: set[str] = set()
    for f in range(files):
        rows = []
        for i in range(lines):
            custom_id = f"{tag}-{f}-{i}"
            rows.append(batch_line(custom_id, f"{tag} file {f} line {i}"))
            ids.add(custom_id)
        data[f"{tag}/part-{f:03}.jsonl"] = b"\n".join(rows) + b"\n"
    return data, ids


def assert_exactly_once(records: list[dict[str, Any]], expected: set[str]) -> None:
    counts = Counter(record["custom_id"] for record in records)
    assert set(counts) == expected
    duplicated = {custom_id: n for custom_id, n in counts.items() if n > 1}
    assert not duplicated, duplicated


def test_kill_9_mid_run_then_rerun_records_everything_once(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    files, ids = batch_files(3, 100, "k9")
    prompts = {f"loose/p{i}.txt": f"loose prompt {i}".encode() for i in range(60)}
    upload(stack, source, {**files, **prompts})
    expected = ids | set(prompts)
    stack.openai.configure(latency_ms=60, jitter_ms=40)
    args = ["--source", stack.blob_url(source), "--sink", stack.blob_url(sink), "--concurrency", "16"]

    process = start_worker(stack, *args, "--lease-seconds", "15")
    wait_for(stack, "successes", 150)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    partial = len(results(stack, sink))
    assert 0 < partial < len(expected)

    rerun = run_worker(stack, *args, "--lease-seconds", "15")  # at once, as a platform retry would

    assert rerun.code == 0, rerun.stdout[-3000:]
    assert_exactly_once(results(stack, sink), expected)
    assert rerun.summary["held"] == 0
    assert any(e["event"] == "unit.held_elsewhere" for e in rerun.events)  # the dead holder's leases
    assert rerun.summary["skipped"] >= partial
    assert stack.openai.stats()["repeats"] <= 16  # at most the calls that were in flight at the kill


def test_two_processes_at_once_split_the_work_exactly_once(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    files, ids = batch_files(20, 20, "two")
    upload(stack, source, files)
    stack.openai.configure(latency_ms=30, jitter_ms=30)
    args = ["--source", stack.blob_url(source), "--sink", stack.blob_url(sink), "--concurrency", "8"]

    first, second = start_worker(stack, *args), start_worker(stack, *args)
    runs = [finish(first), finish(second)]

    assert [run.code for run in runs] == [0, 0], [run.stdout[-2000:] for run in runs]
    assert_exactly_once(results(stack, sink), ids)
    assert stack.openai.stats()["requests"] <= 1.05 * len(ids)
    assert sum(run.summary["succeeded"] for run in runs) == len(ids)
    assert all(run.summary["succeeded"] > 0 for run in runs), "both replicas should have taken work"


def test_sigterm_lets_slow_calls_finish_exits_1_and_the_rerun_completes(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    files, ids = batch_files(2, 40, "term")
    upload(stack, source, files)
    stack.openai.configure(latency_ms=4000)
    args = ["--source", stack.blob_url(source), "--sink", stack.blob_url(sink), "--concurrency", "8"]

    process = start_worker(stack, *args)
    wait_for(stack, "in_flight", 8, timeout=30)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    run = finish(process, timeout=60)
    took = time.monotonic() - sent

    assert run.code == 1
    assert took < 30
    summary = run.summary
    assert summary["succeeded"] >= 8  # the in-flight calls were allowed to finish and were written
    assert summary["interrupted"] == 0
    assert any(event["event"] == "run.signal" for event in run.events)

    stack.openai.configure(latency_ms=0)
    rerun = run_worker(stack, *args)
    assert rerun.code == 0
    assert_exactly_once(results(stack, sink), ids)


def test_sigterm_with_hung_calls_abandons_them_after_the_drain(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {f"h{i}.txt": f"hang {i}".encode() for i in range(6)})
    stack.openai.configure(hang_rate=1.0, hang_seconds=120)
    args = ["--source", stack.blob_url(source), "--sink", stack.blob_url(sink), "--drain-seconds", "2"]

    process = start_worker(stack, *args)
    wait_for(stack, "in_flight", 6, timeout=30)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    run = finish(process, timeout=60)

    assert run.code == 1
    assert time.monotonic() - sent < 10
    assert run.summary["interrupted"] == 6
    assert results(stack, sink) == []

    stack.openai.configure(hang_rate=0.0)
    rerun = run_worker(stack, *args)
    assert rerun.code == 0
    assert_exactly_once(results(stack, sink), {f"h{i}.txt" for i in range(6)})


def test_bad_input_is_reported_and_good_input_completes(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    good_batch = [batch_line("ok-1", "good line one"), batch_line("ok-2", "good line two")]
    bad_batch = [
        b'{"custom_id": "broken", "method": "POST", "url": "/v1/chat/compl',
        json.dumps(
            {
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "x"}]},
            }
        ).encode(),
        batch_line("ok-1", "a duplicate of ok-1"),
        json.dumps({"custom_id": "resp", "method": "POST", "url": "/v1/responses", "body": {}}).encode(),
        b"\xff\xfe not utf-8",
    ]
    files = {
        "mixed.jsonl": b"\n".join([good_batch[0], *bad_batch, good_batch[1]]) + b"\n",
        "odd name #1 ?.txt": b"odd name prompt",
        "ünïcødé/файл.md": b"unicode prompt",
        "deep/a/b/c/d.txt": b"deep prompt",
        "empty.md": b"",
        "blank.txt": b"   \n\t  ",
        "latin1.txt": "café".encode("latin-1"),
        "bad.json": b'{"messages": ',
        "huge.txt": b"x" * (8 * 1024 * 1024 + 1),
        "notes.csv": b"a,b\n",
        "empty.jsonl": b"\n\n",
    }
    upload(stack, source, files)

    run = run_worker(stack, "--source", stack.blob_url(source), "--sink", stack.blob_url(sink))

    assert run.code == 0, run.stdout[-3000:]
    by_id = {record["custom_id"]: record for record in results(stack, sink)}
    for custom_id, text in [
        ("ok-1", "good line one"),
        ("ok-2", "good line two"),
        ("odd name #1 ?.txt", "odd name prompt"),
        ("ünïcødé/файл.md", "unicode prompt"),
        ("deep/a/b/c/d.txt", "deep prompt"),
    ]:
        assert by_id[custom_id]["error"] is None, custom_id
        assert answer_text(by_id[custom_id]) == f"ECHO: {text}"
    expected_errors = {
        "mixed.jsonl:2": "invalid_json",
        "mixed.jsonl:3": "missing_custom_id",
        "resp": "unsupported_url",
        "mixed.jsonl:6": "invalid_encoding",
        "empty.md": "empty_input",
        "blank.txt": "empty_input",
        "latin1.txt": "invalid_encoding",
        "bad.json": "invalid_json",
        "huge.txt": "file_too_large",
        "empty.jsonl": "empty_input",
    }
    for custom_id, code in expected_errors.items():
        assert by_id[custom_id]["error"]["code"] == code, (custom_id, by_id[custom_id])
        assert by_id[custom_id]["error"]["message"]
    assert len(by_id) == 5 + len(expected_errors)
    assert answer_text(by_id["ok-1"]) == "ECHO: good line one"  # the first occurrence won
    duplicate = [e for e in run.events if e["event"] == "input.duplicate_custom_id"]
    assert duplicate and duplicate[0]["custom_id"] == "ok-1" and duplicate[0]["line"] == 4
    assert duplicate[0]["file"] == "mixed.jsonl"
    assert any(e["event"] == "input.skipped" and e["file"] == "notes.csv" for e in run.events)
    summary = run.summary
    assert (summary["succeeded"], summary["failed"]) == (5, len(expected_errors))


def test_injected_5xx_and_hangs_all_items_still_succeed(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    files, ids = batch_files(4, 50, "flaky")
    upload(stack, source, files)
    stack.openai.configure(error_rate=0.07, hang_rate=0.03, hang_seconds=60, seed=7)

    run = run_worker(
        stack,
        "--source",
        stack.blob_url(source),
        "--sink",
        stack.blob_url(sink),
        "--request-timeout",
        "1",
        "--concurrency",
        "32",
    )

    assert run.code == 0, run.stdout[-3000:]
    records = results(stack, sink)
    assert_exactly_once(records, ids)
    assert all(record["error"] is None for record in records)
    stats = stack.openai.stats()
    assert sum(n for status, n in stats["by_status"].items() if status.startswith("5")) > 0
    assert run.summary["retries"] > 0


def test_azurite_restart_mid_run_loses_nothing(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    files, ids = batch_files(3, 100, "restart")
    upload(stack, source, files)
    stack.openai.configure(latency_ms=20, jitter_ms=20)
    args = [
        "--source",
        stack.blob_url(source),
        "--sink",
        stack.blob_url(sink),
        "--concurrency",
        "8",
        "--lease-seconds",
        "15",
    ]

    process = start_worker(stack, *args)
    wait_for(stack, "successes", 80)
    stack.restart_azurite()
    run = finish(process)

    assert run.code in (0, 1), run.stdout[-3000:]
    if run.code == 1:
        rerun = run_worker(stack, *args)
        assert rerun.code == 0, rerun.stdout[-3000:]
    assert_exactly_once(results(stack, sink), ids)


def test_identity_endpoint_briefly_down_at_start(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {f"i{i}.txt": f"identity {i}".encode() for i in range(5)})
    stack.identity.configure(down=True)

    process = start_worker(stack, "--source", stack.blob_url(source), "--sink", stack.blob_url(sink))
    deadline = time.monotonic() + 60
    # azure-identity retries a dropped connection itself (4 requests); 8 means one whole fetch failed.
    while stack.identity.stats()["requests"] < 8:
        assert time.monotonic() < deadline, "the worker never asked for a token"
        time.sleep(0.05)
    stack.identity.configure(down=False)
    run = finish(process)

    assert run.code == 0, run.stdout[-3000:]
    assert len(results(stack, sink)) == 5
    assert any(e["event"] == "identity.token_endpoint_unreachable" for e in run.events)


def test_wrong_storage_secret_exits_2_fast_without_leaking_it(stack: LocalStack, tmp_path: object) -> None:
    secret = "c2VjcmV0LWtleS10aGF0LWlzLXdyb25nLWFuZC1sb25nLWVub3VnaA=="
    connection = (
        f"DefaultEndpointsProtocol=https;AccountName=devstoreaccount1;AccountKey={secret};"
        f"BlobEndpoint={stack.account_url};"
    )
    started = time.monotonic()
    run = run_worker(
        stack,
        "--source",
        str(tmp_path),
        "--sink",
        stack.blob_url("results"),
        env={"AZURE_STORAGE_CONNECTION_STRING": connection},
    )

    assert run.code == 2
    assert time.monotonic() - started < 20
    assert "storage did not accept the credential" in run.summary["error"]
    assert secret not in run.stdout + run.stderr
    assert os.path.exists(str(tmp_path))
