import asyncio
import json
import os
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


def scanned(data: bytes) -> formats.ResultScanner:
    scanner = formats.ResultScanner()
    scanner.feed(data)
    return scanner


def test_the_result_scanner_ignores_a_torn_last_line() -> None:
    data = (
        formats.result_line("a", response={})
        + formats.result_line("b", response={})
        + b'{"id":"x","custom_id":"c"'
    )
    scanner = scanned(data)
    ids, complete = scanner.ids, scanner.complete
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


# ---- hostile input: bodies the service or the SDK would refuse are rejected when read -------------


def user(content: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": content}]}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({**chat("x"), "stream": True}, "body.stream is true, but the worker collects whole answers: remove"),
        ({**chat("x"), "stream": "yes"}, "body.stream must be false or absent, not 'yes'"),
        (
            user([{"type": "text", "text": "a"}, {"type": "text", "text": None}]),
            "body.messages[0].content[1].text must be a string, not null",
        ),
        (
            user([{"type": "text", "text": "a"}, "b"]),
            "body.messages[0].content[1] must be an object, not a string",
        ),
        (user(7), "body.messages[0].content must be a string or a list of parts, not a number"),
        (user(None), "body.messages[0].content must be a string or a list of parts, not null"),
        ({"messages": [{"content": "x"}]}, "body.messages[0].role must be a string"),
        ({"messages": ["hello"]}, "body.messages[0] must be an object, not a string"),
        ({"messages": "a string"}, "body.messages must be a non-empty list of messages"),
        ({"messages": []}, "body.messages must be a non-empty list of messages"),
        ({}, "body.messages must be a non-empty list of messages"),
        (
            {**chat("x"), "max_tokens": float("nan")},
            "body.max_tokens must be a whole number from 1 to 1000000, not nan",
        ),
        (
            {**chat("x"), "max_tokens": 10**30},
            "body.max_tokens must be a whole number from 1 to 1000000, not 1000000000000000000000000000000",
        ),
        (
            {**chat("x"), "max_tokens": 1e30},
            "body.max_tokens must be a whole number from 1 to 1000000, not 1e+30",
        ),
        (
            {**chat("x"), "max_completion_tokens": 0},
            "body.max_completion_tokens must be a whole number from 1",
        ),
        (
            {**chat("x"), "max_tokens": True},
            "body.max_tokens must be a whole number from 1 to 1000000, not True",
        ),
        (
            {**chat("x"), "temperature": float("inf")},
            "body.temperature must be a number from 0 to 2, not inf",
        ),
        ({**chat("x"), "top_p": "1"}, "body.top_p must be a number from 0 to 1, not '1'"),
        ({**chat("x"), "n": 1000}, "body.n must be a whole number from 1 to 128, not 1000"),
        (
            {**chat("x"), "model": ".."},
            "body.model must be a deployment name (2-64 letters, digits, -, _, .), not '..'",
        ),
        ({**chat("x"), "model": "a/b"}, "body.model must be a deployment name"),
        ({**chat("x"), "model": "gpt 4o"}, "body.model must be a deployment name"),
        ({**chat("x"), "model": "x?y"}, "body.model must be a deployment name"),
        ({**chat("x"), "model": "x" * 65}, "body.model must be a deployment name"),
        (
            {**chat("x"), "model": 4},
            "body.model must be a deployment name (2-64 letters, digits, -, _, .), not 4",
        ),
        (
            {**chat("x"), "logit_bias": {"50256": float("-inf")}},
            "body.logit_bias.50256 must be a finite number, not -inf",
        ),
        (user("x\ud800"), "body.messages[0].content is not Unicode text (it holds a lone surrogate)"),
        (
            {**chat("x"), "metadata": {"k\udcff": "v"}},
            "body.metadata has a key that is not Unicode text: 'k\\udcff'",
        ),
    ],
)
def test_chat_bodies_that_cannot_be_sent_name_the_field(body: dict[str, object], problem: str) -> None:
    found = formats.body_problem(formats.CHAT_URL, body)
    assert found is not None
    assert found.startswith(problem), found


