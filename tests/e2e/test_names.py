"""Hostile names and changed inputs — nothing escapes the sink, nothing is silently skipped."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.helpers import (
    Run,
    answer_text,
    batch_line,
    manifest,
    new_container,
    results,
    run_worker,
    upload,
)
from tests.stack import LocalStack


def local_records(sink: Path) -> list[dict[str, Any]]:
    """Every result line under a local sink, excluding the worker's own `_` folders."""
    return [
        json.loads(line)
        for path in sorted(sink.rglob("*.results.jsonl"))
        if not path.relative_to(sink).as_posix().startswith("_")
        for line in path.read_bytes().splitlines()
    ]


def local_manifest(sink: Path, run_id: str) -> dict[str, Any]:
    return dict(json.loads((sink / "_runs" / f"{run_id}.json").read_text(encoding="utf-8")))


def skipped_events(run: Run) -> dict[str, str]:
    """file → problem code of every `input.skipped` event."""
    return {event["file"]: event["code"] for event in run.events if event["event"] == "input.skipped"}


def put_blob_raw(stack: LocalStack, container: str, quoted_name: str, data: bytes) -> None:
    """Upload under a name the SDK cannot send as such (its HTTP stack collapses `.`/`..` segments):
    Put Blob with the segments percent-encoded, as other tools may do."""
    token = stack.storage_credential().get_token("https://storage.azure.com/.default").token
    request = urllib.request.Request(
        f"{stack.account_url}/{container}/{quoted_name}",
        data=data,
        method="PUT",
        headers={
            "Authorization": f"Bearer {token}",
            "x-ms-blob-type": "BlockBlob",
            "x-ms-version": "2025-01-05",
        },
    )
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=stack.ssl_context())
    )
    with opener.open(request, timeout=30) as response:
        assert response.status == 201


def test_blob_names_that_would_leave_a_local_sink_are_reported_and_never_written(
    stack: LocalStack, tmp_path: Path
) -> None:
    source = new_container(stack, "src")
    escape = f"names-{uuid.uuid4().hex[:10]}"
    absolute = Path("/tmp") / escape
    upload(stack, source, {f"prompts//tmp/{escape}/probe.txt": b"absolute", "prompts/ok.txt": b"fine"})
    put_blob_raw(stack, source, f"prompts/a/%2E%2E/%2E%2E/{escape}.txt", b"dot dot")
    sink = tmp_path / "deep" / "sink"

    try:
        run = run_worker(
            stack, "--source", stack.blob_url(source, "prompts/"), "--sink", str(sink), "--run-id", "names"
        )
        assert not absolute.exists()
    finally:
        shutil.rmtree(absolute, ignore_errors=True)

    assert run.code == 0, run.stdout[-3000:]
    assert not (tmp_path / f"{escape}.txt.results.jsonl").exists()
    assert not (tmp_path / "deep" / f"{escape}.txt.results.jsonl").exists()
    assert skipped_events(run) == {
        f"/tmp/{escape}/probe.txt": "invalid_name",
        f"a/../../{escape}.txt": "invalid_name",
    }
    problems = local_manifest(sink, "names")["input_problems"]
    assert {"file": f"/tmp/{escape}/probe.txt", "code": "invalid_name"} in problems
    assert [record["custom_id"] for record in local_records(sink)] == ["ok.txt"]
    assert stack.openai.stats()["requests"] == 1
    assert (run.summary["total"], run.summary["succeeded"]) == (1, 1)


def test_local_names_with_backslashes_control_characters_or_bad_utf8_are_reported(
    stack: LocalStack, tmp_path: Path
) -> None:
    source, sink = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    (source / "ok.txt").write_text("fine", encoding="utf-8")
    (source / "back\\..\\slash.txt").write_text("backslash", encoding="utf-8")
    (source / "line\nbreak.txt").write_text("newline", encoding="utf-8")
    with open(os.path.join(os.fsencode(source), b"latin-\xe9.txt"), "wb") as file:
        file.write(b"not utf-8 name")

    run = run_worker(stack, "--source", str(source), "--sink", str(sink))

    assert run.code == 0, run.stdout[-3000:]
    assert skipped_events(run) == {
        "back\\..\\slash.txt": "invalid_name",
        "line\\x0abreak.txt": "invalid_name",
        "latin-\\xe9.txt": "invalid_name",
    }
    assert [record["custom_id"] for record in local_records(sink)] == ["ok.txt"]
    assert sorted(p.name for p in sink.iterdir()) == ["_runs", "_state", "ok.txt.results.jsonl"]
    assert stack.openai.stats()["requests"] == 1


