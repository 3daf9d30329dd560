"""Hostile input — nothing hangs, nothing escapes, nothing is silently skipped.

Each bad line gets its error record when the file is read (never called, never billed), the good lines
around it are answered, and a rerun makes no call at all. First answers that are 429s with odd rate
headers never stop or starve the run.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from tests.e2e.helpers import answer_text, batch_line, manifest, new_container, results, run_worker, upload
from tests.stack import LocalStack
from worker.ratelimit import MIN_REQUESTS_PER_MINUTE
from worker.storage import MAX_LINE_BYTES


def request_line(custom_id: str, body: dict[str, Any], url: str = "/v1/chat/completions") -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).encode()


def giant_line() -> bytes:
    """A well-formed request line of 17 MiB: over the 16 MiB a line may hold."""
    text = "x" * (MAX_LINE_BYTES + 1024 * 1024)
    return request_line("giant", {"messages": [{"role": "user", "content": text}]})


HOSTILE_LINES: list[tuple[bytes, str, str | None]] = [  # line, custom_id of its record, error code
    (batch_line("good-1", "first good line"), "good-1", None),
    (
        request_line("x\ud800", {"messages": [{"role": "user", "content": "lone"}]}),
        "hostile.jsonl:2",
        "invalid_custom_id",
    ),
    (batch_line("stream-true", "s", stream=True), "stream-true", "invalid_body"),
    (
        request_line(
            "text-null", {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}
        ),
        "text-null",
        "invalid_body",
    ),
    (batch_line("nan-max-tokens", "n", max_tokens=float("nan")), "nan-max-tokens", "invalid_body"),
    (batch_line("huge-max-tokens", "h", max_tokens=1e30), "huge-max-tokens", "invalid_body"),
    (request_line("messages-string", {"messages": "a string"}), "messages-string", "invalid_body"),
    (batch_line("model-dotdot", "m", model=".."), "model-dotdot", "invalid_body"),
    (batch_line("model-path", "m", model="gpt-4o-mini/../x?y#z"), "model-path", "invalid_body"),
    (request_line("embed-123", {"input": 123}, "/embeddings"), "embed-123", "invalid_body"),
    (
        request_line("embed-ok", {"input": "embed me", "model": "text-embedding-3-small"}, "/embeddings"),
        "embed-ok",
        None,
    ),
    (giant_line(), "hostile.jsonl:12", "line_too_large"),
    (batch_line("good-2", "second good line", model="gpt-4o-mini", max_tokens=50), "good-2", None),
]
HOSTILE_FILES: dict[str, tuple[bytes, str | None]] = {  # name: content, error code
    "nan.json": (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": NaN}', "invalid_body"),
    "stream.json": (b'{"messages": [{"role": "user", "content": "x"}], "stream": true}', "invalid_body"),
    "fine.json": (b'{"messages": [{"role": "user", "content": "a good body"}]}', None),
    "fine.txt": (b"a good prompt", None),
}


def test_hostile_lines_are_recorded_once_never_called_and_a_rerun_calls_nothing(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    hostile = b"\n".join(line for line, _, _ in HOSTILE_LINES) + b"\n"
    upload(
        stack, source, {"hostile.jsonl": hostile, **{name: data for name, (data, _) in HOSTILE_FILES.items()}}
    )
    args = ["--source", stack.blob_url(source), "--sink", stack.blob_url(sink), "--concurrency", "1"]

    run = run_worker(stack, *args)

    assert run.code == 0, run.stdout[-3000:]
    records = results(stack, sink)
    counts = Counter(record["custom_id"] for record in records)
    expected = {custom_id: code for _, custom_id, code in HOSTILE_LINES} | {
        name: code for name, (_, code) in HOSTILE_FILES.items()
    }
    assert counts == Counter(expected.keys())  # exactly one record per line and per file
    by_id = {record["custom_id"]: record for record in records}
    for custom_id, code in expected.items():
        error = by_id[custom_id]["error"]
        if code is None:
            assert error is None, (custom_id, error)
        else:
            assert error is not None, custom_id
            assert (error["code"], by_id[custom_id]["response"]) == (code, None), custom_id
            assert error["message"], custom_id
    assert answer_text(by_id["good-1"]) == "ECHO: first good line"
    assert answer_text(by_id["good-2"]) == "ECHO: second good line"
    assert by_id["embed-ok"]["response"]["body"]["data"]
    assert "body.messages[0].content[0].text must be a string" in by_id["text-null"]["error"]["message"]
    assert "remove `stream` or set it to false" in by_id["stream-true"]["error"]["message"]
    good = sum(code is None for code in expected.values())
    assert stack.openai.stats()["requests"] == good  # no bad line was ever sent
    assert (run.summary["succeeded"], run.summary["failed"]) == (good, len(expected) - good)

    rerun = run_worker(stack, *args)

    assert rerun.code == 0, rerun.stdout[-3000:]
    assert stack.openai.stats()["requests"] == good  # zero calls
    assert (rerun.summary["total"], rerun.summary["skipped"]) == (len(expected), len(expected))
    assert len(results(stack, sink)) == len(expected)


def run_after_a_first_429(stack: LocalStack, run_id: str) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    upload(stack, source, {f"p{i}.txt": f"prompt {i}".encode() for i in range(8)})
    run = run_worker(
        stack,
        "--source",
        stack.blob_url(source),
        "--sink",
        stack.blob_url(sink),
        "--concurrency",
        "1",
        "--run-id",
        run_id,
    )
    (limits,) = manifest(stack, sink, "", run_id)["rate_limits"].values()  # one deployment
    assert run.code == 0, run.stdout[-3000:]
    return run.code, limits, results(stack, sink)


def test_a_first_429_saying_no_tokens_remain_does_not_stop_the_run(stack: LocalStack) -> None:
    stack.openai.configure(force_429=1, force_429_remaining=0, force_429_retry_after_ms=200)

    _, limits, records = run_after_a_first_429(stack, "remaining-zero")

    assert sorted(record["custom_id"] for record in records) == [f"p{i}.txt" for i in range(8)]
    assert all(record["error"] is None for record in records)
    assert stack.openai.stats()["by_status"] == {"429": 1, "200": 8}
    for dimension in ("tpm", "rpm"):
        assert limits[dimension]["learned"] is None or limits[dimension]["learned"] > 0, limits


def test_a_first_429_behind_a_gateway_without_rate_headers_does_not_starve_the_run(stack: LocalStack) -> None:
    stack.openai.configure(force_429=1, rate_headers=False, force_429_retry_after_ms=200)

    _, limits, records = run_after_a_first_429(stack, "no-headers")

    assert len(records) == 8
    assert all(record["error"] is None for record in records)
    assert stack.openai.stats()["by_status"] == {"429": 1, "200": 8}
    # It used to pace at about 1 token and 1 request a minute for the rest of the run.
    for dimension in ("tpm", "rpm"):
        pacing = limits[dimension]["pacing"]
        assert pacing is None or pacing >= MIN_REQUESTS_PER_MINUTE, limits


def test_one_folder_of_everything_hostile_at_concurrency_1_ends_0_with_one_record_each(
    stack: LocalStack, tmp_path: Path
) -> None:
    """Every hostile line, file and name in one local folder, a first 429 saying nothing remains, one
    worker call slot: exit 0, exactly one record per processable item, every other input reported, and a
    rerun that makes zero calls."""
    source, sink, outside = tmp_path / "in", tmp_path / "out", tmp_path / "private"
    for folder in (source, sink, outside):
        folder.mkdir()
    (source / "hostile.jsonl").write_bytes(b"\n".join(line for line, _, _ in HOSTILE_LINES) + b"\n")
    for name, (data, _) in HOSTILE_FILES.items():
        (source / name).write_bytes(data)
    (source / "back\\slash.txt").write_text("backslash", encoding="utf-8")
    (source / "line\nbreak.txt").write_text("newline", encoding="utf-8")
    with open(os.path.join(os.fsencode(source), b"latin-\xe9.txt"), "wb") as file:
        file.write(b"a name that is not UTF-8")
    (outside / "secret.txt").write_text("never send this", encoding="utf-8")
    (source / "link.txt").symlink_to(outside / "secret.txt")
    (source / "collide.txt").write_text("my result path is taken", encoding="utf-8")
    (sink / "collide.txt.results.jsonl").write_bytes(b"the user's own file\n")
    big = {"input": [f"passage {n}" for n in range(40)], "model": "text-embedding-3-small"}
    (source / "big.jsonl").write_bytes(request_line("big-embedding", big, "/embeddings") + b"\n")
    stack.openai.configure(force_429=1, force_429_remaining=0, embedding_dimensions=8192)
    args = ["--source", str(source), "--sink", str(sink), "--concurrency", "1"]

    run = run_worker(stack, *args)

    assert run.code == 0, run.stdout[-3000:]
    records: list[dict[str, Any]] = []
    for path in sink.rglob("*.results.jsonl"):
        if path.name != "collide.txt.results.jsonl":
            records += [json.loads(line) for line in path.read_bytes().splitlines()]
    expected = {custom_id: code for _, custom_id, code in HOSTILE_LINES} | {
        name: code for name, (_, code) in HOSTILE_FILES.items()
    }
    expected["big-embedding"] = None
    assert Counter(r["custom_id"] for r in records) == Counter(expected.keys())
    assert {r["custom_id"]: (r["error"] or {}).get("code") for r in records} == expected
    problems = {(p["file"], p["code"]) for p in run.events if p["event"] == "input.skipped" and "code" in p}
    problems |= {
        (p["file"], p["code"])
        for p in json.loads(next((sink / "_runs").glob("*.json")).read_bytes())["input_problems"]
    }
    for name, code in [
        ("back\\slash.txt", "invalid_name"),
        ("line\\x0abreak.txt", "invalid_name"),
        ("latin-\\xe9.txt", "invalid_name"),
        ("link.txt", "symlink_skipped"),
        ("collide.txt", "name_collision"),
    ]:
        assert (name, code) in problems, (name, code, problems)
    assert (sink / "collide.txt.results.jsonl").read_bytes() == b"the user's own file\n"
    calls = stack.openai.stats()["requests"]

    rerun = run_worker(stack, *args)

    assert rerun.code == 0, rerun.stdout[-3000:]
    assert stack.openai.stats()["requests"] == calls  # zero calls
    assert rerun.summary["skipped"] == len(expected)
