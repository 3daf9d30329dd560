"""Sets of custom_ids in flat memory: fingerprints in open-addressed arrays, not Python strings.

A `set[str]` costs ~100 bytes an id (the str object and its slot); a file of a million lines would hold
~100 MB just to remember which ids it has seen. These tables keep a keyed BLAKE2b fingerprint per id in
`array('Q')` shards: 8 or 16 bytes an id, times the load factor (between 3/8 and 3/4 full).

- `FingerprintSet(bits=128)` is what resuming uses ("is this id already in the result file?"). A wrong
  answer would skip an item, so the fingerprint is 128 bits: the odds that any two of a million ids
  share one are ~1e-27 — far below the odds of a memory error — and the set is exact in practice.
- `FingerprintSet(bits=64)` is what duplicate detection inside an input file uses, where a collision
  (odds ~3e-8 at a million lines) is only a *suspect*: the parser confirms it against the file before
  calling a line a duplicate (see formats.BatchFileParser), so the answer is exact.

The table is split in 256 shards so that growing never copies more than 1/256 of it at once (no spike
to twice the size). The key is random per process: fingerprints are never stored or compared across runs.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterable
from hashlib import blake2b

SHARDS = 256
_INITIAL_SLOTS = 8  # per shard, a power of two
_MAX_LOAD_NUMERATOR, _MAX_LOAD_DENOMINATOR = 3, 4


class FingerprintSet:
    """A grow-only set of strings, remembered by fingerprint. `add` says whether the id was new."""

    __slots__ = ("_bits", "_counts", "_key", "_len", "_shards")

    def __init__(self, *, bits: int = 128) -> None:
        if bits not in (64, 128):
            raise ValueError("bits must be 64 or 128")
        self._bits = bits
        self._key = os.urandom(16)
        words = bits // 64
        self._shards = [array("Q", bytes(8 * words * _INITIAL_SLOTS)) for _ in range(SHARDS)]
        self._counts = [0] * SHARDS
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, str):
            return False
        shard, high, low = self._fingerprint(item)
        return self._find(self._shards[shard], high, low)[0]

    def add(self, item: str) -> bool:
        """Remember `item`; True when it was not there before."""
        shard, high, low = self._fingerprint(item)
        table = self._shards[shard]
        found, slot = self._find(table, high, low)
        if found:
            return False
        self._put(table, slot, high, low)
        self._counts[shard] += 1
        self._len += 1
        if self._counts[shard] * _MAX_LOAD_DENOMINATOR > self._slots(table) * _MAX_LOAD_NUMERATOR:
            self._shards[shard] = self._grown(table)
        return True

    def update(self, items: Iterable[str]) -> None:
        for item in items:
            self.add(item)

    # -- internals: slot i of a shard is words [i*w, (i+1)*w); an all-zero slot is empty --

    def _fingerprint(self, item: str) -> tuple[int, int, int]:
        digest = blake2b(item.encode("utf-8", "surrogatepass"), digest_size=17, key=self._key).digest()
        shard = digest[0]
        high = int.from_bytes(digest[1:9], "little") or 1  # never zero: zero marks an empty slot
        low = int.from_bytes(digest[9:17], "little") if self._bits == 128 else 0
        return shard, high, low

    def _slots(self, table: array[int]) -> int:
        return len(table) if self._bits == 64 else len(table) // 2

    def _find(self, table: array[int], high: int, low: int) -> tuple[bool, int]:
        """(found, slot): the slot holding the fingerprint, or the empty slot where it would go."""
        mask = self._slots(table) - 1
        slot = (high >> 8) & mask
        if self._bits == 64:
            while True:
                value = table[slot]
                if value == high:
                    return True, slot
                if value == 0:
                    return False, slot
                slot = (slot + 1) & mask
        while True:
            value = table[2 * slot]
            if value == high and table[2 * slot + 1] == low:
                return True, slot
            if value == 0:
                return False, slot
            slot = (slot + 1) & mask

    def _put(self, table: array[int], slot: int, high: int, low: int) -> None:
        if self._bits == 64:
            table[slot] = high
        else:
            table[2 * slot] = high
            table[2 * slot + 1] = low

    def _grown(self, table: array[int]) -> array[int]:
        words = self._bits // 64
        bigger: array[int] = array("Q", bytes(8 * words * self._slots(table) * 2))
        for index in range(0, len(table), words):
            high = table[index]
            if high:
                low = table[index + 1] if words == 2 else 0
                self._put(bigger, self._find(bigger, high, low)[1], high, low)
        return bigger
