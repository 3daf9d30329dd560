"""Blob → AsyncAzureOpenAI → blob, end to end, through the real CLI and SDKs."""

from __future__ import annotations

import json
import re
from collections import Counter

from tests.e2e.helpers import (
    answer_text,
    batch_line,
    manifest,
    new_container,
    results,
    run_in_terminal,
    run_revoking_tokens_mid_run,
    run_worker,
    upload,
)
from tests.stack import LocalStack


def mixed_inputs() -> tuple[dict[str, bytes], dict[str, str]]:
    """310 items in every format; returns the files and custom_id → the user text sent."""
    files: dict[str, bytes] = {}
    expected: dict[str, str] = {}
    for i in range(120):
        name = f"notes/day{i % 7}/note-{i}.txt"
        files[name] = f"Summarise note {i}: the quick brown fox {i}".encode()
        expected[name] = f"Summarise note {i}: the quick brown fox {i}"
    for i in range(30):
        name = f"docs/doc-{i}.md"
        files[name] = f"# Title {i}\n\nSome *markdown* body {i}.".encode()
        expected[name] = f"# Title {i}\n\nSome *markdown* body {i}."
    for i in range(40):
        name = f"bodies/req-{i}.json"
        body = {
            "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"json body {i}"}]
        }
        files[name] = json.dumps(body).encode()
        expected[name] = f"json body {i}"
    for batch in range(3):
        lines = []
        for i in range(40):
            custom_id = f"batch{batch}-item{i}"
            lines.append(batch_line(custom_id, f"batch {batch} line {i}", max_tokens=20))
            expected[custom_id] = f"batch {batch} line {i}"
        files[f"batches/b{batch}.jsonl"] = b"\n".join(lines) + b"\n"
    files["README.csv"] = b"not an input"
    return files, expected


def test_three_hundred_mixed_prompts_with_managed_identity(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    files, expected = mixed_inputs()
    upload(stack, source, files)

    run = run_worker(
        stack,
        "--source",
        stack.blob_url(source),
        "--sink",
        stack.blob_url(sink, "results/"),
        "--concurrency",
        "24",
        "--run-id",
        "e2e-mixed",
        env={"WORKER_PRICE_INPUT_PER_MILLION": "1.0", "WORKER_PRICE_OUTPUT_PER_MILLION": "2.0"},
    )

    assert run.code == 0, run.stderr[-2000:]
    records = results(stack, sink, "results/")
    counts = Counter(record["custom_id"] for record in records)
    assert set(counts) == set(expected)
    assert max(counts.values()) == 1
    for record in records:
        assert record["error"] is None, record
        assert record["response"]["status_code"] == 200
        assert record["id"].startswith("batch_req_")
        assert answer_text(record) == "ECHO: " + expected[record["custom_id"]]
    summary = run.summary
    assert (summary["total"], summary["succeeded"], summary["failed"], summary["skipped"]) == (310, 310, 0, 0)
    assert summary["exit_code"] == 0
    written = manifest(stack, sink, "results/", "e2e-mixed")
    assert written["counts"]["succeeded"] == 310
    assert written["tokens"]["total"] > 0
    tokens = written["tokens"]
    assert written["estimated_cost"] == round((tokens["prompt"] * 1.0 + tokens["completion"] * 2.0) / 1e6, 6)
    assert written["latency_seconds"]["p50"] is not None
    assert {"file": "README.csv", "code": "unsupported_file_type"} in written["input_problems"]
    identity = stack.identity.stats()
    assert identity["tokens_issued"] <= 4  # one per scope, shared by every request
    assert all(entry["principal"] == "user-assigned" for entry in identity["issued"])
    assert stack.openai.stats()["repeats"] == 0


def test_a_rerun_skips_everything_already_done(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {f"p{i}.txt": f"prompt {i}".encode() for i in range(12)})
    first = run_worker(stack, "--source", stack.blob_url(source), "--sink", stack.blob_url(sink))
    assert first.code == 0
    calls = stack.openai.stats()["requests"]

    second = run_worker(stack, "--source", stack.blob_url(source), "--sink", stack.blob_url(sink))

    assert second.code == 0
    assert stack.openai.stats()["requests"] == calls
    assert (second.summary["total"], second.summary["skipped"], second.summary["succeeded"]) == (12, 12, 0)
    assert len(results(stack, sink)) == 12


def test_429_with_retry_after_ms_is_waited_out(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"one.txt": b"throttle me"})
    stack.openai.configure(force_429=2, force_429_retry_after_ms=700)

    run = run_worker(
        stack, "--source", stack.blob_url(source), "--sink", stack.blob_url(sink), "--run-id", "throttled"
    )

    assert run.code == 0
    (record,) = results(stack, sink)
    assert record["error"] is None
    assert answer_text(record) == "ECHO: throttle me"
    (limits,) = manifest(stack, sink, "", "throttled")["rate_limits"].values()  # one deployment
    assert limits["throttled"] == 2
    assert set(limits["tpm"]) == {"configured", "learned", "pacing", "backed_off", "remaining_counts_s"}
    stats = stack.openai.stats()
    assert stats["by_status"] == {"429": 2, "200": 1}
    assert run.summary["throttled"] == 2
    assert run.summary["retries"] == 2
    assert run.summary["duration_s"] >= 1.4  # two waits of 700 ms, as the service asked


