from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.storage.urls import BlobLocation, LocalLocation, overlap_filter, parse_location


def test_virtual_host_blob_url() -> None:
    loc = parse_location("https://acct.blob.core.windows.net/prompts/2026/11", what="--source")
    assert loc == BlobLocation(
        account_url="https://acct.blob.core.windows.net",
        account="acct",
        container="prompts",
        prefix="2026/11/",
    )


def test_path_style_blob_url_as_azurite_uses() -> None:
    loc = parse_location("https://127.0.0.1:10000/devstoreaccount1/results/", what="--sink")
    assert loc == BlobLocation(
        account_url="https://127.0.0.1:10000/devstoreaccount1",
        account="devstoreaccount1",
        container="results",
        prefix="",
    )


def test_local_paths() -> None:
    assert parse_location("./data/in", what="--source") == LocalLocation(path=Path("data/in"))
    assert parse_location("file:///tmp/x", what="--source") == LocalLocation(path=Path("/tmp/x"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://acct.blob.core.windows.net/c?sv=2020&sig=abc", "SAS"),
        ("https://acct.blob.core.windows.net/", "needs a container"),
        ("https://127.0.0.1:10000/devstoreaccount1", "account and a container"),
    ],
)
def test_bad_blob_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_location(url, what="--source")
    assert "sig=abc" not in str(caught.value)


def test_a_sink_inside_the_source_is_not_read_back(tmp_path: Path) -> None:
    source = LocalLocation(path=tmp_path)
    beside = overlap_filter(source, LocalLocation(path=tmp_path.parent / "elsewhere"))
    below = overlap_filter(source, LocalLocation(path=tmp_path / "out"))
    same = overlap_filter(source, LocalLocation(path=tmp_path))
    assert not beside("out/a.txt.results.jsonl")
    assert below("out/a.txt.results.jsonl") and below("out/b.txt") and not below("a.txt")
    assert same("a.txt.results.jsonl") and same("_runs/r.json") and not same("a.txt")


def test_a_blob_sink_inside_the_source_prefix_is_not_read_back() -> None:
    source = parse_location("https://acct.blob.core.windows.net/c/in", what="--source")
    below = overlap_filter(
        source, parse_location("https://acct.blob.core.windows.net/c/in/out", what="--sink")
    )
    other = overlap_filter(
        source, parse_location("https://acct.blob.core.windows.net/d/in/out", what="--sink")
    )
    assert below("out/x.txt.results.jsonl") and not below("x.txt")
    assert not other("out/x.txt.results.jsonl")