@pytest.mark.parametrize(
    "body",
    [
        chat("plain"),
        user([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]),
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": []},
            ]
        },
        {"messages": [{"role": "assistant", "tool_calls": []}, {"role": "tool", "content": "42"}]},
        {**chat("x"), "model": "gpt-4o-mini", "stream": False, "max_tokens": 1_000_000, "temperature": 0},
        {**chat("x"), "model": "a.b_c-1", "max_tokens": None, "top_p": 0.5, "seed": -3, "n": 2},
        {**chat("x"), "model": "", "logit_bias": {"1": -100}},
        {**chat("é ü 🙂 \U0001f600"), "metadata": {"nested": [[[1.5]]]}},
    ],
)
def test_sendable_chat_bodies_pass(body: dict[str, object]) -> None:
    assert formats.body_problem(formats.CHAT_URL, body) is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"input": 123}, "body.input must be a string or a non-empty list, not a number"),
        ({}, "body.input must be a string or a non-empty list, not null"),
        ({"input": []}, "body.input must be a string or a non-empty list, not a list"),
        ({"input": ["a", 1]}, "body.input[1] must be a string, as body.input[0] is"),
        ({"input": [1, "a"]}, "body.input[1] must be a token id, as body.input[0] is"),
        ({"input": [[1, 2], []]}, "body.input[1] must be a non-empty list of token ids, as body.input[0] is"),
        ({"input": [None]}, "body.input[0] must be a string, a token id or a list of token ids"),
        ({"input": [-1]}, "body.input[0] must be a string, a token id or a list of token ids"),
        ({"input": "x", "dimensions": 0}, "body.dimensions must be a whole number from 1 to 65536, not 0"),
        ({"input": "x", "model": "."}, "body.model must be a deployment name"),
    ],
)
def test_embeddings_bodies_that_cannot_be_sent_name_the_field(body: dict[str, object], problem: str) -> None:
    found = formats.body_problem(formats.EMBEDDINGS_URL, body)
    assert found is not None
    assert found.startswith(problem), found


