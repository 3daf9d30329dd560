"""Input files → requests; outcomes → Batch API result lines.

Inputs (the README's Inputs table):
- `.txt`, `.md`: the whole file is one user message; custom_id = path relative to SOURCE.
- `.json`: one chat request body; custom_id = relative path.
- `.jsonl`: one Batch API request a line: {"custom_id", "method": "POST", "url", "body"}.
Anything else is not an input. A bad file or line becomes a `Rejected` with a stable identity, never an
exception: bad input never stops good input.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from worker.idset import FingerprintSet
from worker.storage import MAX_LINE_BYTES, OverlongLine, Source, SourceFile

InputKind = Literal["prompt", "body", "batch"]
KIND_BY_SUFFIX: dict[str, InputKind] = {".txt": "prompt", ".md": "prompt", ".json": "body", ".jsonl": "batch"}
CHAT_URL = "/chat/completions"
EMBEDDINGS_URL = "/embeddings"
SUPPORTED_URLS = (CHAT_URL, EMBEDDINGS_URL)
RESULT_SUFFIX = ".results.jsonl"


@dataclass(frozen=True, slots=True)
class Request:
    """One call to make. `body["model"]` names the deployment when the input named one."""

    custom_id: str
    url: str
    body: dict[str, Any]
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Rejected:
    """An input item that cannot be sent; it still gets an error record."""

    custom_id: str
    code: str
    message: str
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A later line repeating a custom_id: reported, never recorded twice (the first occurrence wins)."""

    custom_id: str
    line: int


Parsed = Request | Rejected | Duplicate


def input_kind(path: str) -> InputKind | None:
    """The kind of input a file is by its name, or None when it is not an input."""
    dot = path.rfind(".")
    if dot <= path.rfind("/"):
        return None
    return KIND_BY_SUFFIX.get(path[dot:].lower())


def result_path(input_path: str) -> str:
    """Where the results for an input go, relative to SINK. Injective: no two inputs share a result file."""
    return input_path + RESULT_SUFFIX


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def parse_prompt_file(
    path: str, data: bytes, *, system_prompt: str | None, parameters: dict[str, Any]
) -> Request | Rejected:
    """A .txt/.md file: the whole text is one user message, with the job's system prompt and parameters."""
    text = _decode(data)
    if text is None:
        return Rejected(path, "invalid_encoding", f"{path} is not UTF-8 text")
    if not text.strip():
        return Rejected(path, "empty_input", f"{path} is empty or only whitespace")
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": text})
    body = {**parameters, "messages": messages}
    problem = body_problem(CHAT_URL, body)
    if problem is not None:
        return Rejected(path, "invalid_body", f"{path}: {problem}")
    return Request(path, CHAT_URL, body)


def parse_body_file(path: str, data: bytes, *, parameters: dict[str, Any]) -> Request | Rejected:
    """A .json file: one chat request body; the job's parameters fill what the body leaves out."""
    text = _decode(data)
    if text is None:
        return Rejected(path, "invalid_encoding", f"{path} is not UTF-8 text")
    if not text.strip():
        return Rejected(path, "empty_input", f"{path} is empty or only whitespace")
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        return Rejected(path, "invalid_json", f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}")
    except ValueError as exc:  # e.g. a number of more than 4300 digits
        return Rejected(path, "invalid_json", f"{path} cannot be read as JSON: {_reason(exc)}")
    except RecursionError:
        return Rejected(path, "invalid_json", f"{path} nests too deeply to be read as JSON")
    if not isinstance(body, dict):
        return Rejected(path, "invalid_body", f"{path} must be a JSON object: a chat request body")
    body = {**parameters, **body}
    problem = body_problem(CHAT_URL, body)
    if problem is not None:
        return Rejected(path, "invalid_body", f"{path}: {problem}")
    return Request(path, CHAT_URL, body)


# ---- request bodies -------------------------------------------------------------------------------
# What the Batch API checks when it validates a line: a body the service or the SDK would refuse becomes an
# `invalid_body` record when the input is read, never a call that is billed, retried or crashes.

DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9_.-]{2,64}")
MAX_OUTPUT_TOKENS = 1_000_000
MAX_NESTING = 200  # the SDK serialises bodies recursively
_SURROGATE = re.compile("[\ud800-\udfff]")

# name -> (whole numbers only, lowest, highest)
NUMERIC_PARAMETERS: dict[str, tuple[bool, int | float, int | float]] = {
    "max_tokens": (True, 1, MAX_OUTPUT_TOKENS),
    "max_completion_tokens": (True, 1, MAX_OUTPUT_TOKENS),
    "n": (True, 1, 128),
    "temperature": (False, 0, 2),
    "top_p": (False, 0, 1),
    "presence_penalty": (False, -2, 2),
    "frequency_penalty": (False, -2, 2),
    "top_logprobs": (True, 0, 20),
    "seed": (True, -(2**63), 2**63 - 1),
    "dimensions": (True, 1, 65_536),
}


