"""Input files → requests; outcomes → Batch API result lines.

Inputs (PRODUCT.md):
- `.txt`, `.md`: the whole file is one user message; custom_id = path relative to SOURCE.
- `.json`: one chat request body; custom_id = relative path.
- `.jsonl`: one Batch API request a line: {"custom_id", "method": "POST", "url", "body"}.
Anything else is not an input. A bad file or line becomes a `Rejected` with a stable identity, never an
exception: bad input never stops good input.
"""

from __future__ import annotations

import json
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from worker.idset import FingerprintSet
from worker.storage import MAX_LINE_BYTES, OverlongLine

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
    return Request(path, CHAT_URL, {**parameters, "messages": messages})


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
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        return Rejected(
            path, "invalid_body", f"{path} must be a chat request body with a non-empty `messages` list"
        )
    return Request(path, CHAT_URL, {**parameters, **body})


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
        if not isinstance(record, dict):
            return "invalid_request", "must be a JSON object"
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id.strip():
            return "missing_custom_id", "has no custom_id string"
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
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                return Rejected(
                    custom_id, "invalid_body", f"{where}: body needs a non-empty messages list", line_number
                )
            body = {**self._parameters, **body}
        elif "input" not in body:
            return Rejected(
                custom_id, "invalid_body", f"{where}: an embeddings body needs `input`", line_number
            )
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
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


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
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(custom_id, str):
                self.ids.add(custom_id)


def custom_ids_in(data: bytes) -> tuple[FingerprintSet, int]:
    """The custom_ids recorded in `data` and the length of its complete lines (see ResultScanner)."""
    scanner = ResultScanner()
    scanner.feed(data)
    return scanner.ids, scanner.complete