@pytest.mark.parametrize("value", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_sendable_embeddings_inputs_pass(value: object) -> None:
    assert formats.body_problem(formats.EMBEDDINGS_URL, {"input": value}) is None


def test_bodies_nested_deeper_than_the_sdk_can_serialise_are_rejected() -> None:
    deep: object = "leaf"
    for _ in range(formats.MAX_NESTING):
        deep = [deep]
    problem = formats.body_problem(formats.CHAT_URL, {**chat("x"), "metadata": deep})
    assert problem is not None
    assert problem.startswith("body.metadata")
    assert problem.endswith(f"nests deeper than {formats.MAX_NESTING} levels")


HOSTILE_LINES = [
    line(custom_id="x\ud800", url="/chat/completions", body=chat("lone surrogate id")),
    line(custom_id="stream", url="/chat/completions", body={**chat("x"), "stream": True}),
    line(custom_id="nan", url="/chat/completions", body={**chat("x"), "max_tokens": float("nan")}),
    line(custom_id="emb", url="/embeddings", body={"input": 123}),
    line(custom_id="good", url="/chat/completions", body=chat("fine")),
    b"[" * 100_000,
    b'{"custom_id": "deep", "url": "/chat/completions", "body": ' + b"[" * 100_000 + b"}",
    b'{"custom_id": "long-number", "url": "/chat/completions", "body": {"seed": ' + b"9" * 5_000 + b"}}",
]


def test_hostile_lines_are_rejected_with_their_identity_never_raised() -> None:
    parser = BatchFileParser("h.jsonl", parameters={"temperature": 0})
    outcomes = parse_file(parser, HOSTILE_LINES)
    assert isinstance(outcomes[0], Rejected)
    assert (outcomes[0].custom_id, outcomes[0].code, outcomes[0].line) == (
        "h.jsonl:1",
        "invalid_custom_id",
        1,
    )
    assert "\\ud800" in outcomes[0].message  # escaped: the message itself can be written and logged
    assert [(o.custom_id, o.code) for o in outcomes[1:4]] == [  # type: ignore[union-attr]
        ("stream", "invalid_body"),
        ("nan", "invalid_body"),
        ("emb", "invalid_body"),
    ]
    assert outcomes[1].message.startswith("h.jsonl:2: body.stream is true")  # type: ignore[union-attr]
    assert outcomes[3].message == "h.jsonl:4: body.input must be a string or a non-empty list, not a number"  # type: ignore[union-attr]
    assert isinstance(outcomes[4], Request)
    assert [(o.custom_id, o.code) for o in outcomes[5:]] == [  # type: ignore[union-attr]
        ("h.jsonl:6", "invalid_json"),
        ("h.jsonl:7", "invalid_json"),
        ("h.jsonl:8", "invalid_json"),
    ]
    assert outcomes[7].message == (  # type: ignore[union-attr]
        "h.jsonl:8 cannot be read as JSON: Exceeds the limit (4300 digits) for integer string conversion"
    )
    assert parser.items == 8


def test_job_parameters_merged_into_a_line_are_validated_too() -> None:
    parser = BatchFileParser("p.jsonl", parameters={"max_tokens": 10**30})
    parsed = parser.parse_line(1, line(custom_id="a", url="/chat/completions", body=chat("x")))
    assert isinstance(parsed, Rejected)
    assert parsed.code == "invalid_body"
    assert "body.max_tokens must be a whole number" in parsed.message
    own = parser.parse_line(
        2, line(custom_id="b", url="/chat/completions", body={**chat("x"), "max_tokens": 5})
    )
    assert isinstance(own, Request)  # the line's own value wins over the job's


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": NaN}',
            "b.json: body.max_tokens must be",
        ),
        (
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": null}]}]}',
            "b.json: body.messages[0].content[0].text",
        ),
        (b'{"messages": "a string"}', "b.json: body.messages must be a non-empty list"),
        (b'{"messages": [{"role": "user", "content": "x"}], "stream": true}', "b.json: body.stream is true"),
        (b"[" * 100_000, "b.json nests too deeply"),
        (b"[" + b"1" * 5_000 + b"]", "b.json cannot be read as JSON: Exceeds the limit"),
    ],
)
def test_json_body_files_are_validated_like_lines(data: bytes, problem: str) -> None:
    parsed = formats.parse_body_file("b.json", data, parameters={})
    assert isinstance(parsed, Rejected)
    assert parsed.code == ("invalid_json" if data.startswith(b"[") else "invalid_body")
    assert parsed.message.startswith(problem), parsed.message


def test_a_prompt_file_with_parameters_no_request_could_send_is_rejected() -> None:
    parsed = formats.parse_prompt_file("p.txt", b"hello", system_prompt="s\udcff", parameters={})
    assert isinstance(parsed, Rejected)
    assert parsed.message == "p.txt: body.messages[0].content is not Unicode text (it holds a lone surrogate)"
    parsed = formats.parse_prompt_file("p.txt", b"hello", system_prompt=None, parameters={"stream": True})
    assert isinstance(parsed, Rejected)
    assert parsed.code == "invalid_body"


def test_a_record_for_a_name_that_is_not_utf8_is_still_written_and_read_back() -> None:
    name = os.fsdecode(b"caf\xe9.txt")  # what os.scandir gives for a Latin-1 file name
    data = formats.result_line(name, error=formats.error_record("invalid_name", f"{name} is not UTF-8"))
    record = json.loads(data)
    assert data.isascii()
    assert record["custom_id"] == name
    assert name in scanned(data).ids


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