def body_problem(url: str, body: dict[str, Any]) -> str | None:
    """What is wrong with a request body for `url` (chat or embeddings), naming the field; None if sendable."""
    problem = _parameters_problem(body, "body")
    if problem is None:
        problem = _messages_problem(body) if url == CHAT_URL else _input_problem(body)
    return problem if problem is not None else _unsendable(body, "body")


def parameters_problem(parameters: dict[str, Any]) -> str | None:
    """What is wrong with the job's [parameters] (merged into every chat request); None when nothing."""
    problem = _parameters_problem(parameters, "parameters")
    return problem if problem is not None else _unsendable(parameters, "parameters")


def _parameters_problem(body: dict[str, Any], where: str) -> str | None:
    stream = body.get("stream")
    if stream is True:
        return f"{where}.stream is true, but the worker collects whole answers: remove `stream` or set it to false"
    if stream is not None and stream is not False:
        return f"{where}.stream must be false or absent, not {_show(stream)}"
    model = body.get("model")
    if model is not None and model != "" and not _is_deployment_name(model):
        return f"{where}.model must be a deployment name (2-64 letters, digits, -, _, .), not {_show(model)}"
    for name, value in body.items():
        bounds = NUMERIC_PARAMETERS.get(name)
        if bounds is None or value is None:
            continue
        whole, lowest, highest = bounds
        if (
            isinstance(value, bool)
            or not isinstance(value, int if whole else int | float)
            or not lowest <= value <= highest
        ):
            kind = "a whole number" if whole else "a number"
            return f"{where}.{name} must be {kind} from {lowest} to {highest}, not {_show(value)}"
    return None


def _is_deployment_name(value: object) -> bool:
    return isinstance(value, str) and DEPLOYMENT_NAME.fullmatch(value) is not None and value.strip(".") != ""


def _messages_problem(body: dict[str, Any]) -> str | None:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "body.messages must be a non-empty list of messages"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"body.messages[{i}] must be an object, not {_json_type(message)}"
        role = message.get("role")
        if not isinstance(role, str) or not role:
            return f"body.messages[{i}].role must be a string"
        content = message.get("content")
        if isinstance(content, str) or (content is None and role == "assistant"):
            continue  # an assistant message that calls tools may have no content
        if not isinstance(content, list):
            return (
                f"body.messages[{i}].content must be a string or a list of parts, not {_json_type(content)}"
            )
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                return f"body.messages[{i}].content[{j}] must be an object, not {_json_type(part)}"
            if "text" in part and not isinstance(part["text"], str):
                return (
                    f"body.messages[{i}].content[{j}].text must be a string, not {_json_type(part['text'])}"
                )
    return None


def _input_problem(body: dict[str, Any]) -> str | None:
    value = body.get("input")
    if isinstance(value, str):
        return None
    if not isinstance(value, list) or not value:
        return f"body.input must be a string or a non-empty list, not {_json_type(value)}"
    kinds = (("a string", _is_text), ("a token id", _is_token), ("a non-empty list of token ids", _is_tokens))
    expected = next(((name, test) for name, test in kinds if test(value[0])), None)
    if expected is None:
        return "body.input[0] must be a string, a token id or a list of token ids"
    name, test = expected
    bad = next((i for i, item in enumerate(value) if not test(item)), None)
    return None if bad is None else f"body.input[{bad}] must be {name}, as body.input[0] is"


def _is_text(value: object) -> bool:
    return isinstance(value, str)


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31


def _is_tokens(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_token(token) for token in value)


def _unsendable(value: dict[str, Any], where: str) -> str | None:
    """A value that cannot go out as JSON text (NaN, infinity, a lone surrogate) or nests too deep."""
    return None if _sendable(value) else _find_unsendable(value, where)


def _sendable(value: dict[str, Any]) -> bool:
    """`_unsendable`'s question without naming the field: what runs for every body, in a third of the time."""
    pending: list[tuple[dict[str, Any] | list[Any], int]] = [(value, 1)]
    while pending:
        container, depth = pending.pop()
        if isinstance(container, dict):
            for key in container:
                if not key.isascii() and _SURROGATE.search(key):
                    return False
            items: Iterable[Any] = container.values()
        else:
            items = container
        for item in items:
            kind = type(item)  # json and tomllib make exact types
            if kind is str:
                if not item.isascii() and _SURROGATE.search(item):
                    return False
            elif kind is float:
                if not math.isfinite(item):
                    return False
            elif kind is dict or kind is list:
                if depth >= MAX_NESTING:
                    return False
                pending.append((item, depth + 1))
    return True


