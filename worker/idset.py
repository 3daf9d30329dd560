"""Sets and counts keyed by string, in flat memory: fingerprints in sorted arrays, not Python strings.

A `set[str]` costs ~100 bytes an entry (the str object and its slot), a `dict[str, int]` ~150; a file of a
million lines, or a sink of a million finished files, would hold 100+ MB just to remember names. These
tables keep a keyed BLAKE2b fingerprint per key in sorted `array('Q')` shards: 8 or 16 bytes a key (plus 8
for a count), with no empty slots. Lookups are a C-level binary search; an insert is a C-level memmove of
half a shard (256 shards: ~16 KB at a million keys). Arrays grow in small steps, so growing a table
leaves no large freed blocks behind (doubling hash tables left as much again in heap holes).

- 128-bit fingerprints are what resuming uses ("is this id already in the result file?", "is this file
  finished?"). A wrong answer would skip work, so the fingerprint is 128 bits: the odds that any two of a
  million keys share one are ~1e-27 — far below the odds of a memory error — exact in practice.
- 64-bit fingerprints are what duplicate detection inside an input file uses, where a collision (odds
  ~3e-8 at a million lines) is only a *suspect*: the parser confirms it against the file before calling a
  line a duplicate (see formats.BatchFileParser), so the answer is exact.
- A finished unit's input version (an ETag) is kept as a 64-bit fingerprint next to its count: it only has
  to tell "the same version" from "another one", and a changed input taken for unchanged has odds of 5e-20.

The key is random per process: fingerprints are never stored or compared across runs.
"""

from __future__ import annotations

import os
from array import array
from bisect import bisect_left
from hashlib import blake2b

SHARDS = 256


class _FingerprintTable:
    """Per shard, parallel arrays sorted by `high`: high word, low word (128 bits), value columns."""

    __slots__ = ("_high", "_key", "_len", "_low", "_values", "_wide")

    def __init__(self, *, bits: int, value_columns: int) -> None:
        if bits not in (64, 128):
            raise ValueError("bits must be 64 or 128")
        self._wide = bits == 128
        self._key = os.urandom(16)
        # Shards are created on first use: a set of one id stays small.
        self._high: list[array[int] | None] = [None] * SHARDS
        self._low: list[array[int] | None] | None = [None] * SHARDS if self._wide else None
        self._values: list[list[array[int] | None]] = [[None] * SHARDS for _ in range(value_columns)]
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def _digest(self, item: str, size: int) -> bytes:
        return blake2b(item.encode("utf-8", "surrogatepass"), digest_size=size, key=self._key).digest()

    def _fingerprint(self, item: str) -> tuple[int, int, int]:
        digest = self._digest(item, 17 if self._wide else 9)
        low = int.from_bytes(digest[9:17], "little") if self._wide else 0
        return digest[0], int.from_bytes(digest[1:9], "little"), low

    def _locate(self, shard: int, high: int, low: int) -> tuple[bool, int]:
        """(found, index): where the fingerprint is in its shard, or where it would be inserted."""
        highs = self._high[shard]
        if highs is None:
            return False, 0
        index = bisect_left(highs, high)
        if self._low is None:
            return index < len(highs) and highs[index] == high, index
        lows = self._low[shard]
        assert lows is not None
        while index < len(highs) and highs[index] == high:  # equal high words: ~never, but exact
            if lows[index] == low:
                return True, index
            index += 1
        return False, index

    def _insert(self, item: str, *values: int) -> bool:
        """Store the item's fingerprint (and values); True when the fingerprint was not there before."""
        shard, high, low = self._fingerprint(item)
        found, index = self._locate(shard, high, low)
        if found:
            for column, value in zip(self._values, values, strict=True):
                self._column(column, shard)[index] = value
            return False
        self._column(self._high, shard).insert(index, high)
        if self._low is not None:
            self._column(self._low, shard).insert(index, low)
        for column, value in zip(self._values, values, strict=True):
            self._column(column, shard).insert(index, value)
        self._len += 1
        return True

    def _lookup(self, item: str) -> tuple[int, int] | None:
        """(shard, index) of the item's fingerprint, or None."""
        shard, high, low = self._fingerprint(item)
        found, index = self._locate(shard, high, low)
        return (shard, index) if found else None

    @staticmethod
    def _column(columns: list[array[int] | None], shard: int) -> array[int]:
        column = columns[shard]
        if column is None:
            column = columns[shard] = array("Q")
        return column

    def nbytes(self) -> int:
        """Bytes held by the fingerprint arrays (not counting their small fixed headers)."""
        columns = [self._high, self._low or [], *self._values]
        return sum(len(column) * column.itemsize for shards in columns for column in shards if column)


class FingerprintSet(_FingerprintTable):
    """A grow-only set of strings, remembered by fingerprint. `add` says whether the key was new."""

    __slots__ = ()

    def __init__(self, *, bits: int = 128) -> None:
        super().__init__(bits=bits, value_columns=0)

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and self._lookup(item) is not None

    def add(self, item: str) -> bool:
        """Remember `item`; True when it was not there before."""
        return self._insert(item)


class FingerprintCounts(_FingerprintTable):
    """A grow-only map from string to a non-negative count and the version it was counted at.

    Keys are 128-bit fingerprints; a version is kept as a 64-bit fingerprint (0: none recorded), which can
    only say whether a later version string is the same one.
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(bits=128, value_columns=2)

    def put(self, item: str, count: int, version: str | None = None) -> None:
        """Remember `item` → `count` at `version` (None or "" = unknown: never reported as changed)."""
        if count < 0:
            raise ValueError("counts are non-negative")
        self._insert(item, count, self._version(version))

    def get(self, item: str) -> int | None:
        """The item's count, or None when it is not there."""
        return self._value(item, 0)

    def changed(self, item: str, version: str) -> bool:
        """Whether `item` was recorded at a known version other than `version`."""
        recorded = self._value(item, 1)
        current = self._version(version)
        return bool(recorded and current and recorded != current)

    def _version(self, version: str | None) -> int:
        if not version:
            return 0
        return int.from_bytes(self._digest(version, 8), "little") or 1

    def _value(self, item: str, column: int) -> int | None:
        where = self._lookup(item)
        if where is None:
            return None
        shard, index = where
        values = self._values[column][shard]
        assert values is not None  # a found key has its value columns
        return values[index]
