"""`--backend batch` end to end: the real CLI, SDKs and Azurite (HTTPS + OAuth), the fake's Batch API.

Tests wait on what the fake reports (a batch created, batches completed), never on the clock.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import (
    WORKER,
    answer_text,
    batch_line,
    manifest,
    new_container,
    results,
    run_worker,
    start_worker,
    upload,
)
from tests.stack import LocalStack

BATCH = ("--backend", "batch")


def batch_args(stack: LocalStack, source: str, sink: str, *extra: str) -> tuple[str, ...]:
    return ("--source", stack.blob_url(source), "--sink", stack.blob_url(sink), *BATCH, *extra)


def wait_for_batches(stack: LocalStack, *, finished: int, timeout: float = 60) -> dict[str, Any]:
    """Until the fake counts `finished` batches in a final state; returns its state."""
    deadline = time.monotonic() + timeout
    while True:
        state = stack.openai.batches()
        done = sum(
            state["by_status"].get(status, 0) for status in ("completed", "expired", "cancelled", "failed")
        )
        if done >= finished:
            return state
        assert time.monotonic() < deadline, (
            f"only {done} of {finished} batches finished: {state['by_status']}"
        )
        time.sleep(0.05)


def wait_for_creates(stack: LocalStack, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while stack.openai.batches()["stats"]["creates"] < at_least:
        assert time.monotonic() < deadline, "the worker created no batch"
        time.sleep(0.05)


def once_each(records: list[dict[str, Any]]) -> Counter[str]:
    counts = Counter(record["custom_id"] for record in records)
    assert max(counts.values()) == 1, [cid for cid, n in counts.items() if n > 1]
    return counts


def batches_command(stack: LocalStack, sink: str, *args: str) -> list[dict[str, Any]]:
    done = subprocess.run(
        [WORKER, "batches", *args, "--sink", stack.blob_url(sink)],
        env={**stack.worker_env("managed-identity"), "WORKER_LOG_FORMAT": "json"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_submit_then_collect_across_scheduled_runs_exactly_once(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    lines = [batch_line(f"line-{i}", f"batch line {i}", max_tokens=20) for i in range(4)]
    lines.append(batch_line("filtered", "please FILTER_ME now"))
    lines.append(json.dumps({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions"}).encode())
    files = {
        **{f"notes/n{i}.txt": f"note number {i}".encode() for i in range(3)},
        "bodies/b.json": json.dumps({"messages": [{"role": "user", "content": "a json body"}]}).encode(),
        "lines.jsonl": b"\n".join(lines) + b"\n",
    }
    upload(stack, source, files)
    stack.openai.configure_batches(hold=True)
    prices = {"WORKER_PRICE_INPUT_PER_MILLION": "1.0", "WORKER_PRICE_OUTPUT_PER_MILLION": "2.0"}
    args = batch_args(stack, source, sink)

    first = run_worker(stack, *args, "--run-id", "submit", env=prices)

    assert first.code == 0, first.stdout[-3000:] + first.stderr[-2000:]
    summary = first.summary
    assert (summary["total"], summary["pending"], summary["failed"], summary["succeeded"]) == (10, 9, 1, 0)
    state = stack.openai.batches()
    assert state["stats"]["creates"] == 5  # one per unit: 3 prompts, 1 body, 1 .jsonl
    assert state["stats"]["lines_submitted"] == 9
    assert stack.openai.stats()["requests"] == 0  # nothing went online
    (rejected,) = results(stack, sink)
    assert (rejected["custom_id"], rejected["error"]["code"]) == ("bad", "invalid_body")

    again = run_worker(stack, *args)  # a scheduled run while the batches are still running
    assert again.code == 0
    assert (again.summary["pending"], again.summary["skipped"]) == (9, 1)
    assert stack.openai.batches()["stats"]["creates"] == 5

    stack.openai.configure_batches(hold=False)
    wait_for_batches(stack, finished=5)
    collect = run_worker(stack, *args, "--run-id", "collect", env=prices)

    assert collect.code == 0, collect.stdout[-3000:]
    summary = collect.summary
    assert (summary["succeeded"], summary["failed"], summary["pending"], summary["skipped"]) == (8, 1, 0, 1)
    records = results(stack, sink)
    assert set(once_each(records)) == {
        "notes/n0.txt",
        "notes/n1.txt",
        "notes/n2.txt",
        "bodies/b.json",
        *(f"line-{i}" for i in range(4)),
        "filtered",
        "bad",
    }
    by_id = {record["custom_id"]: record for record in records}
    assert answer_text(by_id["line-2"]) == "ECHO: batch line 2"
    assert answer_text(by_id["notes/n1.txt"]) == "ECHO: note number 1"
    assert by_id["line-2"]["id"].startswith("batch_req_")
    filtered = by_id["filtered"]
    assert filtered["error"]["code"] == "content_filter"
    assert filtered["response"]["status_code"] == 400
    assert filtered["response"]["body"]["error"]["code"] == "content_filter"
    written = manifest(stack, sink, "", "collect")
    assert written["backend"] == "batch"
    assert len(written["batches"]) == 5
    assert all(entry["status"] == "completed" and entry["collected"] for entry in written["batches"])
    tokens = written["tokens"]
    assert tokens["prompt"] > 0
    full_price = (tokens["prompt"] * 1.0 + tokens["completion"] * 2.0) / 1e6
    assert written["estimated_cost"] == round(full_price * 0.5, 6)
    per_batch = sum(entry["estimated_cost"] for entry in written["batches"])
    assert abs(per_batch - written["estimated_cost"]) < 1e-5

    uploads = stack.openai.batches()["stats"]["uploads"]
    rerun = run_worker(stack, *args)

    assert rerun.code == 0
    assert stack.openai.batches()["stats"]["uploads"] == uploads  # everything collected: nothing uploaded
    assert (rerun.summary["total"], rerun.summary["skipped"], rerun.summary["pending"]) == (10, 10, 0)
    assert len(results(stack, sink)) == 10


def test_a_crash_between_create_and_record_is_healed_by_adopting_the_batch(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"work.jsonl": b"\n".join(batch_line(f"w{i}", f"work {i}") for i in range(6))})
    stack.openai.configure_batches(create_delay_s=60)
    args = batch_args(stack, source, sink, "--lease-seconds", "15")
    process = start_worker(stack, *args)
    try:
        wait_for_creates(stack, 1)  # the batch exists; its answer (the id) never reaches the worker
    finally:
        process.kill()
        process.communicate(timeout=30)
    stack.openai.configure_batches(create_delay_s=0)
    wait_for_batches(stack, finished=1)
    (row,) = [line for line in batches_command(stack, sink) if line["event"] == "batch"]
    assert row["state"] == "submitting" and row["batch_id"] == stack.openai.batches()["batches"][0]["id"]

    rerun = run_worker(stack, *args)

    assert rerun.code == 0, rerun.stdout[-3000:]
    state = stack.openai.batches()
    assert (state["stats"]["creates"], state["stats"]["create_attempts"]) == (
        1,
        1,
    )  # adopted, not resubmitted
    assert any(event["event"] == "batch.adopted" for event in rerun.events)
    assert rerun.summary["succeeded"] == 6
    assert set(once_each(results(stack, sink))) == {f"w{i}" for i in range(6)}


def test_expired_lines_are_redone_in_a_new_batch(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"e.jsonl": b"\n".join(batch_line(f"e{i}", f"expire {i}") for i in range(5))})
    stack.openai.configure_batches(expire_lines=2)
    args = batch_args(stack, source, sink)
    assert run_worker(stack, *args).code == 0
    wait_for_batches(stack, finished=1)

    second = run_worker(stack, *args)

    assert second.code == 0
    assert (second.summary["succeeded"], second.summary["pending"]) == (3, 2)
    state = stack.openai.batches()
    assert state["stats"]["creates"] == 2 and state["stats"]["lines_expired"] == 2
    assert not any(record["error"] for record in results(stack, sink))  # expiry is never a result
    wait_for_batches(stack, finished=2)

    third = run_worker(stack, *args)

    assert third.code == 0
    assert (third.summary["succeeded"], third.summary["pending"]) == (2, 0)
    records = results(stack, sink)
    assert set(once_each(records)) == {f"e{i}" for i in range(5)}
    assert all(record["error"] is None for record in records)


def test_expired_lines_go_online_with_batch_fallback_online(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"f.jsonl": b"\n".join(batch_line(f"f{i}", f"fallback {i}") for i in range(4))})
    stack.openai.configure_batches(expire_lines=1)
    args = batch_args(stack, source, sink, "--batch-fallback", "online")
    assert run_worker(stack, *args).code == 0
    wait_for_batches(stack, finished=1)

    second = run_worker(stack, *args)

    assert second.code == 0, second.stdout[-3000:]
    assert (second.summary["succeeded"], second.summary["pending"]) == (4, 0)
    assert stack.openai.batches()["stats"]["creates"] == 1
    assert stack.openai.stats()["successes"] == 1  # the expired line, called online
    assert set(once_each(results(stack, sink))) == {f"f{i}" for i in range(4)}


def test_split_at_max_lines_and_per_deployment_then_wait_until_done(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    stack.openai.configure(deployments=["gpt-4o-mini", "gpt-4o-mini-2", "text-embedding-3-small"])
    lines = [batch_line(f"a{i}", f"first {i}") for i in range(7)]
    lines += [batch_line(f"b{i}", f"second {i}", model="gpt-4o-mini-2") for i in range(2)]
    upload(stack, source, {"split.jsonl": b"\n".join(lines)})
    args = batch_args(
        stack, source, sink, "--batch-max-lines", "3", "--wait", "120", "--batch-poll-seconds", "0.2"
    )

    run = run_worker(stack, *args, "--run-id", "split")

    assert run.code == 0, run.stdout[-3000:]
    assert (run.summary["total"], run.summary["succeeded"], run.summary["pending"]) == (9, 9, 0)
    state = stack.openai.batches()
    assert state["stats"]["creates"] == 4  # a: 3 + 3 + 1 lines, b: 2 lines (another deployment)
    assert sorted(batch["request_counts"]["total"] for batch in state["batches"]) == [1, 2, 3, 3]
    records = results(stack, sink)
    assert set(once_each(records)) == {*(f"a{i}" for i in range(7)), "b0", "b1"}
    by_id = {record["custom_id"]: record for record in records}
    assert by_id["b1"]["response"]["body"]["model"] == "gpt-4o-mini-2"
    assert len(manifest(stack, sink, "", "split")["batches"]) == 4


def test_list_and_cancel_then_the_next_run_collects_partial_results(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(
        stack,
        source,
        {
            "one.jsonl": b"\n".join(batch_line(f"one{i}", f"one {i}") for i in range(3)),
            "two.jsonl": b"\n".join(batch_line(f"two{i}", f"two {i}") for i in range(3)),
        },
    )
    stack.openai.configure_batches(hold=True, answered_before_cancel=1)
    args = batch_args(stack, source, sink)
    assert run_worker(stack, *args).code == 0
    wait_for_creates(stack, 2)

    listed = batches_command(stack, sink)
    rows = [line for line in listed if line["event"] == "batch"]
    assert sorted(row["input"] for row in rows) == ["one.jsonl", "two.jsonl"]
    assert all(row["status"] == "in_progress" and row["lines"] == 3 for row in rows)
    assert listed[-1]["event"] == "batches.summary" and listed[-1]["live"] == 2

    cancelled = batches_command(stack, sink, "cancel")

    assert cancelled[-1]["cancelled"] == 2
    assert stack.openai.batches()["stats"]["cancels"] == 2
    wait_for_batches(stack, finished=2)
    next_run = run_worker(stack, *args)
    assert next_run.code == 0, next_run.stdout[-3000:]
    assert (next_run.summary["succeeded"], next_run.summary["pending"]) == (2, 4)  # the rest: new batches
    assert len(once_each(results(stack, sink))) == 2
    assert stack.openai.batches()["stats"]["creates"] == 4
    after = [line for line in batches_command(stack, sink) if line["event"] == "batch"]
    assert Counter(row["status"] for row in after) == {"cancelled": 2, "in_progress": 2}


def test_a_full_enqueued_token_quota_leaves_the_rest_pending_for_the_next_run(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(
        stack, source, {f"q{i}.jsonl": batch_line(f"q{i}", f"quota {i}", max_tokens=100) for i in range(3)}
    )
    stack.openai.configure_batches(hold=True, enqueued_token_limit=150, quota_fail_fast=True)
    args = batch_args(stack, source, sink)

    first = run_worker(stack, *args)

    assert first.code == 1, first.stdout[-3000:]  # deferred lines are in no live batch: work remains
    assert (first.summary["pending"], first.summary["deferred"]) == (3, 2)
    assert stack.openai.batches()["stats"]["creates"] == 1
    assert any(event["event"] == "batch.quota_full" for event in first.events)

    # the limit is reached at validation instead: the batches fail with token_limit_exceeded
    stack.openai.configure_batches(hold=False, quota_fail_fast=False, enqueued_token_limit=10)
    wait_for_batches(stack, finished=1)
    second = run_worker(stack, *args)
    assert second.code == 0, second.stdout[-3000:]
    assert (second.summary["succeeded"], second.summary["pending"]) == (1, 2)
    state = wait_for_batches(stack, finished=3)
    assert state["by_status"].get("failed") == 2  # q1 and q2 were refused at validation
    third = run_worker(stack, *args)
    assert third.code == 1
    assert (third.summary["pending"], third.summary["deferred"]) == (2, 2)  # backed off, nothing submitted
    assert stack.openai.batches()["stats"]["create_attempts"] == 4
    assert not any(record["error"] for record in results(stack, sink))

    stack.openai.configure_batches(enqueued_token_limit=None)
    fourth = run_worker(stack, *args, "--wait", "60", "--batch-poll-seconds", "0.2")
    assert fourth.code == 0, fourth.stdout[-3000:]
    assert (fourth.summary["succeeded"], fourth.summary["pending"]) == (2, 0)
    assert set(once_each(results(stack, sink))) == {"q0", "q1", "q2"}


def test_a_local_sink_keeps_its_batch_records_too(stack: LocalStack, tmp_path: Path) -> None:
    source, sink = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    (source / "x.jsonl").write_bytes(b"\n".join(batch_line(f"x{i}", f"local {i}") for i in range(3)))
    args = (
        "--source",
        str(source),
        "--sink",
        str(sink),
        *BATCH,
        "--wait",
        "60",
        "--batch-poll-seconds",
        "0.2",
    )

    stack.openai.configure(force_401=1)  # a revoked token: the files endpoint gets a freshly issued one

    run = run_worker(stack, *args)

    assert run.code == 0, run.stdout[-3000:]
    assert run.summary["succeeded"] == 3
    assert stack.openai.config()["force_401"] == 0  # the 401 was answered, and the run went on
    assert stack.identity.stats()["tokens_issued"] == 2  # local source and sink: one token, one refresh
    records = [json.loads(line) for line in (sink / "x.jsonl.results.jsonl").read_bytes().splitlines()]
    assert set(once_each(records)) == {"x0", "x1", "x2"}
    (record_file,) = (sink / "_batches" / "x.jsonl").iterdir()
    record = json.loads(record_file.read_text())
    assert record["state"] == "collected" and record["custom_ids"] == ["x0", "x1", "x2"]
    assert run_worker(stack, *args).summary["skipped"] == 3


def test_a_retired_api_version_is_a_configuration_error_and_leaves_no_record(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"v.jsonl": batch_line("v0", "version")})
    stack.openai.configure(api_versions=[stack.api_version])

    run = run_worker(stack, *batch_args(stack, source, sink, "--api-version", "2023-05-15"))

    assert run.code == 2, run.stdout[-3000:]
    assert "api-version" in run.summary["error"]
    assert stack.openai.batches()["stats"]["uploads"] == 0
    container = stack.blob_service().get_container_client(sink)
    assert not list(container.list_blobs(name_starts_with="_batches/"))
    assert results(stack, sink) == []


def test_a_deployment_that_takes_no_batches_is_a_configuration_error_not_item_errors(
    stack: LocalStack,
) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"m.jsonl": b"\n".join(batch_line(f"m{i}", f"model {i}") for i in range(3))})
    args = batch_args(stack, source, sink, "--deployment", "not-a-batch-deployment")
    assert run_worker(stack, *args).code == 0  # submitted; the service validates it afterwards
    wait_for_batches(stack, finished=1)

    run = run_worker(stack, *args)

    assert run.code == 2, run.stdout[-3000:]
    assert "model_mismatch" in run.summary["error"]
    assert results(stack, sink) == []  # nothing recorded: the fixed rerun does every item
    stack.openai.configure_batches(max_lines=2)
    fixed = batch_args(stack, source, sink, "--wait", "60", "--batch-poll-seconds", "0.2")
    too_many = run_worker(stack, *fixed)
    assert too_many.code == 2 and "too_many_tasks" in too_many.summary["error"]
    done = run_worker(stack, *fixed, "--batch-max-lines", "2")
    assert done.code == 0, done.stdout[-3000:]
    assert set(once_each(results(stack, sink))) == {"m0", "m1", "m2"}


async def test_the_fake_batch_api_takes_what_the_sdk_sends_and_pages_like_the_service(
    stack: LocalStack,
) -> None:
    import openai

    def client(
        api_version: str = stack.api_version, key: str = stack.openai_api_key
    ) -> openai.AsyncAzureOpenAI:
        return openai.AsyncAzureOpenAI(
            azure_endpoint=stack.openai_endpoint,
            api_version=api_version,
            api_key=key,
            http_client=openai.DefaultAioHttpClient(verify=stack.ssl_context()),
            max_retries=0,
        )

    stack.openai.configure_batches(hold=True)
    async with client() as sdk:
        created = []
        for i in range(5):
            data = input_file_line(f"p{i}", f"page {i}")
            uploaded = await sdk.files.create(
                file=(f"in{i}.jsonl", data, "application/jsonl"), purpose="batch"
            )
            assert (uploaded.purpose, uploaded.bytes) == ("batch", len(data))
            batch = await sdk.batches.create(
                input_file_id=uploaded.id,
                endpoint="/chat/completions",  # type: ignore[arg-type]
                completion_window="24h",
                metadata={"worker_part": str(i)},
            )
            assert batch.status == "validating" and batch.metadata == {"worker_part": str(i)}
            created.append(batch.id)
        listed = [batch.id async for batch in sdk.batches.list(limit=2)]  # three pages
        assert sorted(listed) == sorted(created) and len(listed) == 5
        first_page = await sdk.batches.list(limit=2)
        assert first_page.has_more and len(first_page.data) == 2
        cancelled = await sdk.batches.cancel(created[0])
        assert cancelled.status == "cancelling"
        stack.openai.configure_batches(hold=False)
        wait_for_batches(stack, finished=5)
        done = await sdk.batches.retrieve(created[1])
        assert done.status == "completed" and done.request_counts is not None
        assert done.request_counts.completed == 1 and done.output_file_id is not None
        output = (await sdk.files.content(done.output_file_id)).content
        answer = json.loads(output)
        assert answer["custom_id"] == "p1" and answer["response"]["status_code"] == 200
        assert answer["response"]["body"]["choices"][0]["message"]["content"] == "ECHO: page 1"
    async with client(api_version="1999-01-01") as old:
        stack.openai.configure(api_versions=[stack.api_version])
        with pytest.raises(openai.NotFoundError):
            await old.batches.retrieve(created[1])
    async with client(key="wrong") as unauthorised:
        with pytest.raises(openai.AuthenticationError):
            await unauthorised.batches.retrieve(created[1])


def input_file_line(custom_id: str, text: str) -> bytes:
    request = json.loads(batch_line(custom_id, text))
    request["url"] = "/chat/completions"
    request["body"]["model"] = "gpt-4o-mini"
    return json.dumps(request).encode() + b"\n"


def test_a_line_that_never_gets_an_answer_stops_being_resubmitted_after_max_attempts(
    stack: LocalStack,
) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    lines = [batch_line("good", "fine"), batch_line("poison", "ALWAYS_500 here")]
    upload(stack, source, {"p.jsonl": b"\n".join(lines)})
    args = batch_args(
        stack, source, sink, "--max-attempts", "2", "--wait", "60", "--batch-poll-seconds", "0.2"
    )

    run = run_worker(stack, *args)

    assert run.code == 1, run.stdout[-3000:]  # work remains, and nothing is recorded for the 5xx
    assert (run.summary["succeeded"], run.summary["interrupted"], run.summary["pending"]) == (1, 1, 0)
    assert stack.openai.batches()["stats"]["creates"] == 2  # the first batch, then one more try
    assert [record["custom_id"] for record in results(stack, sink)] == ["good"]
    assert any(event["event"] == "item.unfinished" for event in run.events)


def test_sigterm_while_waiting_for_batches_exits_with_a_summary(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"s.jsonl": b"\n".join(batch_line(f"s{i}", f"stop {i}") for i in range(3))})
    stack.openai.configure_batches(hold=True)
    process = start_worker(
        stack, *batch_args(stack, source, sink, "--wait", "600", "--batch-poll-seconds", "0.2")
    )
    wait_for_creates(stack, 1)
    deadline = time.monotonic() + 60
    while stack.openai.batches()["batches"][0]["status"] != "in_progress" or not list(
        stack.blob_service().get_container_client(sink).list_blobs(name_starts_with="_batches/")
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=30)

    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["event"] == "run.summary" and summary["exit_code"] == process.returncode == 1
    assert summary["pending"] == 3
    assert stack.openai.batches()["stats"]["creates"] == 1


def test_a_create_that_failed_without_a_batch_is_submitted_again_once(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"u.jsonl": b"\n".join(batch_line(f"u{i}", f"unknown {i}") for i in range(2))})
    stack.openai.configure_batches(create_failures=1)
    args = batch_args(stack, source, sink)

    first = run_worker(stack, *args)

    assert first.code == 1  # the worker cannot know whether the batch exists: the next run looks
    assert first.summary["interrupted"] == 2
    assert any(event["event"] == "batch.create_unknown" for event in first.events)
    second = run_worker(stack, *args, "--wait", "60", "--batch-poll-seconds", "0.2")
    assert second.code == 0, second.stdout[-3000:]
    assert any(event["event"] == "batch.never_created" for event in second.events)
    assert stack.openai.batches()["stats"]["creates"] == 1
    assert set(once_each(results(stack, sink))) == {"u0", "u1"}


def test_storage_refusing_the_collected_lines_exits_2_naming_the_role_and_the_fixed_rerun_collects(
    stack: LocalStack,
) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"r.jsonl": b"\n".join(batch_line(f"r{i}", f"role {i}") for i in range(3))})
    with stack.storage_proxy().running() as proxy:
        through_proxy = f"https://127.0.0.1:{proxy.port}/devstoreaccount1/{sink}"
        args = ("--source", stack.blob_url(source), "--sink", through_proxy, *BATCH)
        stack.openai.configure_batches(hold=True)
        submitted = run_worker(stack, *args)
        assert submitted.code == 0, submitted.stdout[-3000:]
        stack.openai.configure_batches(hold=False)
        wait_for_batches(stack, finished=1)

        proxy.deny_appends = True  # the sink's role assignment was removed before the collect
        refused = run_worker(stack, *args)
        assert refused.code == 2, refused.stdout[-3000:]
        assert proxy.appends_denied >= 1
        assert "Storage Blob Data Contributor" in refused.summary["error"]

        proxy.deny_appends = False
        fixed = run_worker(stack, *args)
    assert fixed.code == 0, fixed.stdout[-3000:]
    assert set(once_each(results(stack, sink))) == {"r0", "r1", "r2"}
    assert stack.openai.batches()["stats"]["creates"] == 1  # collected, never submitted again
