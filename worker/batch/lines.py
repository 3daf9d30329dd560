"""Pure parts of the batch backend: Batch input lines and files, result lines, validation errors, metadata."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.formats import Request

RETRY_CODES = frozenset({"batch_expired", "batch_cancelled"})
"""Error-file codes of lines the service never answered: they go into a new batch."""
QUOTA_CODES = frozenset({"token_limit_exceeded", "quota_exceeded", "insufficient_quota"})
"""Codes saying the enqueued-token quota is full: back off until a later run."""
WHOLE_BATCH_CODES = frozenset({"model_mismatch", "url_mismatch", "too_many_tasks", "duplicate_custom_id"})
"""Validation codes that, even when they name a line, are about the batch: the worker writes every line of a
file with the same url and deployment and unique ids, so these mean a deployment that takes no batches or a
limit set too high (a configuration problem, never the items' error)."""
LIVE_STATUSES = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
METADATA_SINK, METADATA_UNIT, METADATA_PART, METADATA_RECORD, METADATA_INPUT = (
    "worker_sink",
    "worker_unit",
    "worker_part",
    "worker_record",
    "worker_input",
)
MAX_METADATA_VALUE = 512


def short_hash(text: str, length: int) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:length]


def sink_key(sink: str) -> str:
    """Names a sink in batch metadata (the URL itself may be longer than a metadata value)."""
    return short_hash(sink.rstrip("/"), 16)


def batch_metadata(sink: str, unit: str, part: int, record: str) -> dict[str, str]:
    """The metadata a batch is created with: enough to adopt it when its record lost the batch id. `record`
    is the record's own random id, so a batch is only ever adopted by the record it was created for."""
    return {
        METADATA_SINK: sink_key(sink),
        METADATA_UNIT: short_hash(unit, 32),
        METADATA_PART: str(part),
        METADATA_RECORD: record,
        METADATA_INPUT: unit[-MAX_METADATA_VALUE:],
    }


def metadata_matches(
    metadata: Mapping[str, str] | None, sink: str, unit: str, part: int, record: str
) -> bool:
    expected = batch_metadata(sink, unit, part, record)
    keys = (METADATA_SINK, METADATA_UNIT, METADATA_PART, METADATA_RECORD)
    return metadata is not None and all(metadata.get(key) == expected[key] for key in keys)


def endpoint_of(url: str) -> str:
    """The `endpoint` of batches.create for requests to `url` (as the Azure docs write it)."""
    return url if url.startswith("/") else f"/{url}"


def input_line(request: Request, deployment: str) -> bytes:
    """One Batch input line for a request: the unit's custom_id, POST, the url, the body with the model."""
    record = {
        "custom_id": request.custom_id,
        "method": "POST",
        "url": request.url,
        "body": {**request.body, "model": deployment},
    }
    try:
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except UnicodeEncodeError:
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"


@dataclass
class Chunk:
    """The lines of one Batch input file: one deployment, one url."""

    deployment: str
    url: str
    lines: list[bytes] = field(default_factory=list)
    custom_ids: list[str] = field(default_factory=list)
    size: int = 0
    estimated_tokens: int = 0

    @property
    def data(self) -> bytes:
        return b"".join(self.lines)


class LineTooLarge(ValueError):
    """One request is larger than a whole Batch input file may be."""


class Chunker:
    """Groups input lines into Batch input files of at most `max_lines` lines and `max_bytes` bytes, one
    (deployment, url) per file. `add` hands back the file a line did not fit in, ready to submit."""

    def __init__(self, max_lines: int, max_bytes: int) -> None:
        self._max_lines = max_lines
        self._max_bytes = max_bytes
        self._open: dict[tuple[str, str], Chunk] = {}

    def add(self, deployment: str, url: str, custom_id: str, line: bytes, tokens: int = 0) -> Chunk | None:
        if len(line) > self._max_bytes:
            raise LineTooLarge(
                f"the request is {len(line)} bytes as a Batch line; a Batch input file takes {self._max_bytes}"
            )
        key = (deployment, url)
        full: Chunk | None = None
        chunk = self._open.get(key)
        if chunk is not None and (
            len(chunk.lines) >= self._max_lines or chunk.size + len(line) > self._max_bytes
        ):
            full = self._open.pop(key)
            chunk = None
        if chunk is None:
            chunk = self._open[key] = Chunk(deployment, url)
        chunk.lines.append(line)
        chunk.custom_ids.append(custom_id)
        chunk.size += len(line)
        chunk.estimated_tokens += tokens
        return full

    def rest(self) -> list[Chunk]:
        """The files still open, in the order they were started."""
        chunks, self._open = list(self._open.values()), {}
        return chunks


