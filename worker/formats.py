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
from dataclasses import dataclass
from typing import Any, Literal

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


class BatchFileParser:
    """Parses a .jsonl file line by line, remembering custom_ids to catch duplicates."""

    def __init__(self, path: str, *, parameters: dict[str, Any]) -> None:
        self.path = path
        self._parameters = parameters
        self._seen: set[str] = set()
        self.items = 0

    def parse_line(self, line_number: int, raw: bytes) -> Parsed | None:
        """One line (1-based number); None for a blank line, which is not an item."""
        if not raw.strip():
            return None
        self.items += 1
        where = f"{self.path}:{line_number}"
        text = _decode(raw)
        if text is None:
            return Rejected(where, "invalid_encoding", f"{where} is not UTF-8", line_number)
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            return Rejected(where, "invalid_json", f"{where} is not valid JSON: {exc.msg}", line_number)
        if not isinstance(record, dict):
            return Rejected(where, "invalid_request", f"{where} must be a JSON object", line_number)
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id.strip():
            return Rejected(where, "missing_custom_id", f"{where} has no custom_id string", line_number)
        if custom_id in self._seen:
            self.items -= 1
            return Duplicate(custom_id, line_number)
        self._seen.add(custom_id)
        return self._request(custom_id, record, where, line_number)

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

    `complete` is the length of the complete lines seen; a torn last line (a crash while writing a
    local file) is not counted, and its offset tells the caller where to cut the file.
    """

    def __init__(self) -> None:
        self.ids: set[str] = set()
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


def custom_ids_in(data: bytes) -> tuple[set[str], int]:
    """The custom_ids recorded in `data` and the length of its complete lines (see ResultScanner)."""
    scanner = ResultScanner()
    scanner.feed(data)
    return scanner.ids, scanner.complete