def test_symlinks_in_a_local_source_are_reported_and_their_targets_never_sent(
    stack: LocalStack, tmp_path: Path
) -> None:
    secret = f"TOP SECRET {uuid.uuid4().hex}"
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "secret.txt").write_text(secret, encoding="utf-8")
    source, sink = tmp_path / "in", tmp_path / "out"
    (source / "sub").mkdir(parents=True)
    (source / "real.txt").write_text("real prompt", encoding="utf-8")
    (source / "outside.txt").symlink_to(outside / "secret.txt")
    (source / "sub" / "alias.txt").symlink_to(source / "real.txt")
    (source / "linked-dir").symlink_to(outside)

    run = run_worker(stack, "--source", str(source), "--sink", str(sink))

    assert run.code == 0, run.stdout[-3000:]
    assert skipped_events(run) == {
        "outside.txt": "symlink_skipped",
        "sub/alias.txt": "symlink_skipped",
        "linked-dir": "symlink_skipped",
    }
    (record,) = local_records(sink)
    assert (record["custom_id"], answer_text(record)) == ("real.txt", "ECHO: real prompt")
    stats = stack.openai.stats()
    assert stats["requests"] == 1
    assert stats["prompt_tokens"] < len(secret) // 4  # only "real prompt" was ever sent
    assert secret not in run.stdout


def jsonl(ids: list[str]) -> bytes:
    return b"".join(batch_line(custom_id, f"say {custom_id}") + b"\n" for custom_id in ids)


def assert_each_once(records: list[dict[str, Any]], expected: list[str]) -> None:
    assert sorted(record["custom_id"] for record in records) == sorted(expected)


@pytest.mark.parametrize("where", ["blob", "local"])
def test_lines_appended_to_a_finished_jsonl_are_processed_on_the_next_run(
    stack: LocalStack, tmp_path: Path, where: str
) -> None:
    first_ids = [f"line-{n}" for n in range(5)]
    more_ids = [f"more-{n}" for n in range(3)]
    if where == "blob":
        source, sink = new_container(stack, "src"), new_container(stack, "out")
        args = ["--source", stack.blob_url(source), "--sink", stack.blob_url(sink)]
        upload(stack, source, {"batch.jsonl": jsonl(first_ids)})
    else:
        source_dir, sink_dir = tmp_path / "in", tmp_path / "out"
        source_dir.mkdir()
        args = ["--source", str(source_dir), "--sink", str(sink_dir)]
        (source_dir / "batch.jsonl").write_bytes(jsonl(first_ids))

    def records() -> list[dict[str, Any]]:
        return results(stack, sink) if where == "blob" else local_records(sink_dir)

    first = run_worker(stack, *args)
    assert (first.code, first.summary["succeeded"], first.summary["changed_inputs"]) == (0, 5, 0)
    if where == "blob":
        upload(stack, source, {"batch.jsonl": jsonl(first_ids + more_ids)})
    else:
        with (source_dir / "batch.jsonl").open("ab") as file:
            file.write(jsonl(more_ids))

    second = run_worker(stack, *args)

    assert second.code == 0, second.stdout[-3000:]
    assert stack.openai.stats()["requests"] == 5 + 3
    assert_each_once(records(), first_ids + more_ids)
    summary = second.summary
    assert (summary["changed_inputs"], summary["succeeded"], summary["skipped"], summary["total"]) == (
        1,
        3,
        5,
        8,
    )
    assert any(event["event"] == "input.changed" for event in second.events)

    third = run_worker(stack, *args)
    assert (third.code, third.summary["changed_inputs"], third.summary["skipped"]) == (0, 0, 8)
    assert stack.openai.stats()["requests"] == 8