def split(items: Iterable[tuple[str, str, str, bytes]], max_lines: int, max_bytes: int) -> list[Chunk]:
    """Every (deployment, url, custom_id, line) in files (a convenience over Chunker, for tests)."""
    chunker = Chunker(max_lines, max_bytes)
    chunks: list[Chunk] = []
    for deployment, url, custom_id, line in items:
        full = chunker.add(deployment, url, custom_id, line)
        if full is not None:
            chunks.append(full)
    return chunks + chunker.rest()


@dataclass(frozen=True)
class LineOutcome:
    """One line of a batch's output or error file, judged: a result to record, or `retry` (a new batch)."""

    custom_id: str
    response: dict[str, Any] | None
    error: dict[str, str] | None
    retry: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _retryable_status(status: object) -> bool:
    return isinstance(status, int) and (status in (408, 409, 429) or status >= 500)


def _service_error(body: object) -> tuple[str | None, str | None]:
    """(`error.code`, `error.message`) of a response body, when it carries them."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            code, message = inner.get("code"), inner.get("message")
            return (str(code) if code else None), (str(message) if message else None)
    return None, None


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def read_result_line(raw: bytes) -> LineOutcome | None:
    """A line of an output or error file; None when it cannot be read (no custom_id)."""
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
        return None
    custom_id: str = record["custom_id"]
    response = record.get("response") if isinstance(record.get("response"), dict) else None
    error = record.get("error") if isinstance(record.get("error"), dict) else None
    status = response.get("status_code") if response is not None else None
    if error is not None and error.get("code"):
        code = str(error["code"])
        if code in RETRY_CODES or _retryable_status(status):
            return LineOutcome(custom_id, None, None, retry=True)
        message = str(error.get("message") or code)
        return LineOutcome(custom_id, response, {"code": code, "message": message})
    if response is None:
        return LineOutcome(custom_id, None, None, retry=True)
    body = response.get("body")
    if status == 200 and isinstance(body, dict):
        usage = body.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        return LineOutcome(
            custom_id,
            response,
            None,
            prompt_tokens=_count(usage.get("prompt_tokens")),
            completion_tokens=_count(usage.get("completion_tokens")),
        )
    if _retryable_status(status) or not isinstance(status, int):
        return LineOutcome(custom_id, None, None, retry=True)
    service_code, service_message = _service_error(body)
    final = {"code": service_code or f"http_{status}", "message": service_message or f"HTTP {status}"}
    return LineOutcome(custom_id, response, final)


@dataclass(frozen=True)
class ValidationVerdict:
    """What a batch that failed validation means: `quota` (back off), per-line errors, or a problem of
    the whole batch that is the configuration's (`problem`)."""

    quota: bool
    line_errors: dict[str, dict[str, str]]
    problem: str | None


def judge_validation(
    errors: Iterable[tuple[str | None, int | None, str | None]], custom_ids: list[str]
) -> ValidationVerdict:
    """`errors` are the batch's errors.data as (code, line, message); `custom_ids` its lines in order.

    Any other failure (no line, an unknown code: the service's trouble) is none of these: the batch's lines
    are simply submitted again."""
    quota = False
    line_errors: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    for given, line, message in errors:
        code = given or "validation_failed"
        if code in QUOTA_CODES:
            quota = True
        elif code in WHOLE_BATCH_CODES:
            if (problem := f"{code}: {message or 'no message'}") not in problems:
                problems.append(problem)
        elif line is not None and 1 <= line <= len(custom_ids):
            line_errors[custom_ids[line - 1]] = {"code": code, "message": message or code}
    return ValidationVerdict(quota, line_errors, "; ".join(problems) if problems else None)
