"""The Batch API of the fake Azure OpenAI: files (purpose `batch`) and batches, on a compressed clock.

    POST /openai/files                     multipart: purpose=batch, file=<jsonl>
    GET  /openai/files/{id}                the file object
    GET  /openai/files/{id}/content        the bytes (input, output or error file)
    POST /openai/batches                   {input_file_id, endpoint, completion_window, metadata}
    GET  /openai/batches                   ?after=&limit= (newest first, `has_more`)
    GET  /openai/batches/{id}
    POST /openai/batches/{id}/cancel
    GET  /_admin/batches                   every batch and the counters
    POST /_admin/batches                   change BatchConfig (as /_admin/config does for the rest)

Authentication and the api-version check are the fake's own (`FakeAzureOpenAI`). A batch moves
validating → in_progress → finalizing → completed, `step_seconds` a step (`hold` keeps it in_progress);
validation fails like the service's (url or model mismatch, duplicate custom_id, too many lines, the
enqueued-token limit); `expire_lines` lines expire; answers are the chat fake's ("ECHO: " + last user text).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import openai_bodies as bodies
from .openai_fake import (
    FAIL_PROMPT_MARKER,
    FILTER_OUTPUT_MARKER,
    FILTER_PROMPT_MARKER,
    FakeAzureOpenAI,
    _is_user,
    _json_response,
    _Reply,
    _text_of,
    _tokens,
)
from .settings import SettingsError, as_json, merge

Handler = Callable[[web.Request], Awaitable[web.Response]]

LIVE = ("validating", "in_progress", "finalizing", "cancelling")


@dataclass
class BatchConfig:
    """Behaviour of the Batch API; change it through POST /_admin/batches."""

    step_seconds: float = 0.05
    """How long each of validating, in_progress and finalizing lasts."""
    hold: bool = False
    """While true, batches stay in_progress (a test releases them by setting it false)."""
    expire_lines: int = 0
    """The next N lines processed expire (error file: batch_expired) and their batch ends `expired`."""
    max_lines: int = 100_000
    """Lines a batch takes; more fail validation with too_many_tasks."""
    enqueued_token_limit: int | None = None
    """Estimated tokens of live batches per deployment; more fail validation with token_limit_exceeded."""
    quota_fail_fast: bool = False
    """When the enqueued-token limit is reached, the create answers 429 instead of a failing batch."""
    create_delay_s: float = 0.0
    """After creating a batch, wait this long before answering (a client killed meanwhile never learns the id)."""
    create_failures: int = 0
    """The next N creates answer 503 without creating anything (the client cannot tell)."""
    answered_before_cancel: int = 0
    """Lines a cancelled batch answers before it ends `cancelled` (the rest get no line)."""


@dataclass
class BatchStats:
    uploads: int = 0
    creates: int = 0
    create_attempts: int = 0
    cancels: int = 0
    lines_submitted: int = 0
    lines_answered: int = 0
    lines_expired: int = 0
    content_downloads: int = 0


@dataclass
class FakeFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int = field(default_factory=lambda: int(time.time()))

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }


@dataclass
class FakeBatch:
    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    deployment: str
    tokens: int
    created: float = field(default_factory=time.time)
    status: str = "validating"
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    times: dict[str, int] = field(default_factory=dict)
    validation: list[dict[str, Any]] = field(default_factory=list)
    cancel_requested: bool = False

    def as_json(self) -> dict[str, Any]:
        created = int(self.created)
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": created,
            "in_progress_at": self.times.get("in_progress"),
            "expires_at": created + 24 * 3600,
            "finalizing_at": self.times.get("finalizing"),
            "completed_at": self.times.get("completed"),
            "failed_at": self.times.get("failed"),
            "expired_at": self.times.get("expired"),
            "cancelling_at": self.times.get("cancelling"),
            "cancelled_at": self.times.get("cancelled"),
            "request_counts": dict(self.counts),
            "metadata": self.metadata,
        }


def _normal_url(url: object) -> str:
    return str(url).split("?", 1)[0].rstrip("/").removeprefix("/v1")


class FakeBatches:
    """Files and batches of one fake resource; `fake` authenticates and answers the lines."""

    def __init__(self, fake: FakeAzureOpenAI) -> None:
        self._fake = fake
        self.config = BatchConfig()
        self.stats = BatchStats()
        self.files: dict[str, FakeFile] = {}
        self.batches: dict[str, FakeBatch] = {}

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/openai/files", _guarded(self._upload))
        app.router.add_get("/openai/files/{file_id}", _guarded(self._file))
        app.router.add_get("/openai/files/{file_id}/content", _guarded(self._content))
        app.router.add_post("/openai/batches", _guarded(self._create))
        app.router.add_get("/openai/batches", _guarded(self._list))
        app.router.add_get("/openai/batches/{batch_id}", _guarded(self._retrieve))
        app.router.add_post("/openai/batches/{batch_id}/cancel", _guarded(self._cancel))
        app.router.add_get("/_admin/batches", self._admin_state)
        app.router.add_post("/_admin/batches", self._admin_config)

    def reset(self) -> None:
        self.config = BatchConfig()
        self.stats = BatchStats()
        self.files.clear()
        self.batches.clear()

    # ---- files ------------------------------------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.Response:
        self._check(request)
        form = await request.post()
        upload = form.get("file")
        purpose = form.get("purpose")
        if purpose != "batch" or not isinstance(upload, web.FileField):
            return _error(400, "invalidPayload", "purpose must be 'batch' and the file a multipart part")
        data = upload.file.read()
        if not data.strip():
            return _error(400, "invalidPayload", "the file is empty")
        fake_file = FakeFile(f"file-{uuid.uuid4().hex}", upload.filename, "batch", data)
        self.files[fake_file.id] = fake_file
        self.stats.uploads += 1
        return web.json_response(fake_file.as_json())

    async def _file(self, request: web.Request) -> web.Response:
        self._check(request)
        found = self.files.get(request.match_info["file_id"])
        if found is None:
            return _error(404, "fileNotFound", "File not found")
        return web.json_response(found.as_json())

    async def _content(self, request: web.Request) -> web.Response:
        self._check(request)
        found = self.files.get(request.match_info["file_id"])
        if found is None:
            return _error(404, "fileNotFound", "File not found")
        self.stats.content_downloads += 1
        return web.Response(body=found.data, content_type="application/octet-stream")

    # ---- batches ----------------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        self._check(request)
        self.stats.create_attempts += 1
        if self.config.create_failures > 0:
            self.config.create_failures -= 1
            return web.json_response(bodies.SERVICE_UNAVAILABLE_503, status=503)
        try:
            body = json.loads(await request.read())
        except ValueError:
            return _error(400, "invalidPayload", "the body is not JSON")
        input_file = self.files.get(str(body.get("input_file_id")))
        if input_file is None:
            return _error(404, "fileNotFound", "File not found")
        if body.get("completion_window") != "24h":
            return _error(400, "invalidPayload", "completion_window must be 24h")
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or any(len(str(k)) > 64 or len(str(v)) > 512 for k, v in metadata.items())
        ):
            return _error(
                400, "invalidPayload", "metadata: at most 16 pairs, keys ≤ 64 and values ≤ 512 chars"
            )
        endpoint = str(body.get("endpoint", ""))
        lines, problems, deployment, tokens = self._validate(input_file.data, endpoint)
        limit = self.config.enqueued_token_limit
        if limit is not None and self._enqueued(deployment) + tokens > limit:
            if self.config.quota_fail_fast:
                return _error(
                    429,
                    "token_limit_exceeded",
                    f"The number of enqueued tokens has surpassed the configured limit of {limit} for the "
                    f"deployment '{deployment}'. Please try again once the current jobs have finished.",
                )
            problems.append(
                {
                    "code": "token_limit_exceeded",
                    "message": f"The number of enqueued tokens has surpassed the configured limit of {limit}",
                    "line": None,
                    "param": None,
                }
            )
        batch = FakeBatch(
            id=f"batch_{uuid.uuid4()}",
            input_file_id=input_file.id,
            endpoint=endpoint,
            completion_window="24h",
            metadata=metadata,
            deployment=deployment,
            tokens=0 if problems else tokens,
            validation=problems,
        )
        batch.counts["total"] = lines
        self.batches[batch.id] = batch
        self.stats.creates += 1
        self.stats.lines_submitted += lines
        if self.config.create_delay_s:
            await asyncio.sleep(self.config.create_delay_s)
        return web.json_response(batch.as_json())

    def _validate(self, data: bytes, endpoint: str) -> tuple[int, list[dict[str, Any]], str, int]:
        """(lines, validation errors, the deployment, estimated tokens) of an input file."""
        problems: list[dict[str, Any]] = []
        seen: set[str] = set()
        deployment = ""
        tokens = 0
        raw_lines = [line for line in data.splitlines() if line.strip()]
        if len(raw_lines) > self.config.max_lines:
            problems.append(
                {
                    "code": "too_many_tasks",
                    "message": f"The input file has {len(raw_lines)} lines; a batch takes {self.config.max_lines}.",
                    "line": None,
                    "param": None,
                }
            )
        for number, raw in enumerate(raw_lines, 1):
            try:
                line = json.loads(raw)
                body = line["body"]
                custom_id = line["custom_id"]
            except (ValueError, KeyError, TypeError):
                problems.append(_line_error("invalid_json_line", "The line is not a valid request.", number))
                continue
            if _normal_url(line.get("url")) != _normal_url(endpoint):
                problems.append(
                    _line_error(
                        "url_mismatch", "The url of the line does not match the batch endpoint.", number
                    )
                )
            model = body.get("model") if isinstance(body, dict) else None
            if not deployment and isinstance(model, str):
                deployment = model
            if model != deployment or model not in self._fake.config.deployments:
                problems.append(
                    _line_error(
                        "model_mismatch", "The model of the line is not the batch deployment.", number
                    )
                )
            if custom_id in seen:
                problems.append(_line_error("duplicate_custom_id", "The custom_id is repeated.", number))
            seen.add(custom_id)
            tokens += _estimate(body)
        return len(raw_lines), problems, deployment, tokens

    def _enqueued(self, deployment: str) -> int:
        return sum(
            batch.tokens
            for batch in self.batches.values()
            if batch.deployment == deployment and (batch.status in LIVE)
        )

    async def _retrieve(self, request: web.Request) -> web.Response:
        self._check(request)
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "batchNotFound", "Batch not found")
        self._advance(batch)
        return web.json_response(batch.as_json())

    async def _list(self, request: web.Request) -> web.Response:
        self._check(request)
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            return _error(400, "invalidPayload", "limit must be a number")
        if not 1 <= limit <= 100:
            return _error(400, "invalidPayload", "limit must be from 1 to 100")
        ordered = sorted(self.batches.values(), key=lambda batch: batch.created, reverse=True)
        after = request.query.get("after")
        if after:
            ids = [batch.id for batch in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        page = ordered[:limit]
        for batch in page:
            self._advance(batch)
        data = [batch.as_json() for batch in page]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(ordered) > limit,
            }
        )

    async def _cancel(self, request: web.Request) -> web.Response:
        self._check(request)
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _error(404, "batchNotFound", "Batch not found")
        self._advance(batch)
        if batch.status not in LIVE:
            return _error(409, "invalidBatchStatus", f"A batch that is {batch.status} cannot be cancelled.")
        if batch.status != "cancelling":
            batch.status = "cancelling"
            batch.cancel_requested = True
            batch.times["cancelling"] = int(time.time())
            self.stats.cancels += 1
        return web.json_response(batch.as_json())

    # ---- progress ---------------------------------------------------------------------------------

    def _advance(self, batch: FakeBatch) -> None:
        """Move a batch along its life as far as the compressed clock says."""
        step = self.config.step_seconds
        elapsed = time.time() - batch.created
        now = int(time.time())
        if batch.status == "validating" and elapsed >= step:
            if batch.validation:
                batch.status, batch.errors = "failed", batch.validation
                batch.times["failed"] = now
                return
            batch.status = "in_progress"
            batch.times["in_progress"] = now
        if batch.status == "cancelling":
            self._finish(batch, cancelled=True)
            return
        if batch.status == "in_progress" and elapsed >= 2 * step and not self.config.hold:
            batch.status = "finalizing"
            batch.times["finalizing"] = now
        if batch.status == "finalizing" and elapsed >= 3 * step:
            self._finish(batch, cancelled=False)

    def _finish(self, batch: FakeBatch, *, cancelled: bool) -> None:
        outputs: list[bytes] = []
        errors: list[bytes] = []
        expired = False
        answered = 0
        for raw in self.files[batch.input_file_id].data.splitlines():
            if not raw.strip():
                continue
            line = json.loads(raw)
            custom_id = line["custom_id"]
            if cancelled and answered >= self.config.answered_before_cancel:
                continue
            answered += 1
            if self.config.expire_lines > 0 and not cancelled:
                self.config.expire_lines -= 1
                self.stats.lines_expired += 1
                expired = True
                errors.append(
                    _output_line(
                        custom_id,
                        None,
                        {
                            "code": "batch_expired",
                            "message": "This request could not be executed before the completion window expired.",
                        },
                    )
                )
                batch.counts["failed"] += 1
                continue
            status, body = self._answer(batch.deployment, line)
            self.stats.lines_answered += 1
            response = {"status_code": status, "request_id": str(uuid.uuid4()), "body": body}
            if status == 200:
                outputs.append(_output_line(custom_id, response, None))
                batch.counts["completed"] += 1
            else:
                errors.append(_output_line(custom_id, response, None))
                batch.counts["failed"] += 1
        if outputs:
            batch.output_file_id = self._store(f"{batch.id}_output.jsonl", b"".join(outputs))
        if errors:
            batch.error_file_id = self._store(f"{batch.id}_error.jsonl", b"".join(errors))
        batch.status = "cancelled" if cancelled else "expired" if expired else "completed"
        batch.tokens = 0
        batch.times[batch.status] = int(time.time())

    def _store(self, name: str, data: bytes) -> str:
        stored = FakeFile(f"file-{uuid.uuid4().hex}", name, "batch_output", data)
        self.files[stored.id] = stored
        return stored.id

    def _answer(self, deployment: str, line: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(status, body) the online fake would answer for the line's request."""
        body = line["body"]
        if _normal_url(line.get("url")) == "/embeddings":
            raw = body.get("input")
            texts = raw if isinstance(raw, list) else [raw]
            answer = bodies.embedding_list(
                deployment,
                [str(text) for text in texts],
                dimensions=body.get("dimensions") or self._fake.config.embedding_dimensions,
                as_base64=False,
                prompt_tokens=sum(_tokens(len(str(text))) for text in texts),
            )
            return 200, answer
        messages = body.get("messages") or []
        texts = [_text_of(m.get("content")) if isinstance(m, dict) else "" for m in messages]
        prompt = "".join(texts)
        last_user = next(
            (text for m, text in zip(reversed(messages), reversed(texts), strict=True) if _is_user(m)), ""
        )
        if FILTER_PROMPT_MARKER in prompt:
            return 400, bodies.PROMPT_FILTERED_400
        if FAIL_PROMPT_MARKER in prompt:
            return 500, bodies.SERVER_ERROR_500
        content = "ECHO: " + last_user
        answer = bodies.chat_completion(
            deployment,
            content,
            prompt_tokens=_tokens(len(prompt)),
            completion_tokens=_tokens(len(content)),
            output_filtered=FILTER_OUTPUT_MARKER in prompt,
        )
        return 200, answer

    # ---- auth and admin ---------------------------------------------------------------------------

    def _check(self, request: web.Request) -> None:
        """The data plane's api-version check and authentication (raises the fake's early replies)."""
        self._fake.check_batch_request(request)

    async def _admin_state(self, _request: web.Request) -> web.Response:
        for batch in self.batches.values():
            self._advance(batch)
        statuses = Counter(batch.status for batch in self.batches.values())
        return web.json_response(
            {
                "config": as_json(self.config),
                "stats": as_json(self.stats),
                "by_status": dict(statuses),
                "batches": [batch.as_json() for batch in self.batches.values()],
            }
        )

    async def _admin_config(self, request: web.Request) -> web.Response:
        try:
            updates = json.loads(await request.read())
            if not isinstance(updates, dict):
                raise SettingsError("the body must be a JSON object of settings")
            self.config = merge(self.config, updates)
        except (ValueError, SettingsError) as error:
            return web.json_response({"error": str(error)}, status=400)
        return web.json_response(as_json(self.config))


def _guarded(handler: Handler) -> Handler:
    """Answer the fake's early replies (401, 404 api-version, outage) as the data plane does."""

    async def guarded(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except _Reply as reply:
            return _json_response(reply.status, reply.body, reply.headers)

    return guarded


def _estimate(body: object) -> int:
    if not isinstance(body, dict):
        return 0
    text = json.dumps(body.get("messages") or body.get("input") or "")
    return -(-len(text) // 4) + int(body.get("max_tokens") or 16)


def _line_error(code: str, message: str, line: int) -> dict[str, Any]:
    return {"code": code, "message": message, "line": line, "param": None}


def _output_line(custom_id: str, response: dict[str, Any] | None, error: dict[str, str] | None) -> bytes:
    record = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }
    return json.dumps(record).encode() + b"\n"


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)
