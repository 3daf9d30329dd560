"""A blob prefix as SOURCE or SINK (azure.storage.blob.aio).

Result files are append blobs, created by the worker with the metadata `worker_result=true`: a blob at a
result path without it (or that is not an append blob) is someone else's, and is never leased or written
(the input is reported `name_collision`). Each append is conditional on the blob's length
(`appendpos_condition`), so a retried append never writes a line twice. A unit is claimed with a blob
lease on its result file, renewed while held; a finished unit carries the metadata
`worker_complete=true`, `worker_items=N` and `worker_input_version=<the input's ETag>`, which a listing
returns, so a rerun skips it unread unless the input changed since.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Container, Iterator
from typing import Any, NoReturn

import structlog
from azure.core import MatchConditions
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobProperties
from azure.storage.blob.aio import BlobClient, BlobLeaseClient, ContainerClient

from worker.errors import AccessDenied, ConfigError, LeaseLost, NameCollision, UnitHeld
from worker.formats import RESULT_SUFFIX, ResultScanner
from worker.idset import FingerprintCounts, FingerprintSet
from worker.storage import (
    MANIFEST_FOLDER,
    STATE_FOLDER,
    ResultFileFull,
    SourceFile,
    scan_in_slices,
    split_lines,
)

log = structlog.get_logger("worker.storage")

MIB = 1024 * 1024
MAX_APPEND_BLOCKS = 50_000
APPEND_RESERVE = 100
SLOW_APPEND_INTERVAL = 0.2
SCANS_AT_ONCE = 4
COMPLETE_KEY = "worker_complete"
ITEMS_KEY = "worker_items"
VERSION_KEY = "worker_input_version"
RESULT_KEY = "worker_result"
LEASE_GONE_CODES = {
    "LeaseIdMismatchWithBlobOperation",
    "LeaseNotPresentWithBlobOperation",
    "LeaseLost",
    "LeaseIdMismatchWithLeaseOperation",
    "LeaseNotPresentWithLeaseOperation",
    "LeaseIsBrokenAndCannotBeRenewed",
}

ROLE_HINT = (
    "the identity needs the 'Storage Blob Data Contributor' role on the storage account "
    "('Storage Blob Data Reader' is enough for a source); run `worker doctor` to see which principal the "
    "worker runs as"
)


def storage_error_code(exc: HttpResponseError) -> str:
    """The `x-ms-error-code` of a storage error ("" when there is none)."""
    code = getattr(exc, "error_code", None) or ""
    return str(getattr(code, "value", code))


def access_problem(exc: HttpResponseError, action: str, where: str) -> ConfigError | None:
    """A storage refusal that no retry will fix, as a ConfigError that says what to do; else None."""
    code = storage_error_code(exc)
    if (
        exc.status_code == 403 and code.startswith("AuthorizationPermission")
    ) or code == "AuthorizationFailure":
        return AccessDenied(f"storage refused to {action} {where} ({code}): {ROLE_HINT}")
    if exc.status_code in (401, 403) or isinstance(exc, ClientAuthenticationError):
        return AccessDenied(
            f"storage did not accept the credential to {action} {where} ({code or exc.status_code}): check that "
            "the token is for the right tenant (AZURE_TENANT_ID) and that the account URL is right"
        )
    return None


@contextlib.contextmanager
def storage_errors(action: str, where: str) -> Iterator[None]:
    """Turn permanent storage refusals into ConfigError; everything else propagates unchanged."""
    try:
        yield
    except HttpResponseError as exc:
        problem = access_problem(exc, action, where)
        if problem is not None:
            raise problem from None
        raise


class BlobSource:
    """Reads input blobs under a prefix."""

    def __init__(self, container: ContainerClient, prefix: str, where: str) -> None:
        self._container = container
        self._prefix = prefix
        self._where = where

    async def list_files(self) -> AsyncIterator[SourceFile]:
        with storage_errors("list", self._where):
            try:
                async for blob in self._container.list_blobs(name_starts_with=self._prefix or None):
                    if blob.name.endswith("/"):
                        continue
                    yield SourceFile(blob.name[len(self._prefix) :], blob.size or 0, blob.etag or "")
            except ResourceNotFoundError:
                raise ConfigError(f"source container {self._where} does not exist: check --source") from None

    async def read(self, path: str) -> bytes:
        with storage_errors("read", f"{self._where}{path}"):
            downloader = await self._container.download_blob(self._prefix + path)
            return await downloader.readall()

    async def read_lines(self, path: str) -> AsyncGenerator[bytes, None]:
        with storage_errors("read", f"{self._where}{path}"):
            downloader = await self._container.download_blob(self._prefix + path)
            async for line in split_lines(downloader.chunks()):
                yield line


def append_block_limit(api_version: str) -> int:
    """The most bytes one Append Block takes at a service version (x-ms-version): 100 MiB since
    2022-11-02, 4 MiB before. azure-storage-blob 12.31 sends 2026-10-06; Azurite 3.37 takes 100 MiB too."""
    return 100 * MIB if api_version >= "2022-11-02" else 4 * MIB


class BlobUnit:
    """An append blob held under a renewed lease. One append (one Append Block) takes at most
    `max_line_bytes`, so a result line longer than that cannot be written at all."""

    def __init__(self, blob: BlobClient, lease: BlobLeaseClient, *, renew_every: float, version: str) -> None:
        """Takes over a lease just acquired and starts renewing it at once; `load` then reads what the
        result file already holds."""
        self._blob = blob
        self._version = version
        self._renew_every = renew_every
        self._lease = lease
        self._length = 0
        self._lost = False
        self.done_ids: Container[str] = frozenset()
        self._block_limit = append_block_limit(blob.api_version)
        self.max_line_bytes: int | None = self._block_limit
        self.appends_used = 0
        self._renewer = asyncio.create_task(self._keep_lease(), name=f"lease:{blob.blob_name}")

    async def load(self, properties: BlobProperties) -> None:
        """Scan the result lines already written (in slices that let the renewer run)."""
        scanner = ResultScanner()
        if properties.size:
            async for chunk in (await self._blob.download_blob(lease=self._lease)).chunks():
                await scan_in_slices(scanner, chunk)
                self._length += len(chunk)
                self._check()
        self.done_ids = scanner.ids
        self.appends_used = properties.append_blob_committed_block_count or 0

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(self._renew_every)
            try:
                await self._lease.renew()
            except HttpResponseError as exc:
                if storage_error_code(exc) in LEASE_GONE_CODES or exc.status_code == 409:
                    self._lost = True
                    log.warning("unit.lease_lost", blob=self._blob.blob_name, code=storage_error_code(exc))
                    return
                log.warning(
                    "unit.lease_renew_failed", blob=self._blob.blob_name, code=storage_error_code(exc)
                )
            except Exception as exc:  # noqa: BLE001 - a renewal hiccup is retried at the next tick
                log.warning("unit.lease_renew_failed", blob=self._blob.blob_name, error=type(exc).__name__)

    def _check(self) -> None:
        if self._lost:
            raise LeaseLost(f"lease on {self._blob.blob_name} was lost")

    async def append(self, data: bytes) -> None:
        """An append blob takes MAX_APPEND_BLOCKS appends: the first tenth go out at once, later ones
        `SLOW_APPEND_INTERVAL` apart so that each carries more lines (at 5 appends a second the rest lasts
        about 2.5 hours of continuous writing); `APPEND_RESERVE` blocks short of the limit the file is full."""
        self._check()
        if self.appends_used >= MAX_APPEND_BLOCKS - APPEND_RESERVE:
            raise ResultFileFull(
                f"the result file reached {MAX_APPEND_BLOCKS - APPEND_RESERVE} appends; split this input into "
                "smaller files"
            )
        if self.appends_used >= MAX_APPEND_BLOCKS // 10:
            await asyncio.sleep(SLOW_APPEND_INTERVAL)
        limit = self._block_limit
        start = 0
        while start < len(data):
            end = len(data) if len(data) - start <= limit else data.rfind(b"\n", start, start + limit) + 1
            if end <= start:
                raise ValueError(f"a single result line exceeds {limit} bytes, what one append takes")
            await self._append_once(data[start:end])
            start = end

    async def _append_once(self, block: bytes) -> None:
        try:
            await self._blob.append_block(block, lease=self._lease, appendpos_condition=self._length)
        except HttpResponseError as exc:
            if storage_error_code(exc) in LEASE_GONE_CODES:
                self._lost = True
                raise LeaseLost(f"lease on {self._blob.blob_name} was lost") from None
            if storage_error_code(exc) != "AppendPositionConditionNotMet":
                with storage_errors("write", self._blob.blob_name):
                    raise
            # A retried request may have landed the first time: the length tells.
            properties = await self._blob.get_blob_properties(lease=self._lease)
            if properties.size != self._length + len(block):
                raise
        self._length += len(block)
        self.appends_used += 1

    async def finish(self, items: int) -> None:
        self._check()
        with storage_errors("mark complete", self._blob.blob_name):
            await self._blob.set_blob_metadata(
                {RESULT_KEY: "true", COMPLETE_KEY: "true", ITEMS_KEY: str(items), VERSION_KEY: self._version},
                lease=self._lease,
            )
        await self.release()

    def stop_renewing(self) -> None:
        self._renewer.cancel()

    async def release(self) -> None:
        self.stop_renewing()
        with contextlib.suppress(asyncio.CancelledError):
            await self._renewer
        if not self._lost:
            with contextlib.suppress(HttpResponseError):
                await self._lease.release()


class BlobSink:
    """Writes result append blobs, completion metadata and manifests under a prefix."""

    def __init__(
        self, container: ContainerClient, prefix: str, where: str, *, lease_seconds: int = 30
    ) -> None:
        self._container = container
        self._prefix = prefix
        self._where = where
        self._lease_seconds = lease_seconds
        self._foreign = FingerprintSet()
        self.scan_slots = asyncio.Semaphore(SCANS_AT_ONCE)
        """Partly written result files read at once (on resume); a claim waiting here keeps its lease."""

    async def prepare(self) -> None:
        try:
            await self._container.create_container()
            log.info("sink.container_created", container=self._container.container_name)
        except ResourceExistsError:
            pass
        except HttpResponseError as exc:
            problem = access_problem(exc, "create the container", self._where)
            if problem is not None:
                raise ConfigError(
                    f"{problem} — or create the container {self._container.container_name} yourself"
                ) from None
            raise
        probe = self._container.get_blob_client(f"{self._prefix}{STATE_FOLDER}/probe-{uuid.uuid4().hex}")
        with storage_errors("write", self._where):
            await probe.upload_blob(b"probe", overwrite=True)
            await probe.delete_blob()

    async def finished_units(self) -> FingerprintCounts:
        """From one listing: the finished units, and (for `collides`) the result paths taken by blobs
        the worker did not create."""
        found = FingerprintCounts()
        with storage_errors("list", self._where):
            async for blob in self._container.list_blobs(
                name_starts_with=self._prefix or None, include=["metadata"]
            ):
                if not blob.name.endswith(RESULT_SUFFIX):
                    continue
                metadata = blob.metadata or {}
                if not _worker_result(blob.blob_type, metadata):
                    self._foreign.add(blob.name[len(self._prefix) :])
                elif metadata.get(COMPLETE_KEY) == "true":
                    with contextlib.suppress(ValueError):
                        found.put(
                            blob.name[len(self._prefix) :],
                            int(metadata.get(ITEMS_KEY, "0")),
                            metadata.get(VERSION_KEY),
                        )
        return found

    async def collides(self, result_path: str) -> bool:
        """As of the last `finished_units` listing; `claim` checks again before it takes a lease."""
        return result_path in self._foreign

    async def claim(self, result_path: str, version: str) -> BlobUnit | None:
        blob = self._container.get_blob_client(self._prefix + result_path)
        where = f"{self._where}{result_path}"
        with storage_errors("write", where):
            try:
                await blob.create_append_blob(
                    metadata={RESULT_KEY: "true"}, match_condition=MatchConditions.IfMissing
                )
            except ResourceExistsError:
                existing = await blob.get_blob_properties()
                if not _worker_result(existing.blob_type, existing.metadata):
                    _collision(where)
            except ResourceNotFoundError:
                pass
            lease = BlobLeaseClient(blob)
            try:
                await lease.acquire(lease_duration=self._lease_seconds)
            except HttpResponseError as exc:
                if exc.status_code == 409:
                    raise UnitHeld(where) from None
                raise
            unit = BlobUnit(blob, lease, renew_every=self._lease_seconds / 3, version=version)
            try:
                properties = await blob.get_blob_properties(lease=lease)
                if not _worker_result(properties.blob_type, properties.metadata):  # replaced meanwhile
                    _collision(where)
                if _complete_at(properties.metadata or {}, version):
                    await unit.release()
                    return None
                async with self.scan_slots:
                    await unit.load(properties)
            except BaseException:
                with contextlib.suppress(Exception):
                    await unit.release()
                raise
        return unit

    async def write_manifest(self, run_id: str, data: bytes) -> str:
        name = f"{self._prefix}{MANIFEST_FOLDER}/{run_id}.json"
        with storage_errors("write", self._where):
            await self._container.upload_blob(name, data, overwrite=True, **_json_content())
        return f"{self._where}{MANIFEST_FOLDER}/{run_id}.json"

    async def write_state(self, name: str, data: bytes) -> None:
        with storage_errors("write", self._where):
            await self._container.upload_blob(self._prefix + name, data, overwrite=True, **_json_content())

    async def read_state(self, name: str) -> bytes | None:
        with storage_errors("read", self._where):
            try:
                downloader = await self._container.download_blob(self._prefix + name)
            except ResourceNotFoundError:
                return None
            return await downloader.readall()

    async def list_state(self, prefix: str) -> list[str]:
        names: list[str] = []
        with storage_errors("list", self._where):
            async for blob in self._container.list_blobs(name_starts_with=self._prefix + prefix):
                names.append(blob.name[len(self._prefix) :])
        return sorted(names)

    async def delete_state(self, name: str) -> None:
        with storage_errors("write", self._where), contextlib.suppress(ResourceNotFoundError):
            await self._container.delete_blob(self._prefix + name)


def _complete_at(metadata: dict[str, str], version: str) -> bool:
    """Whether a result blob is marked complete for this input version (or for an unrecorded one)."""
    if metadata.get(COMPLETE_KEY) != "true":
        return False
    recorded = metadata.get(VERSION_KEY)
    return not recorded or not version or recorded == version


def _collision(where: str) -> NoReturn:
    raise NameCollision(f"{where} was not created by the worker: it is left untouched")


def _worker_result(blob_type: object, metadata: dict[str, str] | None) -> bool:
    """Whether a blob at a result path is the worker's own: an append blob it created (marked at creation;
    a blob a worker finished before that mark existed carries `worker_complete`)."""
    metadata = metadata or {}
    return blob_type == "AppendBlob" and (RESULT_KEY in metadata or metadata.get(COMPLETE_KEY) == "true")


def _json_content() -> dict[str, Any]:
    from azure.storage.blob import ContentSettings

    return {"content_settings": ContentSettings(content_type="application/json")}