def test_a_reuploaded_prompt_keeps_its_record_and_is_counted_changed(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    args = ["--source", stack.blob_url(source), "--sink", stack.blob_url(sink), "--run-id"]
    upload(stack, source, {"note.txt": b"first draft", "other.txt": b"untouched"})
    assert run_worker(stack, *args, "first").code == 0
    upload(stack, source, {"note.txt": b"corrected draft"})

    rerun = run_worker(stack, *args, "second")

    assert rerun.code == 0, rerun.stdout[-3000:]
    assert stack.openai.stats()["requests"] == 2  # the record for note.txt stays: exactly once
    by_id = {record["custom_id"]: record for record in results(stack, sink)}
    assert len(results(stack, sink)) == 2
    assert answer_text(by_id["note.txt"]) == "ECHO: first draft"
    assert (rerun.summary["changed_inputs"], rerun.summary["skipped"]) == (1, 2)
    assert manifest(stack, sink, "", "second")["counts"]["changed_inputs"] == 1
    again = run_worker(stack, *args, "third")
    assert (again.summary["changed_inputs"], again.summary["skipped"]) == (0, 2)


def test_a_marker_from_an_older_worker_without_a_version_counts_as_unchanged(
    stack: LocalStack, tmp_path: Path
) -> None:
    source, sink = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    (source / "a.txt").write_text("old", encoding="utf-8")
    assert run_worker(stack, "--source", str(source), "--sink", str(sink)).code == 0
    marker = sink / "_state" / "a.txt.results.jsonl.done"
    assert json.loads(marker.read_text(encoding="utf-8"))["version"]
    marker.write_text('{"items": 1}', encoding="utf-8")  # as written before versions were recorded
    (source / "a.txt").write_text("changed since", encoding="utf-8")

    rerun = run_worker(stack, "--source", str(source), "--sink", str(sink))

    assert (rerun.code, rerun.summary["changed_inputs"], rerun.summary["skipped"]) == (0, 0, 1)
    assert stack.openai.stats()["requests"] == 1


def test_a_users_file_at_a_local_result_path_is_never_touched(stack: LocalStack, tmp_path: Path) -> None:
    folder = tmp_path / "work"  # source and sink at once
    folder.mkdir()
    (folder / "a.txt").write_text("prompt a", encoding="utf-8")
    (folder / "b.txt").write_text("prompt b", encoding="utf-8")
    users = b'{"custom_id": "mine", "note": "my own results, not the worker\'s"}\n'
    (folder / "a.txt.results.jsonl").write_bytes(users)
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_bytes(b"keep me\n")
    (folder / "c.txt").write_text("prompt c", encoding="utf-8")
    (folder / "c.txt.results.jsonl").symlink_to(elsewhere)
    args = ["--source", str(folder), "--sink", str(folder)]

    first = run_worker(stack, *args)
    second = run_worker(stack, *args)

    assert (first.code, second.code) == (0, 0), first.stdout[-3000:]
    expected = {"a.txt": "name_collision", "c.txt": "name_collision"}  # `*.results.jsonl` are not inputs here
    assert skipped_events(first) == skipped_events(second) == expected
    assert (folder / "a.txt.results.jsonl").read_bytes() == users
    assert elsewhere.read_bytes() == b"keep me\n"
    assert not (folder / "_state" / "a.txt.results.jsonl.lock").exists()
    (record,) = [json.loads(line) for line in (folder / "b.txt.results.jsonl").read_bytes().splitlines()]
    assert answer_text(record) == "ECHO: prompt b"
    assert stack.openai.stats()["requests"] == 1
    assert (first.summary["succeeded"], second.summary["skipped"]) == (1, 1)


def test_a_users_blob_at_a_result_path_is_never_leased_or_appended_to(stack: LocalStack) -> None:
    container = new_container(stack, "both")  # source and sink at once
    users_block = b'{"custom_id": "mine"}\n'
    upload(stack, container, {"a.txt": b"prompt a", "b.txt": b"prompt b", "c.txt": b"prompt c"})
    upload(stack, container, {"a.txt.results.jsonl": users_block})
    client = stack.blob_service().get_container_client(container)
    users_append = client.get_blob_client("c.txt.results.jsonl")
    users_append.create_append_blob()
    users_append.append_block(b"user's own append blob\n")
    url = stack.blob_url(container)

    first = run_worker(stack, "--source", url, "--sink", url, "--run-id", "first")
    second = run_worker(stack, "--source", url, "--sink", url, "--run-id", "second")

    assert (first.code, second.code) == (0, 0), first.stdout[-3000:]
    assert (
        skipped_events(first)
        == skipped_events(second)
        == {"a.txt": "name_collision", "c.txt": "name_collision"}
    )
    assert client.download_blob("a.txt.results.jsonl").readall() == users_block
    assert users_append.download_blob().readall() == b"user's own append blob\n"
    for name in ("a.txt.results.jsonl", "c.txt.results.jsonl"):
        properties = client.get_blob_client(name).get_blob_properties()
        assert properties.lease.state == "available"
        assert not properties.metadata
    (record,) = [
        json.loads(line) for line in client.download_blob("b.txt.results.jsonl").readall().splitlines()
    ]
    assert answer_text(record) == "ECHO: prompt b"
    assert stack.openai.stats()["requests"] == 1
    problems = manifest(stack, container, "", "first")["input_problems"]
    assert {"file": "a.txt", "code": "name_collision"} in problems


def test_a_result_line_over_4_mib_is_written_once_and_the_rerun_makes_no_calls(stack: LocalStack) -> None:
    source, sink = new_container(stack, "src"), new_container(stack, "out")
    stack.openai.configure(embedding_dimensions=8192)
    embed = {"custom_id": "big", "method": "POST", "url": "/embeddings"}
    embed["body"] = {
        "input": [f"passage {n}" for n in range(40)],
        "model": "text-embedding-3-small",
    }  # ~6.5 MB
    upload(
        stack, source, {"embed.jsonl": json.dumps(embed).encode() + b"\n" + batch_line("small", "hi") + b"\n"}
    )
    args = ["--source", stack.blob_url(source), "--sink", stack.blob_url(sink)]

    run = run_worker(stack, *args)

    assert run.code == 0, run.stdout[-3000:]
    client = stack.blob_service().get_container_client(sink)
    lines = client.download_blob("embed.jsonl.results.jsonl").readall().splitlines()
    by_id = {json.loads(line)["custom_id"]: line for line in lines}
    assert sorted(by_id) == ["big", "small"]
    assert len(by_id["big"]) > 4 * 1024 * 1024
    big = json.loads(by_id["big"])
    assert big["error"] is None
    assert len(big["response"]["body"]["data"]) == 40
    assert (run.summary["succeeded"], run.summary["failed"]) == (2, 0)

    rerun = run_worker(stack, *args)
    assert (rerun.code, rerun.summary["skipped"]) == (0, 2)
    assert stack.openai.stats()["requests"] == 2
