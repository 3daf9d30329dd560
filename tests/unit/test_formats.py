import asyncio
import json
import tracemalloc
from collections.abc import AsyncIterator

import pytest

from worker import formats
from worker.formats import BatchFileParser, Duplicate, Rejected, Request
from worker.storage import MAX_LINE_BYTES, OverlongLine, split_lines


def line(**record: object) -> bytes:
    return json.dumps(record).encode()


def chat(text: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}]}


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("a.txt", "prompt"),
        ("dir/B.MD", "prompt"),
        ("x.json", "body"),
        ("y.jsonl", "batch"),
        ("z.csv", None),
        ("noext", None),
        ("dir.txt/file", None),
    ],
)
def test_input_kind_by_suffix(path: str, kind: str | None) -> None:
    assert formats.input_kind(path) == kind


def test_result_path_is_injective_for_lookalike_names() -> None:
    assert formats.result_path("a.txt") != formats.result_path("a.txt.results")
    assert formats.result_path("a/b.jsonl") == "a/b.jsonl.results.jsonl"


def test_prompt_file_becomes_one_user_message_with_system_prompt_and_parameters() -> None:
    parsed = formats.parse_prompt_file(
        "p/q.txt", "héllo".encode(), system_prompt="be brief", parameters={"temperature": 0}
    )
    assert parsed == Request(
        "p/q.txt",
        "/chat/completions",
        {
            "temperature": 0,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}],
        },
    )


@pytest.mark.parametrize(
    ("data", "code"),
    [(b"", "empty_input"), (b"  \n\t", "empty_input"), (b"\xff\xfe\xfa", "invalid_encoding")],
)
def test_bad_prompt_files_get_error_records(data: bytes, code: str) -> None:
    parsed = formats.parse_prompt_file("bad.txt", data, system_prompt=None, parameters={})
    assert isinstance(parsed, Rejected)
    assert (parsed.custom_id, parsed.code) == ("bad.txt", code)


def test_json_body_keeps_its_own_parameters_over_the_jobs() -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "temperature": 1}
    parsed = formats.parse_body_file(
        "b.json", json.dumps(body).encode(), parameters={"temperature": 0, "max_tokens": 5}
    )
    assert isinstance(parsed, Request)
    assert parsed.body["temperature"] == 1
    assert parsed.body["max_tokens"] == 5


@pytest.mark.parametrize(
    ("data", "code"),
    [(b"{", "invalid_json"), (b"[1]", "invalid_body"), (b'{"messages": []}', "invalid_body")],
)
def test_bad_json_bodies(data: bytes, code: str) -> None:
    parsed = formats.parse_body_file("b.json", data, parameters={})
    assert isinstance(parsed, Rejected)
    assert parsed.code == code


def second_pass(parser: BatchFileParser, lines: list[bytes]) -> list[object]:
    async def reread() -> AsyncIterator[bytes]:
        for raw in lines:
            yield raw

    async def resolve() -> list[object]:
        return [parsed async for parsed in parser.resolve_suspects(reread())]

    return asyncio.run(resolve())


def parse_file(parser: BatchFileParser, lines: list[bytes]) -> list[object]:
    """What the pipeline does: one pass, then (only when ids repeat) the second pass for the held lines."""
    outcomes: list[object] = [parser.parse_line(number, raw) for number, raw in enumerate(lines, 1)]
    if parser.has_suspects:
        outcomes.extend(second_pass(parser, lines))
    return outcomes


BATCH_LINES = [
    line(custom_id="a", method="POST", url="/v1/chat/completions", body=chat("hi")),
    b"   ",
    b"{not json",
    line(method="POST", url="/chat/completions", body=chat("x")),
    line(custom_id="a", method="POST", url="/chat/completions", body=chat("again")),
    line(custom_id="b", method="GET", url="/chat/completions", body=chat("x")),
    line(custom_id="c", method="POST", url="/v1/responses", body=chat("x")),
    line(custom_id="d", method="POST", url="/embeddings", body={"input": "text"}),
    b"\xff\xfe",
]


