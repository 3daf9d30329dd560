"""Issue 11: hostile names and changed inputs — nothing escapes the sink, nothing is silently skipped."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tests.e2e.helpers import Run, answer_text, new_container, run_worker, upload
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
