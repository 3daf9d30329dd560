"""`_batches/<input path>/<part>.json` under SINK: which custom_ids each batch of a unit covers.

A record is written (state `submitting`) before its batch is created, then again with the batch id
(`live`), and once the batch's results are in the unit's result file (`collected`). A `submitting` record
met by a later run is a create whose answer was lost: the batch is looked up by its metadata and adopted,
or, when there is none, the record is dropped and its lines are submitted again.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.storage import BATCH_FOLDER, Sink

SUBMITTING, LIVE, COLLECTED = "submitting", "live", "collected"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class BatchRecord:
    unit: str
    """The input file (path relative to SOURCE) whose lines the batch holds."""
    part: int
    deployment: str
    url: str
    custom_ids: list[str]
    state: str = SUBMITTING
    batch_id: str | None = None
    input_file_id: str | None = None
    status: str | None = None
    request_counts: dict[str, int] | None = None
    tokens: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "completion": 0})
    size: int = 0
    """Bytes of the input file."""
    estimated_tokens: int = 0
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    """Names this record in its batch's metadata (a part number alone may be used again)."""
    created_at: str = field(default_factory=now_iso)
    collected_at: str | None = None

    @property
    def name(self) -> str:
        return record_name(self.unit, self.part)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass"
        )

    @classmethod
    def from_json(cls, data: bytes) -> BatchRecord:
        content: dict[str, Any] = json.loads(data.decode("utf-8", "surrogatepass"))
        known = {name: content[name] for name in cls.__dataclass_fields__ if name in content}
        return cls(**known)


def unit_folder(unit: str) -> str:
    return f"{BATCH_FOLDER}/{unit}/"


def record_name(unit: str, part: int) -> str:
    return f"{unit_folder(unit)}{part:06d}.json"


class BatchStore:
    """Reads and writes the records of a sink."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink

    async def unit_records(self, unit: str) -> list[BatchRecord]:
        """The records of one unit, by part (the names of deeper units, `unit/x.jsonl/...`, are not its)."""
        folder = unit_folder(unit)
        records = []
        for name in await self._sink.list_state(folder):
            rest = name[len(folder) :]
            if "/" in rest or not rest.endswith(".json"):
                continue
            record = await self._read(name)
            if record is not None:
                records.append(record)
        return sorted(records, key=lambda record: record.part)

    async def all_records(self) -> list[BatchRecord]:
        records = []
        for name in await self._sink.list_state(f"{BATCH_FOLDER}/"):
            if name.endswith(".json"):
                record = await self._read(name)
                if record is not None:
                    records.append(record)
        return records

    async def _read(self, name: str) -> BatchRecord | None:
        data = await self._sink.read_state(name)
        if data is None:
            return None
        try:
            return BatchRecord.from_json(data)
        except (ValueError, TypeError) as exc:
            raise ValueError(
                f"the batch record {name} under SINK cannot be read ({exc}): repair or delete it"
            ) from None

    async def save(self, record: BatchRecord) -> None:
        await self._sink.write_state(record.name, record.to_json())

    async def delete(self, record: BatchRecord) -> None:
        await self._sink.delete_state(record.name)
