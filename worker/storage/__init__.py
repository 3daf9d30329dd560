"""Where items come from (Source) and where results go (Sink): a local folder or a blob prefix.

A *work unit* is one input file. Its results live in one result file under the sink, named by
`formats.result_path`. A unit is *claimed* before work starts (a blob lease, or a file lock locally), so
overlapping runs and replicas never work on the same unit at once; a claimed unit reports the custom_ids
already recorded so a rerun only does what is missing; a finished unit is marked, with the version of its
input, so the next run skips it without reading it unless the input changed since.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Container
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from worker.idset import FingerprintCounts

if TYPE_CHECKING:
    from worker.formats import ResultScanner


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file under SOURCE; `path` is relative to SOURCE with '/' separators."""

    path: str
    size: int
    version: str
    """Changes whenever the content may have: the blob's ETag, or f"{size}-{mtime_ns}" for a local file."""
    skip: str | None = None
    """A problem code (a key of SKIP_REASONS) when the entry is listed but must not be read."""


SKIP_REASONS = {
    "symlink_skipped": "a symbolic link: only regular files under SOURCE are read, never a link's target",
    "unsupported_file_type": "not a regular file (a FIFO, socket or device)",
}


class Source(Protocol):
    """Read-only access to the input folder."""

    def list_files(self) -> AsyncIterator[SourceFile]:
        """Every file under SOURCE, recursively, streamed in name order."""
        ...

    async def read(self, path: str) -> bytes:
        """The whole content of a (small) file."""
        ...

    def read_lines(self, path: str) -> AsyncGenerator[bytes, None]:
        """The file's lines without their line endings, streamed in chunks (flat memory for large files)."""
        ...


class ClaimedUnit(Protocol):
    """A work unit this process holds: the only writer of its result file until released."""

    done_ids: Container[str]
    max_line_bytes: int | None
    """The longest result line one append takes (an append blob: 100 MiB); None = no limit. The writer
    replaces a longer line with a `response_too_large` error record."""

    async def append(self, data: bytes) -> None:
        """Append complete result lines durably; raises LeaseLost when the claim is gone, ResultFileFull
        when the result file takes no more appends. A result file with a limited number of appends paces
        them itself (the caller's lines accumulate meanwhile, so each append carries more)."""
        ...

    async def finish(self, items: int) -> None:
        """Mark the unit complete (all `items` recorded, at the input version claimed) and release it."""
        ...

    async def release(self) -> None:
        """Release the claim without marking the unit complete (work remains)."""
        ...


class Sink(Protocol):
    """The output folder: result files, the worker's own `_` folders, run manifests."""

    async def prepare(self) -> None:
        """Create the folder/container when missing and prove that writing works (ConfigError if not)."""
        ...

    async def finished_units(self) -> FingerprintCounts:
        """Result paths of units marked complete → their item counts and the input versions they were
        completed at (none for a marker written before versions were recorded)."""
        ...

    async def collides(self, result_path: str) -> bool:
        """Whether the result path is taken by something the worker did not create (a user's file or blob):
        that input is reported `name_collision`, and the file is never truncated, leased or appended to."""
        ...

    async def claim(self, result_path: str, version: str) -> ClaimedUnit | None:
        """Claim a unit for the input at `version`; None when it was completed at that version (or at
        an unrecorded one) meanwhile; UnitHeld while another process holds it. A unit completed at another version
        is claimed again: its result file keeps every record, and `done_ids` has them. Raises NameCollision
        when the result path turns out to be taken (see `collides`)."""
        ...

    async def write_manifest(self, run_id: str, data: bytes) -> str:
        """Write `_runs/<run_id>.json`; returns where it went."""
        ...

    async def write_state(self, name: str, data: bytes) -> None:
        """Write (replace) a small state object of the worker's, `name` relative to SINK (under a `_`
        folder, e.g. `_batches/...`)."""
        ...

    async def read_state(self, name: str) -> bytes | None:
        """A state object written by `write_state`; None when there is none."""
        ...

    async def list_state(self, prefix: str) -> list[str]:
        """The names of the state objects under `prefix` (relative to SINK), in name order."""
        ...

    async def delete_state(self, name: str) -> None:
        """Delete a state object; nothing happens when it is gone already."""
        ...


MAX_LINE_BYTES = 16 * 1024 * 1024
"""The longest line `split_lines` hands on (16 MiB, its `\\r` included); a longer one is never held whole."""


class OverlongLine(bytes):
    """What `split_lines` yields in place of a line over its cap: no content, only the line's `length`.

    It is `bytes` (empty) so that sources keep yielding bytes and line numbers keep counting every line;
    the parser recognises it and writes a `line_too_large` record for the line.
    """

    length: int

    def __new__(cls, length: int) -> OverlongLine:
        line = super().__new__(cls)
        line.length = length
        return line


async def split_lines(chunks: AsyncIterator[bytes], max_line: int = MAX_LINE_BYTES) -> AsyncIterator[bytes]:
    """Lines (without their `\\n` or `\\r\\n`) from a stream of chunks cut anywhere.

    A line longer than `max_line` bytes becomes one `OverlongLine`: its start is dropped as soon as it
    passes the cap and the rest is only counted, so no more than `max_line` bytes of a line are held.
    """
    head: list[bytes] = []  # the start of the current line, from earlier chunks
    held = 0
    skipped: int | None = None  # the length so far of an over-long line being skipped
    async for chunk in chunks:
        pieces = chunk.split(b"\n")
        rest = pieces.pop()
        if pieces:
            if skipped is not None:
                yield OverlongLine(skipped + len(pieces[0]))
                skipped = None
            else:
                head.append(pieces[0])
                yield _line(b"".join(head), max_line)
                head.clear()
                held = 0
            for piece in itertools.islice(pieces, 1, None):
                yield _line(piece, max_line)
        if skipped is not None:
            skipped += len(rest)
        elif rest:
            held += len(rest)
            if held > max_line:
                skipped, held = held, 0
                head.clear()
            else:
                head.append(rest)
    if skipped is not None:
        yield OverlongLine(skipped)
    elif head:
        yield _line(b"".join(head), max_line)


def _line(raw: bytes, max_line: int) -> bytes:
    return OverlongLine(len(raw)) if len(raw) > max_line else raw.rstrip(b"\r")


class ResultFileFull(Exception):
    """A result file takes no more appends: the unit stops and its input should be split."""


SCAN_SLICE_BYTES = 256 * 1024


async def scan_in_slices(scanner: ResultScanner, chunk: bytes) -> None:
    """Feed a (large) chunk of result lines to `scanner` a slice at a time, yielding to the event loop
    between slices so lease renewals and calls keep running during a long scan."""
    for start in range(0, len(chunk), SCAN_SLICE_BYTES):
        scanner.feed(chunk[start : start + SCAN_SLICE_BYTES])
        await asyncio.sleep(0)


MANIFEST_FOLDER = "_runs"
STATE_FOLDER = "_state"
BATCH_FOLDER = "_batches"
