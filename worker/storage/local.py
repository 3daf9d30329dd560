"""A local folder as SOURCE or SINK (aiofiles). Claims are `fcntl.flock` locks, released by the OS on exit.

A result file is the worker's own when it is a regular file and its lock, `_state/<result path>.lock`,
exists: the worker creates the lock before it ever creates the result file, and it never creates a lock
for a result path that already holds something (a file, folder or link of the user's). Anything else at a
result path is never truncated, locked or appended to: the input is reported `name_collision`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import stat
from collections.abc import AsyncGenerator, AsyncIterator, Container
from pathlib import Path
from typing import Any

import aiofiles

from worker.errors import ConfigError, NameCollision, UnitHeld, UnsafeName
from worker.formats import ResultScanner
from worker.idset import FingerprintCounts
from worker.storage import MANIFEST_FOLDER, STATE_FOLDER, SourceFile, scan_in_slices, split_lines
from worker.storage.names import inside

READ_CHUNK = 1024 * 1024


def _scan(directory: Path) -> tuple[list[Path], list[SourceFile], Path]:
    """Folders and files of one folder. Symbolic links are listed as skipped, never followed: a link to a
    file outside SOURCE would send that file's content to Azure OpenAI, and a link to a file inside SOURCE
    names a file that is processed under its own name anyway."""
    folders: list[Path] = []
    files: list[SourceFile] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_symlink():
                files.append(SourceFile(entry.path, 0, "", skip="symlink_skipped"))
            elif entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                found = entry.stat(follow_symlinks=False)
                files.append(SourceFile(entry.path, found.st_size, f"{found.st_size}-{found.st_mtime_ns}"))
            else:
                files.append(SourceFile(entry.path, 0, "", skip="unsupported_file_type"))
    return folders, files, directory


class LocalSource:
    """Reads input files under a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def list_files(self) -> AsyncIterator[SourceFile]:
        if not self.root.is_dir():
            raise ConfigError(f"source {self.root} is not a folder: create it or point --source at a folder")
        pending = [self.root]
        while pending:
            folders, files, _ = await asyncio.to_thread(_scan, pending.pop())
            pending.extend(sorted(folders, reverse=True))
            for found in sorted(files, key=lambda f: f.path):
                relative = Path(found.path).relative_to(self.root).as_posix()
                yield SourceFile(relative, found.size, found.version, skip=found.skip)

    async def read(self, path: str) -> bytes:
        async with aiofiles.open(inside(self.root, path), "rb", opener=_no_follow) as file:
            return await file.read()

    async def read_lines(self, path: str) -> AsyncGenerator[bytes, None]:
        async with aiofiles.open(inside(self.root, path), "rb", opener=_no_follow) as file:
            async for line in split_lines(_chunks(file)):
                yield line


def _no_follow(path: str, flags: int) -> int:
    """Open without following a symbolic link in the last component (one swapped in after listing)."""
    return os.open(path, flags | os.O_NOFOLLOW)


async def _chunks(file: Any) -> AsyncIterator[bytes]:
    while chunk := await file.read(READ_CHUNK):
        yield chunk


class LocalUnit:
    """A result file held under an exclusive, non-blocking flock on its lock file."""

    def __init__(
        self, result: Path, marker: Path, lock_fd: int, done_ids: Container[str], *, version: str
    ) -> None:
        self._result = result
        self._marker = marker
        self._version = version
        self._lock_fd: int | None = lock_fd
        self.done_ids = done_ids
        self.max_line_bytes: int | None = None

    async def append(self, data: bytes) -> None:
        async with aiofiles.open(self._result, "ab", opener=_no_follow) as file:
            await file.write(data)
            await file.flush()

    async def finish(self, items: int) -> None:
        self._marker.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._marker.with_name(f"{self._marker.name}.tmp")
        temporary.write_text(json.dumps({"items": items, "version": self._version}), encoding="utf-8")
        temporary.replace(self._marker)
        await self.release()

    async def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


