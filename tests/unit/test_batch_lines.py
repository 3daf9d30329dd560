"""The pure parts of the batch backend: Batch lines and files, result lines, validation verdicts, records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.batch.lines import (
    Chunker,
    LineTooLarge,
    batch_metadata,
    input_line,
    judge_validation,
    metadata_matches,
    read_result_line,
    split,
)
from worker.batch.state import BatchRecord, record_name
from worker.formats import Request
from worker.report import RunStats, estimated_cost
from worker.settings import Settings, load_job_file


def test_an_input_line_names_the_deployment_and_keeps_the_custom_id() -> None:
    request = Request("tickets/a.txt", "/chat/completions", {"messages": [{"role": "user", "content": "hé"}]})
    line = input_line(request, "gpt-4o-mini-batch")
    assert line.endswith(b"\n")
    assert json.loads(line) == {
        "custom_id": "tickets/a.txt",
        "method": "POST",
        "url": "/chat/completions",
        "body": {"messages": [{"role": "user", "content": "hé"}], "model": "gpt-4o-mini-batch"},
    }


def test_files_split_at_max_lines_max_bytes_and_per_deployment() -> None:
    items = [("d1", "/chat/completions", f"a{i}", b"x" * 10) for i in range(7)]
    items += [("d2", "/chat/completions", "b0", b"y" * 10)]
    items += [("d1", "/embeddings", "e0", b"z" * 10)]
    chunks = split(items, max_lines=3, max_bytes=1000)
    assert [(c.deployment, c.url, c.custom_ids) for c in chunks] == [
        ("d1", "/chat/completions", ["a0", "a1", "a2"]),
        ("d1", "/chat/completions", ["a3", "a4", "a5"]),
        ("d1", "/chat/completions", ["a6"]),
        ("d2", "/chat/completions", ["b0"]),
        ("d1", "/embeddings", ["e0"]),
    ]
    by_bytes = split([("d", "/chat/completions", f"c{i}", b"x" * 40) for i in range(5)], 100, 100)
    assert [c.custom_ids for c in by_bytes] == [["c0", "c1"], ["c2", "c3"], ["c4"]]
    assert all(c.size <= 100 and c.data == b"".join(c.lines) for c in by_bytes)


def test_a_line_larger_than_a_file_may_be_is_refused() -> None:
    with pytest.raises(LineTooLarge):
        Chunker(10, 100).add("d", "/chat/completions", "big", b"x" * 101)


def test_metadata_names_sink_unit_and_part_within_the_service_limits() -> None:
    unit = "deep/" * 200 + "file.jsonl"
    metadata = batch_metadata("https://acct.blob.core.windows.net/c/p/", unit, 3, "r1")
    assert len(metadata) <= 16
    assert all(len(key) <= 64 and len(value) <= 512 for key, value in metadata.items())
    assert metadata_matches(metadata, "https://acct.blob.core.windows.net/c/p", unit, 3, "r1")
    assert not metadata_matches(metadata, "https://acct.blob.core.windows.net/c/p", unit, 4, "r1")
    assert not metadata_matches(metadata, "https://acct.blob.core.windows.net/c/p", unit, 3, "r2")
    assert not metadata_matches(metadata, "https://acct.blob.core.windows.net/c/other", unit, 3, "r1")
    assert not metadata_matches(None, "x", unit, 3, "r1")


def line(**record: object) -> bytes:
    return json.dumps({"id": "batch_req_1", "custom_id": "c1", **record}).encode()


def test_a_success_keeps_the_response_and_counts_its_tokens() -> None:
    body = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    outcome = read_result_line(
        line(response={"status_code": 200, "request_id": "r", "body": body}, error=None)
    )
    assert outcome is not None
    assert (outcome.error, outcome.retry, outcome.prompt_tokens, outcome.completion_tokens) == (
        None,
        False,
        7,
        3,
    )
    assert outcome.response == {"status_code": 200, "request_id": "r", "body": body}


def test_an_error_line_carries_the_service_code_and_body() -> None:
    body = {"error": {"code": "content_filter", "message": "filtered"}}
    outcome = read_result_line(
        line(response={"status_code": 400, "request_id": "r", "body": body}, error=None)
    )
    assert outcome is not None and not outcome.retry
    assert outcome.error == {"code": "content_filter", "message": "filtered"}
    assert outcome.response is not None and outcome.response["body"] == body
    bare = read_result_line(line(response={"status_code": 404, "body": None}, error=None))
    assert bare is not None and bare.error == {"code": "http_404", "message": "HTTP 404"}


@pytest.mark.parametrize(
    "record",
    [
        {"response": None, "error": {"code": "batch_expired", "message": "expired"}},
        {"response": None, "error": {"code": "batch_cancelled", "message": "cancelled"}},
        {"response": {"status_code": 500, "body": {"error": {"code": "server_error"}}}, "error": None},
        {"response": {"status_code": 429, "body": None}, "error": None},
        {"response": None, "error": None},
    ],
)
def test_expired_and_retryable_lines_are_never_results(record: dict[str, object]) -> None:
    outcome = read_result_line(line(**record))
    assert outcome is not None and outcome.retry


def test_unreadable_lines_are_ignored() -> None:
    assert read_result_line(b"not json") is None
    assert read_result_line(b'{"custom_id": 5}') is None


def test_validation_verdicts() -> None:
    ids = ["a", "b", "c"]
    quota = judge_validation([("token_limit_exceeded", None, "enqueued tokens")], ids)
    assert (quota.quota, quota.line_errors, quota.problem) == (True, {}, None)
    lines = judge_validation([("invalid_request", 2, "bad body")], ids)
    assert lines.line_errors == {"b": {"code": "invalid_request", "message": "bad body"}}
    assert lines.problem is None
    whole = judge_validation([("model_mismatch", None, "not a batch deployment")], ids)
    assert whole.problem == "model_mismatch: not a batch deployment" and not whole.quota
    unknown = judge_validation([("internal_error", None, "try again")], ids)
    assert (unknown.quota, unknown.line_errors, unknown.problem) == (False, {}, None)  # lines go again
    every_line = judge_validation([("model_mismatch", n, "not a batch deployment") for n in (1, 2, 3)], ids)
    assert (
        every_line.line_errors == {}
    )  # the worker wrote those lines: the deployment is wrong, not the items
    assert every_line.problem == "model_mismatch: not a batch deployment"


def test_a_record_round_trips_and_lives_under_batches() -> None:
    record = BatchRecord(
        unit="a/b.jsonl", part=2, deployment="d", url="/chat/completions", custom_ids=["x", "y"]
    )
    assert record.name == record_name("a/b.jsonl", 2) == "_batches/a/b.jsonl/000002.json"
    again = BatchRecord.from_json(record.to_json())
    assert again == record
    assert BatchRecord.from_json(json.dumps({**json.loads(record.to_json()), "future": 1}).encode()) == record


def test_batch_tokens_are_priced_at_the_discount() -> None:
    settings = Settings(price_input_per_million=1.0, price_output_per_million=2.0, batch_discount=0.5)
    stats = RunStats(prompt_tokens=3_000_000, completion_tokens=1_000_000)
    stats.batch_prompt_tokens, stats.batch_completion_tokens = 2_000_000, 1_000_000
    assert estimated_cost(stats, settings) == 1.0 + (2.0 + 2.0) * 0.5
    assert estimated_cost(stats, Settings()) is None


def test_the_job_file_chooses_the_backend(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        'backend = "batch"\nbatch_fallback = "online"\n[limits]\nwait = 600\nbatch_max_lines = 5000\n'
        "[pricing]\nbatch_discount = 0.4\n"
    )
    settings = Settings(**load_job_file(job))
    assert (settings.backend, settings.batch_fallback, settings.wait) == ("batch", "online", 600)
    assert (settings.batch_max_lines, settings.batch_discount) == (5000, 0.4)


def test_the_shipped_batch_job_file_loads() -> None:
    from worker.settings import load_settings

    example = Path(__file__).parents[2] / "jobs" / "batch-nightly.toml"
    settings = load_settings({}, {}, job_file=str(example))
    assert (settings.backend, settings.batch_discount, settings.wait) == ("batch", 0.5, 0)
