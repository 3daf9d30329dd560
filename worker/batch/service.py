"""The files and batches endpoints, through the run's one `AsyncAzureOpenAI` client (its retries are off).

Reads (retrieve, list, content) and uploads are retried here on transient failures, 429s and a 401 after a
fresh token, with `calls.retry_delay`; a create is never retried blindly: when its answer is lost the
batch may exist, and the next run adopts it by its metadata (`CreateUnknown`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import openai
import structlog
from openai.types import Batch

from worker.batch.lines import QUOTA_CODES
from worker.calls import Verdict, classify, describe_failure, error_code, error_message, retry_delay
from worker.errors import AccessDenied, ConfigError
from worker.identity import OPENAI_SCOPE, SharedTokens

log = structlog.get_logger("worker.batch")

T = TypeVar("T")
ATTEMPTS = 5
TRANSFER_TIMEOUT_SECONDS = 600.0
"""Uploads and downloads of input, output and error files (up to 200 MB) get this long."""


class QuotaFull(Exception):
    """The create was refused because the enqueued-token quota is full."""


class CreateUnknown(Exception):
    """The create's answer was lost: the batch may or may not exist (the next run looks it up)."""


class BatchGone(Exception):
    """The service does not know the batch or file (404)."""


class BatchService:
    def __init__(
        self, client: openai.AsyncAzureOpenAI, *, tokens: SharedTokens | None, api_version: str
    ) -> None:
        self._client = client
        self._tokens = tokens
        self._api_version = api_version

    async def upload(self, name: str, data: bytes) -> str:
        """Upload a Batch input file (purpose `batch`); its file id."""
        created = await self._call(
            "upload a batch input file",
            lambda: self._client.files.create(
                file=(name, data, "application/jsonl"), purpose="batch", timeout=TRANSFER_TIMEOUT_SECONDS
            ),
        )
        return created.id

    async def create(self, input_file_id: str, endpoint: str, metadata: dict[str, str]) -> Batch:
        """Create a batch; QuotaFull when the enqueued-token quota is full, CreateUnknown when the answer
        was lost (connection, timeout, 5xx). Only a refusal that proves nothing was created (a 429 that is
        not about the quota, a 401) is retried here."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._call(
                    "create a batch",
                    lambda: self._client.batches.create(
                        input_file_id=input_file_id,
                        endpoint=endpoint,  # type: ignore[arg-type]  # Azure's form: /chat/completions
                        completion_window="24h",
                        metadata=metadata,
                    ),
                    retry=False,
                )
            except openai.APIStatusError as exc:
                if error_code(exc) in QUOTA_CODES or (exc.status_code == 429 and attempt >= ATTEMPTS):
                    raise QuotaFull(error_message(exc)) from None
                if exc.status_code == 429:
                    await asyncio.sleep(retry_delay(exc, attempt))
                    continue
                if classify(exc) is Verdict.RETRY:
                    raise CreateUnknown(describe_failure(exc)) from None
                raise ConfigError(
                    f"Azure OpenAI refused to create a batch ({error_code(exc)}: {error_message(exc)}): the "
                    "deployment must be a Global Batch (or Data Zone Batch) deployment"
                ) from None
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                raise CreateUnknown(describe_failure(exc)) from None

    async def retrieve(self, batch_id: str) -> Batch:
        return await self._call("look at a batch", lambda: self._client.batches.retrieve(batch_id))

    async def cancel(self, batch_id: str) -> Batch:
        return await self._call("cancel a batch", lambda: self._client.batches.cancel(batch_id))

    async def list_all(self) -> list[Batch]:
        """Every batch of the resource (pages of 100)."""

        async def listing() -> list[Batch]:
            return [batch async for batch in self._client.batches.list(limit=100)]

        return await self._call("list the batches", listing)

    async def content(self, file_id: str) -> bytes:
        """The content of an output or error file."""

        async def download() -> bytes:
            content = await self._client.files.content(file_id, timeout=TRANSFER_TIMEOUT_SECONDS)
            return content.content

        return await self._call("download a batch output file", download)

    async def _call(self, action: str, make: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        attempt = reauths = 0
        while True:
            attempt += 1
            try:
                return await make()
            except (openai.APIStatusError, openai.APITimeoutError, openai.APIConnectionError) as exc:
                verdict = classify(exc)
                if verdict is Verdict.REAUTH and self._tokens is not None and reauths < 2:
                    reauths += 1
                    assert isinstance(exc, openai.APIStatusError)
                    header = exc.response.request.headers.get("authorization", "")
                    await self._tokens.refresh(
                        OPENAI_SCOPE, header.removeprefix("Bearer ").removeprefix("bearer ")
                    )
                    continue
                if retry and verdict in (Verdict.RETRY, Verdict.THROTTLED) and attempt < ATTEMPTS:
                    delay = retry_delay(exc, attempt)
                    log.info(
                        "batch.call_retried",
                        action=action,
                        failure=describe_failure(exc),
                        wait_s=round(delay, 2),
                    )
                    await asyncio.sleep(delay)
                    continue
                raise self._translate(exc, action, verdict) from None

    def _translate(self, exc: Exception, action: str, verdict: Verdict) -> Exception:
        if not isinstance(exc, openai.APIStatusError):
            return exc
        if verdict in (Verdict.FATAL, Verdict.REAUTH):
            return AccessDenied(
                f"Azure OpenAI refused to {action} ({error_code(exc)}: {error_message(exc)}): the identity needs "
                "the 'Cognitive Services OpenAI User' role on the resource (`worker doctor` names it)"
            )
        if exc.status_code == 404:
            if error_message(exc).lower().startswith("resource not found"):
                return ConfigError(
                    f"Azure OpenAI answered 404 Resource not found when asked to {action}: the Batch API needs "
                    f"api-version 2024-10-21 or later (OPENAI_API_VERSION is {self._api_version}) and "
                    "AZURE_OPENAI_ENDPOINT without a path"
                )
            return BatchGone(f"{action}: {error_message(exc)}")
        return exc


def request_counts(batch: Batch) -> dict[str, int] | None:
    counts = batch.request_counts
    if counts is None:
        return None
    return {"total": counts.total, "completed": counts.completed, "failed": counts.failed}


def validation_errors(batch: Batch) -> list[tuple[str | None, int | None, str | None]]:
    data: list[Any] = list(batch.errors.data or []) if batch.errors is not None else []
    return [(error.code, error.line, error.message) for error in data]