def test_batch_lines_good_bad_and_duplicate() -> None:
    parser = BatchFileParser("in/batch.jsonl", parameters={"max_tokens": 7})
    outcomes = parse_file(parser, BATCH_LINES)
    first = outcomes[0]
    assert isinstance(first, Request)
    assert (first.url, first.body["max_tokens"], first.line) == ("/chat/completions", 7, 1)
    assert outcomes[1] is None
    assert outcomes[2] == Rejected("in/batch.jsonl:3", "invalid_json", outcomes[2].message, 3)  # type: ignore[union-attr]
    assert isinstance(outcomes[3], Rejected)
    assert (outcomes[3].custom_id, outcomes[3].code) == ("in/batch.jsonl:4", "missing_custom_id")
    assert outcomes[4] is None  # held back: its id was seen; judged after the recheck pass
    assert [o.code for o in outcomes[5:7]] == ["unsupported_method", "unsupported_url"]  # type: ignore[union-attr]
    embeddings = outcomes[7]
    assert isinstance(embeddings, Request)
    assert embeddings.url == "/embeddings"
    assert "max_tokens" not in embeddings.body
    assert isinstance(outcomes[8], Rejected)
    assert outcomes[8].code == "invalid_encoding"
    assert outcomes[9:] == [Duplicate("a", 5)]
    assert parser.items == 7  # nine lines; the blank one and the duplicate are not items


class EverythingLooksSeen:
    """A seen-id table where every fingerprint collides: each line after the first is a suspect."""

    def __init__(self) -> None:
        self.first = True

    def add(self, item: str) -> bool:
        first, self.first = self.first, False
        return first


def test_fingerprint_collisions_are_confirmed_against_the_file_never_guessed() -> None:
    ids = ["a", "b", "a", "c", "b", "a", "d"]
    lines = [line(custom_id=i, url="/chat/completions", body=chat(f"line {n}")) for n, i in enumerate(ids, 1)]
    parser = BatchFileParser("f.jsonl", parameters={}, seen=EverythingLooksSeen())
    outcomes = [o for o in parse_file(parser, lines) if o is not None]
    requests = [(o.custom_id, o.line) for o in outcomes if isinstance(o, Request)]
    duplicates = [(o.custom_id, o.line) for o in outcomes if isinstance(o, Duplicate)]
    assert sorted(requests) == [("a", 1), ("b", 2), ("c", 4), ("d", 7)]  # the first occurrence wins
    assert sorted(duplicates) == [("a", 3), ("a", 6), ("b", 5)]
    assert parser.items == 4
    assert not parser.has_suspects


def test_a_file_changed_between_the_two_passes_is_left_for_the_next_run() -> None:
    parser = BatchFileParser("f.jsonl", parameters={}, seen=EverythingLooksSeen())
    first = [line(custom_id=i, url="/chat/completions", body=chat("x")) for i in ("a", "b", "a")]
    assert [parser.parse_line(n, raw) is None for n, raw in enumerate(first, 1)] == [False, True, True]
    with pytest.raises(formats.InputChanged, match=r"f\.jsonl changed while it was being read"):
        second_pass(parser, first[:1])  # the file is shorter now


def test_a_file_without_repeats_needs_no_second_pass() -> None:
    parser = BatchFileParser("f.jsonl", parameters={})
    lines = [line(custom_id=f"item-{n}", url="/chat/completions", body=chat("x")) for n in range(20_000)]
    assert all(isinstance(parser.parse_line(n, raw), Request) for n, raw in enumerate(lines, 1))
    assert not parser.has_suspects


def test_result_line_has_the_batch_output_shape() -> None:
    record = json.loads(formats.result_line("x", error=formats.error_record("content_filter", "filtered")))
    assert set(record) == {"id", "custom_id", "response", "error"}
    assert record["id"].startswith("batch_req_")
    assert record["error"] == {"code": "content_filter", "message": "filtered"}
    assert record["response"] is None


