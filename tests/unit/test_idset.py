import pytest

from worker.idset import SHARDS, FingerprintCounts, FingerprintSet


@pytest.mark.parametrize("bits", [64, 128])
def test_remembers_every_id_and_reports_repeats(bits: int) -> None:
    ids = FingerprintSet(bits=bits)
    count = 50 * SHARDS  # every shard grows several times
    assert all(ids.add(f"item-{n:07d}") for n in range(count))
    assert len(ids) == count
    assert all(f"item-{n:07d}" in ids for n in range(count))
    assert not any(ids.add(f"item-{n:07d}") for n in range(0, count, 7))
    assert len(ids) == count
    assert sum(f"other-{n}" in ids for n in range(count)) == 0


def test_odd_strings_and_non_strings() -> None:
    ids = FingerprintSet()
    for item in ["", " ", "é", "\ud800", "a" * 10_000]:
        assert ids.add(item)
        assert item in ids
    assert 1 not in ids
    assert None not in ids
    for item in ["x", "y", "x"]:
        ids.add(item)
    assert len(ids) == 7


@pytest.mark.parametrize(("bits", "per_id"), [(64, 8), (128, 16)])
def test_memory_is_the_fingerprint_and_nothing_else(bits: int, per_id: int) -> None:
    ids = FingerprintSet(bits=bits)
    for n in range(100_000):
        ids.add(f"custom-id-{n}")
    assert ids.nbytes() == 100_000 * per_id
    counts = FingerprintCounts()
    for n in range(1000):
        counts.put(f"f{n}", n, f"etag-{n}")
    assert counts.nbytes() == 1000 * 32  # the key, the count, the version


def test_only_64_or_128_bits() -> None:
    with pytest.raises(ValueError, match="64 or 128"):
        FingerprintSet(bits=32)


def test_counts_keep_their_values_through_growth_and_overwrite() -> None:
    counts = FingerprintCounts()
    total = 30 * SHARDS
    for n in range(total):
        counts.put(f"dir/file-{n}.txt.results.jsonl", n * 3)
    counts.put("dir/file-5.txt.results.jsonl", 99)
    assert len(counts) == total
    assert counts.get("dir/file-5.txt.results.jsonl") == 99
    assert all(counts.get(f"dir/file-{n}.txt.results.jsonl") == n * 3 for n in range(total) if n != 5)
    assert counts.get("dir/file-0.txt") is None
    with pytest.raises(ValueError, match="non-negative"):
        counts.put("x", -1)


def test_a_version_tells_same_from_changed_and_none_recorded_is_unchanged() -> None:
    counts = FingerprintCounts()
    counts.put("a", 3, '"0x8DC1"')
    counts.put("old", 2)  # a marker written before versions were recorded
    counts.put("b", 1, "10-1700000000000000000")
    assert counts.get("a") == 3
    assert not counts.changed("a", '"0x8DC1"')
    assert counts.changed("a", '"0x8DC2"')
    assert not counts.changed("old", "anything")
    assert not counts.changed("a", "")  # the source did not say
    assert counts.changed("b", "13-1700000000000000000")
    assert not counts.changed("missing", "v")
    counts.put("a", 4, '"0x8DC2"')
    assert (counts.get("a"), counts.changed("a", '"0x8DC2"')) == (4, False)


def test_an_empty_or_tiny_set_allocates_almost_nothing() -> None:
    ids = FingerprintSet()
    assert "x" not in ids
    assert ids.nbytes() == 0
    ids.add("x")
    assert ids.nbytes() == 16
    assert sum(shard is not None for shard in ids._high) == 1