def test_revoked_token_gets_a_fresh_one_and_succeeds(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {f"r{i}.txt": f"revoked {i}".encode() for i in range(20)})
    # Prime the cached-token situation: every token issued so far is revoked before the run's calls.
    stack.openai.configure(force_401=1)

    run = run_worker(
        stack, "--source", stack.blob_url(source), "--sink", stack.blob_url(sink), "--concurrency", "4"
    )

    assert run.code == 0, run.stdout[-2000:]
    records = results(stack, sink)
    assert len(records) == 20
    assert all(record["error"] is None for record in records)
    assert run.summary["token_refreshes"] == 1
    assert stack.openai.stats()["by_status"].get("401") == 1


def test_content_filter_is_one_error_line_and_never_retried(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {"bad.txt": b"please FILTER_ME now", "good.txt": b"fine"})

    run = run_worker(stack, "--source", stack.blob_url(source), "--sink", stack.blob_url(sink))

    assert run.code == 0
    by_id = {record["custom_id"]: record for record in results(stack, sink)}
    assert by_id["bad.txt"]["error"]["code"] == "content_filter"
    assert by_id["bad.txt"]["response"]["status_code"] == 400
    assert by_id["bad.txt"]["response"]["body"]["error"]["code"] == "content_filter"
    assert by_id["good.txt"]["error"] is None
    assert stack.openai.stats()["by_status"] == {"400": 1, "200": 1}
    assert (run.summary["succeeded"], run.summary["failed"]) == (1, 1)


def test_missing_setting_exits_2_naming_it(stack: LocalStack) -> None:
    run = run_worker(stack, "--source", "/nonexistent-but-fine")

    assert run.code == 2
    summary = run.summary
    assert "--sink or WORKER_SINK" in summary["error"]
    assert stack.openai.stats()["requests"] == 0


def test_missing_endpoint_exits_2_naming_it(stack: LocalStack, tmp_path: object) -> None:
    env = {"AZURE_OPENAI_ENDPOINT": ""}
    run = run_worker(stack, "--source", str(tmp_path), "--sink", str(tmp_path), env=env)
    assert run.code == 2
    assert "AZURE_OPENAI_ENDPOINT" in run.summary["error"]


def test_tokens_revoked_mid_run_are_replaced_once_for_all_waiters(stack: LocalStack) -> None:
    run, sink = run_revoking_tokens_mid_run(stack, auth="managed-identity", items=150)

    assert run.code == 0
    assert (run.summary["succeeded"], run.summary["token_refreshes"]) == (150, 1)
    assert stack.openai.stats()["by_status"].get("401", 0) >= 1
    assert len(results(stack, sink)) == 150
    assert stack.identity.stats()["tokens_issued"] <= 4


def test_local_folders_as_on_a_laptop(stack: LocalStack, tmp_path: object) -> None:
    from pathlib import Path

    root = Path(str(tmp_path))
    source, sink = root / "in", root / "in" / "out"  # the sink inside the source must not be re-read
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_text("local a", encoding="utf-8")
    (source / "sub" / "b.md").write_text("local b", encoding="utf-8")
    (source / "sub" / "c.jsonl").write_bytes(
        batch_line("c1", "local c1") + b"\n" + batch_line("c2", "local c2") + b"\n"
    )
    (source / "empty.txt").write_bytes(b"")

    first = run_worker(stack, "--source", str(source), "--sink", str(sink))
    second = run_worker(stack, "--source", str(source), "--sink", str(sink))

    assert (first.code, second.code) == (0, 0)
    records = [
        json.loads(line) for path in sink.rglob("*.results.jsonl") for line in path.read_text().splitlines()
    ]
    by_id = {record["custom_id"]: record for record in records}
    assert sorted(by_id) == ["a.txt", "c1", "c2", "empty.txt", "sub/b.md"]
    assert len(records) == 5
    assert answer_text(by_id["sub/b.md"]) == "ECHO: local b"
    assert by_id["empty.txt"]["error"]["code"] == "empty_input"
    assert (first.summary["succeeded"], first.summary["failed"]) == (4, 1)
    assert (second.summary["skipped"], second.summary["succeeded"]) == (5, 0)
    assert (sink / "_runs").is_dir()


def test_in_a_terminal_the_progress_bar_shows_the_total_and_an_eta(stack: LocalStack) -> None:
    # The listing is streamed: the total grows as files are opened, never `?` once one is.
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    lines = {
        f"part-{p}.jsonl": b"\n".join(batch_line(f"p{p}-{i}", f"line {i}") for i in range(20)) for p in (1, 2)
    }
    upload(stack, source, lines)
    stack.openai.configure(latency_ms=100)  # a few seconds in all: the bar is drawn many times
    screen = run_in_terminal(
        stack, "--source", stack.blob_url(source), "--sink", stack.blob_url(sink), "--concurrency", "2"
    )
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.output)
    assert screen.returncode == 0, text[-2000:]
    assert re.search(r"\b\d+/(20|40)\b", text), text[-2000:]  # done/total, with the total known
    assert "ETA" in text
    assert re.search(r"succeeded\s*│?\s*40\b", text), text[-2000:]  # then the summary table
    assert len(results(stack, sink)) == 40
