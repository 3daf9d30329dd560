"""Input names that cannot become result paths, and paths that would leave their root."""

import asyncio
import os
from pathlib import Path

import pytest

from worker.errors import NameCollision, UnsafeName
from worker.storage import SourceFile
from worker.storage.local import LocalSink, LocalSource
from worker.storage.names import inside, name_problem, shown


@pytest.mark.parametrize(
    "path",
    ["a.txt", "dir/sub/b.jsonl", "é/日本.md", "with space.txt", "..hidden.txt", "a..b.txt", ".env.txt"],
)
def test_ordinary_names_are_fine(path: str) -> None:
    assert name_problem(path) is None


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("", "empty"),
        ("/tmp/x/probe.txt", "empty segment"),
        ("a//b.txt", "empty segment"),
        ("a/", "empty segment"),
        ("../escape.txt", "'..'"),
        ("a/../../b.txt", "'..'"),
        ("./a.txt", "'.'"),
        ("a\\..\\b.txt", "backslash"),
        ("nul\x00.txt", "control"),
        ("line\nbreak.txt", "control"),
        ("del\x7f.txt", "control"),
        ("c1\x85.txt", "control"),
        (os.fsdecode(b"latin-\xe9.txt"), "UTF-8"),
    ],
)
def test_hostile_names_are_refused_with_the_reason(path: str, words: str) -> None:
    problem = name_problem(path)
    assert problem is not None
    assert words in problem


def test_shown_escapes_what_would_break_a_log_line() -> None:
    assert shown("a\nb\x00.txt") == "a\\x0ab\\x00.txt"
    assert shown(os.fsdecode(b"latin-\xe9.txt")) == "latin-\\xe9.txt"
    assert shown("é.txt") == "é.txt"
    assert shown("\ud800.txt") == "\\ud800.txt"


def test_inside_keeps_paths_in_their_root(tmp_path: Path) -> None:
    root = tmp_path / "sink"
    (root / "real").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "link").symlink_to(outside)

    assert inside(root, "real/a.txt.results.jsonl") == root / "real" / "a.txt.results.jsonl"
    assert inside(root, "new/dir/a.txt") == root / "new" / "dir" / "a.txt"
    for unsafe in ["/tmp/x.txt", "../x.txt", "a/../../x.txt", "link/a.txt.results.jsonl"]:
        with pytest.raises(UnsafeName):
            inside(root, unsafe)


def test_a_local_sink_refuses_to_claim_outside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "sink"
    outside = tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "link").symlink_to(outside)
    sink = LocalSink(root)
    for unsafe in [f"{outside}/x.txt.results.jsonl", "../x.txt.results.jsonl", "link/x.txt.results.jsonl"]:
        with pytest.raises(UnsafeName):
            asyncio.run(sink.claim(unsafe, "1-1"))
    assert list(outside.iterdir()) == []
    assert sorted(tmp_path.iterdir()) == [outside, root]


def test_a_local_sink_never_claims_a_result_path_it_did_not_create(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path)
    (tmp_path / "a.txt.results.jsonl").write_bytes(b"user's file, torn last line")
    (tmp_path / "d.txt.results.jsonl").mkdir()
    (tmp_path / "file").write_bytes(b"user's file where a folder would go")
    for taken in ["a.txt.results.jsonl", "d.txt.results.jsonl", "file/x.txt.results.jsonl"]:
        assert asyncio.run(sink.collides(taken))
        with pytest.raises(NameCollision):
            asyncio.run(sink.claim(taken, "1-1"))
    assert (tmp_path / "a.txt.results.jsonl").read_bytes() == b"user's file, torn last line"
    assert not (tmp_path / "_state").exists()

    assert not asyncio.run(sink.collides("new.txt.results.jsonl"))
    unit = asyncio.run(sink.claim("new.txt.results.jsonl", "1-1"))
    assert unit is not None
    asyncio.run(unit.release())
    assert not asyncio.run(sink.collides("new.txt.results.jsonl"))  # now the worker's own


def test_a_local_source_lists_links_and_special_files_as_skipped_and_versions_regular_files(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.txt").write_bytes(b"four")
    (tmp_path / "link.txt").symlink_to(tmp_path / "a.txt")
    os.mkfifo(tmp_path / "pipe.txt")

    async def listing() -> list[SourceFile]:
        return [file async for file in LocalSource(tmp_path).list_files()]

    regular, link, pipe = asyncio.run(listing())
    found = (tmp_path / "a.txt").stat()
    assert regular == SourceFile("a.txt", 4, f"4-{found.st_mtime_ns}")
    assert (link.path, link.skip) == ("link.txt", "symlink_skipped")
    assert (pipe.path, pipe.skip) == ("pipe.txt", "unsupported_file_type")