class LocalSink:
    """Writes result files, markers and manifests under a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def prepare(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / STATE_FOLDER / f".probe-{os.getpid()}"
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"probe")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"sink {self.root} is not writable ({exc.strerror}): fix its permissions"
            ) from None

    async def finished_units(self) -> FingerprintCounts:
        state = self.root / STATE_FOLDER
        if not state.is_dir():
            return FingerprintCounts()

        def scan() -> FingerprintCounts:
            found = FingerprintCounts()
            for marker in state.rglob("*.done"):
                finished = _read_marker(marker)
                if finished is not None:
                    found.put(marker.relative_to(state).as_posix().removesuffix(".done"), *finished)
            return found

        return await asyncio.to_thread(scan)

    async def collides(self, result_path: str) -> bool:
        try:
            result = inside(self.root, result_path)
        except UnsafeName:
            return True  # a link in the sink leads elsewhere: whatever is there is not the worker's
        lock = self.root / STATE_FOLDER / f"{result_path}.lock"
        try:
            found = os.lstat(result)
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            return True  # a file of the user's where the result path needs a folder
        return not stat.S_ISREG(found.st_mode) or not lock.exists()

    async def claim(self, result_path: str, version: str) -> LocalUnit | None:
        result = inside(self.root, result_path)
        marker = inside(self.root, f"{STATE_FOLDER}/{result_path}.done")
        lock = inside(self.root, f"{STATE_FOLDER}/{result_path}.lock")
        if await self.collides(result_path):
            raise NameCollision(f"{result} was not created by the worker: it is left untouched")
        lock.parent.mkdir(parents=True, exist_ok=True)
        result.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UnitHeld(str(result)) from None
        try:
            return await self._open_unit(result, marker, fd, version)
        except BaseException:
            os.close(fd)
            raise

    async def _open_unit(self, result: Path, marker: Path, fd: int, version: str) -> LocalUnit | None:
        """Under the lock: None when the unit is complete at `version`, else its result file, created by the
        worker when missing, scanned for the ids it records (a torn last line is cut off)."""
        finished = _read_marker(marker)
        if finished is not None and (not finished[1] or not version or finished[1] == version):
            os.close(fd)
            return None
        with contextlib.suppress(FileExistsError):
            os.close(os.open(result, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
        if not stat.S_ISREG(os.lstat(result).st_mode):  # replaced since `collides` looked
            raise NameCollision(f"{result} was not created by the worker: it is left untouched")
        scanner = ResultScanner()
        async with aiofiles.open(result, "rb", opener=_no_follow) as file:
            while chunk := await file.read(READ_CHUNK):
                await scan_in_slices(scanner, chunk)
        if scanner.complete < os.lstat(result).st_size:
            torn = os.open(result, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                os.ftruncate(torn, scanner.complete)
            finally:
                os.close(torn)
        return LocalUnit(result, marker, fd, scanner.ids, version=version)

    async def write_manifest(self, run_id: str, data: bytes) -> str:
        path = self.root / MANIFEST_FOLDER / f"{run_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(data)
        temporary.replace(path)
        return str(path)

    async def write_state(self, name: str, data: bytes) -> None:
        path = inside(self.root, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(data)
        temporary.replace(path)

    async def read_state(self, name: str) -> bytes | None:
        try:
            return inside(self.root, name).read_bytes()
        except FileNotFoundError:
            return None

    async def list_state(self, prefix: str) -> list[str]:
        folder = self.root / prefix.rstrip("/")
        if not folder.is_dir():
            return []

        def scan() -> list[str]:
            return sorted(
                path.relative_to(self.root).as_posix()
                for path in folder.rglob("*")
                if path.is_file() and not path.name.endswith(".tmp")
            )

        return await asyncio.to_thread(scan)

    async def delete_state(self, name: str) -> None:
        inside(self.root, name).unlink(missing_ok=True)


def _read_marker(marker: Path) -> tuple[int, str | None] | None:
    """(items, input version) of a completion marker; None when there is none or it is unreadable (the
    unit is then done again from its result file, which keeps every recorded id exactly once)."""
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
        version = content.get("version")
        return int(content["items"]), version if isinstance(version, str) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