def _find_unsendable(value: dict[str, Any], where: str) -> str | None:
    pending: list[tuple[str, dict[str, Any] | list[Any], int]] = [(where, value, 1)]
    while pending:
        path, container, depth = pending.pop()
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in items:
            if isinstance(key, str) and _has_surrogate(key):
                return f"{path} has a key that is not Unicode text: {_show(key)}"
            if isinstance(item, str):
                if _has_surrogate(item):
                    return f"{_field(path, key)} is not Unicode text (it holds a lone surrogate)"
            elif isinstance(item, float):
                if not math.isfinite(item):
                    return f"{_field(path, key)} must be a finite number, not {item}"
            elif isinstance(item, dict | list):
                if depth >= MAX_NESTING:
                    return f"{_field(path, key)} nests deeper than {MAX_NESTING} levels"
                pending.append((_field(path, key), item, depth + 1))
    return None


def _reason(exc: ValueError) -> str:
    return str(exc).split(":", 1)[0]


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _field(path: str, key: object) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}"


def _show(value: object) -> str:
    """A short, printable rendering of a value from the input for a message (surrogates escaped)."""
    text = ascii(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else "an object"


class InputChanged(Exception):
    """An input file was different on a second read: its unit is left for the next run."""


class SeenIds(Protocol):
    def add(self, item: str) -> bool:
        """Remember `item`; True when it is (probably) new, False when it may have been seen."""
        ...


class BatchFileParser:
    """Parses a .jsonl file line by line and catches repeated custom_ids, in flat memory.

    Seen ids are kept as 64-bit fingerprints (worker.idset), 8 bytes a line instead of ~100. A line whose
    fingerprint was seen before is a *suspect*: held back (rare: a real duplicate, or a fingerprint
    collision at odds of ~3e-8 in a million lines) until `resolve_suspects` has read the file again up to
    the last suspect. There each suspect becomes a `Duplicate` only when its id truly occurs on an earlier
    line, and its request otherwise. The answer is exact; only the suspects' line numbers and ids are kept.
    """

    def __init__(self, path: str, *, parameters: dict[str, Any], seen: SeenIds | None = None) -> None:
        self.path = path
        self._parameters = parameters
        self._seen = seen if seen is not None else FingerprintSet(bits=64)
        self._suspects: list[tuple[int, str]] = []
        self.items = 0

    def parse_line(self, line_number: int, raw: bytes) -> Parsed | None:
        """One line (1-based number); None for a blank line, which is not an item, or a held suspect.

        `raw` is an `OverlongLine` for a line longer than `storage.MAX_LINE_BYTES`."""
        where = f"{self.path}:{line_number}"
        if isinstance(raw, OverlongLine):  # split_lines kept none of it
            self.items += 1
            return Rejected(
                where,
                "line_too_large",
                f"{where} is {raw.length:,} bytes; a line may hold {MAX_LINE_BYTES:,} (16 MiB) at most",
                line_number,
            )
        if not raw.strip():
            return None
        record = self._record(raw)
        if isinstance(record, tuple):
            self.items += 1
            code, problem = record
            return Rejected(where, code, f"{where} {problem}", line_number)
        custom_id = record["custom_id"]
        if not self._seen.add(custom_id):
            self._suspects.append((line_number, custom_id))
            return None
        self.items += 1
        return self._request(custom_id, record, where, line_number)

    @property
    def has_suspects(self) -> bool:
        """Whether lines are held back until `resolve_suspects` has read the file again."""
        return bool(self._suspects)

    async def resolve_suspects(self, lines: AsyncIterator[bytes]) -> AsyncIterator[Parsed]:
        """The second pass, over the same file's lines: a Duplicate for each true repeat, the request
        for each line held back by a fingerprint collision. Raises InputChanged if the file changed."""
        pending = deque(self._suspects)
        self._suspects = []
        wanted = {custom_id for _, custom_id in pending}
        first_line: dict[str, int] = {}
        number = 0
        async for raw in lines:
            number += 1
            record = self._record(raw) if raw.strip() else None
            custom_id = record["custom_id"] if isinstance(record, dict) else None
            if number == pending[0][0]:
                if custom_id != pending[0][1]:
                    break
                pending.popleft()
                if custom_id in first_line:
                    yield Duplicate(custom_id, number)
                else:
                    first_line[custom_id] = number
                    self.items += 1
                    assert isinstance(record, dict)
                    yield self._request(custom_id, record, f"{self.path}:{number}", number)
                if not pending:
                    return
            elif custom_id in wanted:
                first_line.setdefault(custom_id, number)
        raise InputChanged(f"{self.path} changed while it was being read; the next run picks it up again")

    @staticmethod
    def _record(raw: bytes) -> dict[str, Any] | tuple[str, str]:
        """The line as a JSON object with a custom_id string, or (code, what is wrong)."""
        text = _decode(raw)
        if text is None:
            return "invalid_encoding", "is not UTF-8"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            return "invalid_json", f"is not valid JSON: {exc.msg}"
        except ValueError as exc:  # e.g. a number of more than 4300 digits
            return "invalid_json", f"cannot be read as JSON: {_reason(exc)}"
        except RecursionError:
            return "invalid_json", "nests too deeply to be read as JSON"
        if not isinstance(record, dict):
            return "invalid_request", "must be a JSON object"
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id.strip():
            return "missing_custom_id", "has no custom_id string"
        if _has_surrogate(custom_id):
            return "invalid_custom_id", f"has a custom_id that is not Unicode text: {_show(custom_id)}"
        return record

    def _request(
        self, custom_id: str, record: dict[str, Any], where: str, line_number: int
    ) -> Request | Rejected:
        method = record.get("method", "POST")
        if not isinstance(method, str) or method.upper() != "POST":
            return Rejected(custom_id, "unsupported_method", f"{where}: method must be POST", line_number)
        url = record.get("url")
        if not isinstance(url, str):
            return Rejected(custom_id, "unsupported_url", f"{where}: url is missing", line_number)
        url = url.split("?", 1)[0].rstrip("/")
        url = url.removeprefix("/v1")
        if url not in SUPPORTED_URLS:
            return Rejected(
                custom_id,
                "unsupported_url",
                f"{where}: url {url!r} is not supported; use /chat/completions or /embeddings",
                line_number,
            )
        body = record.get("body")
        if not isinstance(body, dict):
            return Rejected(custom_id, "invalid_body", f"{where}: body must be a JSON object", line_number)
        if url == CHAT_URL:
            body = {**self._parameters, **body}
        problem = body_problem(url, body)
        if problem is not None:
            return Rejected(custom_id, "invalid_body", f"{where}: {problem}", line_number)
        return Request(custom_id, url, body, line_number)


def result_line(
    custom_id: str,
    *,
    response: dict[str, Any] | None = None,
    error: dict[str, str] | None = None,
) -> bytes:
    """One Batch API output line: {"id", "custom_id", "response", "error"} and a newline."""
    record = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate (a file name that is not UTF-8): written as a \\u escape
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def error_record(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


class ResultScanner:
    """Collects the custom_ids recorded in a result file, fed in chunks (flat memory for big files).

    The ids are kept as 128-bit fingerprints (worker.idset): 16 bytes an id instead of ~100.

    `complete` is the length of the complete lines seen; a torn last line (a crash while writing a
    local file) is not counted, and its offset tells the caller where to cut the file.
    """

    def __init__(self) -> None:
        self.ids = FingerprintSet(bits=128)
        self.complete = 0
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        data = self._tail + chunk
        cut = data.rfind(b"\n") + 1
        self._tail = data[cut:]
        self.complete += cut
        for line in data[:cut].splitlines():
            if not line.strip():
                continue
            try:
                custom_id = json.loads(line).get("custom_id")
            except (ValueError, AttributeError, RecursionError):
                continue
            if isinstance(custom_id, str):
                self.ids.add(custom_id)


@dataclass(frozen=True, kw_only=True)
class InputLimits:
    """What reading inputs needs from the settings: size limits, the system prompt, the parameters."""

    max_prompt_bytes: int
    max_jsonl_bytes: int
    system_prompt: str | None
    parameters: dict[str, Any]


async def read_items(source: Source, file: SourceFile, limits: InputLimits) -> AsyncIterator[Parsed]:
    """The items of one input file, by its kind: a prompt or a body file is one item; a .jsonl file is
    read as a stream, line by line (repeated custom_ids confirmed by a second read, see BatchFileParser)."""
    kind = input_kind(file.path)
    limit = limits.max_jsonl_bytes if kind == "batch" else limits.max_prompt_bytes
    if file.size > limit:
        yield Rejected(file.path, "file_too_large", f"{file.path} is {file.size} bytes; the limit is {limit}")
        return
    if kind == "batch":
        parser = BatchFileParser(file.path, parameters=dict(limits.parameters))
        number = 0
        async for raw in source.read_lines(file.path):
            number += 1
            parsed = parser.parse_line(number, raw)
            if parsed is not None:
                yield parsed
        if parser.has_suspects:  # a repeated id fingerprint: confirm against the file before judging
            async with aclosing(source.read_lines(file.path)) as lines:
                async for parsed in parser.resolve_suspects(lines):
                    yield parsed
        if parser.items == 0:
            yield Rejected(file.path, "empty_input", f"{file.path} holds no request lines")
        return
    data = await source.read(file.path)
    if kind == "prompt":
        yield parse_prompt_file(
            file.path, data, system_prompt=limits.system_prompt, parameters=dict(limits.parameters)
        )
    else:
        yield parse_body_file(file.path, data, parameters=dict(limits.parameters))