def test_custom_ids_in_ignores_a_torn_last_line() -> None:
    data = (
        formats.result_line("a", response={})
        + formats.result_line("b", response={})
        + b'{"id":"x","custom_id":"c"'
    )
    ids, complete = formats.custom_ids_in(data)
    assert ("a" in ids, "b" in ids, "c" in ids, len(ids)) == (True, True, False, 2)
    assert data[:complete].endswith(b"\n")
    assert complete == len(data) - len(b'{"id":"x","custom_id":"c"')


def test_result_scanner_joins_lines_split_across_chunks() -> None:
    data = b"".join(formats.result_line(f"id-{i}", response={}) for i in range(50)) + b'{"custom_id": "torn'
    scanner = formats.ResultScanner()
    for start in range(0, len(data), 7):
        scanner.feed(data[start : start + 7])
    assert len(scanner.ids) == 50
    assert all(f"id-{i}" in scanner.ids for i in range(50))
    assert "torn" not in scanner.ids
    assert scanner.complete == len(data) - len(b'{"custom_id": "torn')


# ---- over-long lines --------------------------------------------------------------------------------


def lines_of(chunks: list[bytes], max_line: int) -> list[bytes]:
    async def feed() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async def collect() -> list[bytes]:
        return [raw async for raw in split_lines(feed(), max_line)]

    return asyncio.run(collect())


def test_split_lines_cuts_anywhere_and_strips_line_endings() -> None:
    data = b"one\r\ntwo\n\nthree\r\nfour"
    for size in (1, 2, 3, 5, len(data)):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        got = lines_of(chunks, 100)
        assert got == [b"one", b"two", b"", b"three", b"four"]
        assert not any(isinstance(raw, OverlongLine) for raw in got)


@pytest.mark.parametrize("size", [1, 3, 7, 10, 11, 64])
def test_a_line_over_the_cap_becomes_one_marker_in_its_place(size: int) -> None:
    data = b"short\n" + b"x" * 25 + b"\nexactly-10\n" + b"y" * 11 + b"\r\nend\n" + b"z" * 40
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    got = lines_of(chunks, 10)
    assert got == [b"short", b"", b"exactly-10", b"", b"end", b""]
    assert [raw.length for raw in got if isinstance(raw, OverlongLine)] == [25, 12, 40]


def test_an_over_long_line_is_never_held_whole() -> None:
    async def feed() -> AsyncIterator[bytes]:
        yield b"first\n"
        for _ in range(2_000):
            yield b"x" * 1_000  # a 2 MB line
        yield b"\nlast"

    async def collect() -> list[bytes]:
        return [raw async for raw in split_lines(feed(), 10_000)]

    tracemalloc.start()
    try:
        got = asyncio.run(collect())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got == [b"first", b"", b"last"]
    assert isinstance(got[1], OverlongLine)
    assert got[1].length == 2_000_000
    assert peak < 1_000_000  # the line was counted, not kept


def test_an_over_long_line_is_rejected_and_keeps_its_line_number_on_the_second_pass() -> None:
    lines = [
        line(custom_id="a", url="/chat/completions", body=chat("one")),
        OverlongLine(MAX_LINE_BYTES + 1),
        line(custom_id="b", url="/chat/completions", body=chat("two")),
        line(custom_id="a", url="/chat/completions", body=chat("again")),
    ]
    parser = BatchFileParser("big.jsonl", parameters={}, seen=EverythingLooksSeen())
    outcomes = [o for o in parse_file(parser, lines) if o is not None]
    too_large = [o for o in outcomes if isinstance(o, Rejected)]
    assert [(o.custom_id, o.code, o.line) for o in too_large] == [("big.jsonl:2", "line_too_large", 2)]
    assert (
        too_large[0].message == "big.jsonl:2 is 16,777,217 bytes; a line may hold 16,777,216 (16 MiB) at most"
    )
    assert sorted((o.custom_id, o.line) for o in outcomes if isinstance(o, Request)) == [("a", 1), ("b", 3)]
    assert [o for o in outcomes if isinstance(o, Duplicate)] == [Duplicate("a", 4)]
    assert parser.items == 3
