"""Sets and counts keyed by string, in flat memory: fingerprints in open-addressed arrays, not Python strings.

A `set[str]` costs ~100 bytes an entry (the str object and its slot), a `dict[str, int]` ~150; a file of a
million lines, or a sink of a million finished files, would hold 100+ MB just to remember names. These
tables keep a keyed BLAKE2b fingerprint per key in `array('Q')` shards: 8 or 16 bytes a key (plus 8 for a
count), times the load factor (between 3/8 and 3/4 full).

- 128-bit fingerprints are what resuming uses ("is this id already in the result file?", "is this file
  finished?"). A wrong answer would skip work, so the fingerprint is 128 bits: the odds that any two of a
  million keys share one are ~1e-27 — far below the odds of a memory error — exact in practice.
- 64-bit fingerprints are what duplicate detection inside an input file uses, where a collision (odds
  ~3e-8 at a million lines) is only a *suspect*: the parser confirms it against the file before calling a
  line a duplicate (see formats.BatchFileParser), so the answer is exact.

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


class _FingerprintTable:
    """Slot i of a shard is words [i*stride, (i+1)*stride): high, (low), (value). All-zero high = empty."""

    __slots__ = ("_bits", "_counts", "_key", "_key_words", "_len", "_shards", "_stride")

    def __init__(self, *, bits: int, with_values: bool) -> None:
        if bits not in (64, 128):
            raise ValueError("bits must be 64 or 128")
        self._bits = bits
        self._key_words = bits // 64
        self._stride = self._key_words + (1 if with_values else 0)
        self._key = os.urandom(16)
        self._shards: list[array[int] | None] = [None] * SHARDS  # created on first use: small sets stay small
        self._counts = [0] * SHARDS
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _fingerprint(self, item: str) -> tuple[int, int, int]:
        digest = blake2b(item.encode("utf-8", "surrogatepass"), digest_size=17, key=self._key).digest()
        high = int.from_bytes(digest[1:9], "little") or 1  # never zero: zero marks an empty slot
        low = int.from_bytes(digest[9:17], "little") if self._bits == 128 else 0
        return digest[0], high, low

    def _find(self, table: array[int], high: int, low: int) -> tuple[bool, int]:
        """(found, index of the slot's first word): where the fingerprint is, or the empty slot for it."""
        stride = self._stride
        mask = len(table) // stride - 1
        slot = (high >> 8) & mask
        two_words = self._key_words == 2
        while True:
            index = slot * stride
            value = table[index]
            if value == high and (not two_words or table[index + 1] == low):
                return True, index
            if value == 0:
                return False, index
            slot = (slot + 1) & mask

    def _insert(self, item: str, value: int) -> bool:
        """Store the item's fingerprint (and value); True when the fingerprint was not there before."""
        shard, high, low = self._fingerprint(item)
        table = self._shards[shard]
        if table is None:
            table = self._shards[shard] = array("Q", bytes(8 * self._stride * _INITIAL_SLOTS))
        found, index = self._find(table, high, low)
        if self._stride > self._key_words:
            table[index + self._key_words] = value
        if found:
            return False
        table[index] = high
        if self._key_words == 2:
            table[index + 1] = low
        self._counts[shard] += 1
        self._len += 1
        if self._counts[shard] * _MAX_LOAD_DENOMINATOR > len(table) // self._stride * _MAX_LOAD_NUMERATOR:
            self._shards[shard] = self._grown(table)
        return True

    def _lookup(self, item: str) -> tuple[array[int], int] | None:
        """The shard holding the item and the index of its slot, or None."""
        shard, high, low = self._fingerprint(item)
        table = self._shards[shard]
        if table is None:
            return None
        found, index = self._find(table, high, low)
        return (table, index) if found else None

    def _grown(self, table: array[int]) -> array[int]:
        stride = self._stride
        bigger: array[int] = array("Q", bytes(8 * len(table) * 2))
        for index in range(0, len(table), stride):
            high = table[index]
            if high:
                low = table[index + 1] if self._key_words == 2 else 0
                _, target = self._find(bigger, high, low)
                bigger[target : target + stride] = table[index : index + stride]
        return bigger


class FingerprintSet(_FingerprintTable):
    """A grow-only set of strings, remembered by fingerprint. `add` says whether the key was new."""

    __slots__ = ()

    def __init__(self, *, bits: int = 128) -> None:
        super().__init__(bits=bits, with_values=False)

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and self._lookup(item) is not None

    def add(self, item: str) -> bool:
        """Remember `item`; True when it was not there before."""
        return self._insert(item, 0)

    def update(self, items: Iterable[str]) -> None:
        for item in items:
            self.add(item)


class FingerprintCounts(_FingerprintTable):
    """A grow-only map from string to a non-negative count, keyed by 128-bit fingerprint."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(bits=128, with_values=True)

    def __setitem__(self, item: str, count: int) -> None:
        if count < 0:
            raise ValueError("counts are non-negative")
        self._insert(item, count)

    def get(self, item: str) -> int | None:
        where = self._lookup(item)
        if where is None:
            return None
        table, index = where
        return table[index + self._key_words]
