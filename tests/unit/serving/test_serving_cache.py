"""The adapter cache: exact LRU eviction order, byte budget, pinning, single-flight loads, failures, counters."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from serving_helpers import FolderFetcher, touch

from lorafleet.adapters import AdapterBank, SlotConfig
from lorafleet.errors import AdapterFormatError, BlobIntegrityError, CapacityError, ValidationError
from lorafleet.routing.experts import Expert
from lorafleet.serving import AdapterCache
from lorafleet.serving.metrics import ServingMetrics, prometheus_text


def test_eviction_order_is_exact_lru(
    bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher
) -> None:
    cache = AdapterCache(bank, fetch=fetcher, capacity_slots=3)
    a, b, c, d, e = members
    evicted: list[str] = []
    names = {m.sha256: n for m, n in zip(members, "abcde", strict=True)}

    def access(m: Expert) -> None:
        before = set(cache.keys())
        touch(cache, m)
        evicted.extend(sorted(names[k] for k in before - set(cache.keys())))

    for m in (a, b, c, a, d, b, e, c, a):
        access(m)
    # a b c | a (hit) | d evicts b | b evicts c | e evicts a | c evicts d | a evicts b
    assert evicted == ["b", "c", "a", "d", "b"]
    assert [names[k] for k in cache.keys()] == ["e", "c", "a"]  # least recently used first
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.loads) == (1, 8, 5, 8)
    assert len(fetcher.calls) == 8
    # the bank holds exactly the cached versions, each slot labelled with its sha256
    held = {info.config.name for info in bank.occupied().values()}
    assert held == set(cache.keys())


def test_slots_are_keyed_by_content_hash(
    bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher
) -> None:
    cache = AdapterCache(bank, fetch=fetcher, capacity_slots=3)
    a = members[0]
    same_bytes = Expert(**{**a.__dict__, "adapter_id": 99, "version_id": 999, "version_number": 7})
    with cache.acquire([a, same_bytes]) as lease:
        assert list(lease.slots) == [a.sha256]
    assert cache.stats().misses == 1 and len(fetcher.calls) == 1


def test_byte_capacity_evicts_until_the_version_fits(
    bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher
) -> None:
    size = members[0].size_bytes
    assert all(m.size_bytes == size for m in members)  # same shapes, same archive size
    cache = AdapterCache(bank, fetch=fetcher, capacity_bytes=2 * size + size // 2)
    a, b, c = members[:3]
    touch(cache, a)
    touch(cache, b)
    touch(cache, c)  # only two fit: a (LRU) goes
    assert cache.keys() == [b.sha256, c.sha256]
    assert cache.stats().bytes_used == 2 * size
    big = Expert(**{**members[3].__dict__, "size_bytes": 3 * size})
    with pytest.raises(CapacityError, match="above the cache's capacity"):
        cache.acquire([big])
    assert cache.keys() == [b.sha256, c.sha256]  # nothing was evicted for a version that can never fit


def test_pinned_slots_are_never_evicted(
    bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher
) -> None:
    cache = AdapterCache(bank, fetch=fetcher, capacity_slots=2)
    a, b, c, _, _ = members
    with cache.acquire([a, b]) as lease:
        assert cache.stats().pinned == 2
        with pytest.raises(CapacityError, match="pinned"):
            cache.acquire([c])
        assert set(cache.keys()) == {a.sha256, b.sha256}
        slots = dict(lease.slots)
        with cache.acquire([a]) as inner:  # a second batch may share a pinned version
            assert inner.slots[a.sha256] == slots[a.sha256]
        with pytest.raises(CapacityError):
            cache.acquire([c])  # a is still pinned by the outer lease
    assert cache.stats().pinned == 0
    touch(cache, c)  # now the least recently used unpinned entry (b) goes
    assert set(cache.keys()) == {a.sha256, c.sha256}


def test_strict_acquire_releases_what_it_pinned(
    bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher
) -> None:
    cache = AdapterCache(bank, fetch=fetcher, capacity_slots=2)
    a, b, c, _, _ = members
    with cache.acquire([a]):
        with pytest.raises(CapacityError):
            cache.acquire([b, c])  # b is loaded and pinned, then c finds a and b pinned
        assert cache.stats().pinned == 1
        lease = cache.acquire([b, c], strict=False)
        assert list(lease.slots) == [b.sha256] and isinstance(lease.errors[c.sha256], CapacityError)
        lease.release()
        lease.release()  # idempotent
    assert cache.stats().pinned == 0


def test_concurrent_requests_for_one_version_load_it_once(
    bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher
) -> None:
    a = members[0]
    release = fetcher.hold[a.sha256] = threading.Event()
    cache = AdapterCache(bank, fetch=fetcher, capacity_slots=4)
    slots: list[int] = []
    errors: list[BaseException] = []
    started = threading.Barrier(9)

    def worker() -> None:
        started.wait()
        try:
            with cache.acquire([a]) as lease:
                slots.append(lease.slots[a.sha256])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait()
    while cache.stats().misses + cache.stats().coalesced < 8:  # everyone is in: one loads, seven wait
        threading.Event().wait(0.005)
    assert cache.stats().pinned == 1 and cache.slot_of(a.sha256) is None  # reserved, still loading
    other = cache.acquire([members[1]])  # another key loads meanwhile: no lock is held during a fetch
    release.set()
    for t in threads:
        t.join(timeout=10)
    other.release()
    assert not errors and len(set(slots)) == 1 and len(slots) == 8
    stats = cache.stats()
    assert fetcher.calls.count(a.sha256) == 1
    assert (stats.misses, stats.coalesced, stats.loads) == (2, 7, 2)
    assert len(stats.load_seconds) == 2 and stats.pinned == 0


def test_a_corrupted_version_is_refused_and_no_slot_is_filled(
    bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher, tmp_path: Path
) -> None:
    a, b = members[:2]
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in fetcher.folders[a.sha256].iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    weights = tampered / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit in the last tensor value
    weights.write_bytes(bytes(data))
    fetcher.folders[a.sha256] = tampered
    cache = AdapterCache(bank, fetch=fetcher, capacity_slots=3)
    occupied_before = bank.occupied()
    with pytest.raises(BlobIntegrityError, match="expected"):
        cache.acquire([a])
    assert bank.occupied() == occupied_before and cache.keys() == []
    lease = cache.acquire([a, b], strict=False)
    assert isinstance(lease.errors[a.sha256], BlobIntegrityError) and b.sha256 in lease.slots
    lease.release()
    stats = cache.stats()
    assert (stats.load_failures, stats.loads, stats.slots_used, stats.bytes_used) == (2, 1, 1, b.size_bytes)
    assert list(bank.occupied()) == [lease.slots[b.sha256]]


def test_a_failed_load_reaches_every_waiter_and_can_be_retried(
    bank: AdapterBank, members: list[Expert], tmp_path: Path, fetcher: FolderFetcher
) -> None:
    a = members[0]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    good = fetcher.folders[a.sha256]
    fetcher.folders[a.sha256] = broken
    cache = AdapterCache(bank, fetch=fetcher, capacity_slots=2, verify=False)
    with pytest.raises(AdapterFormatError):
        cache.acquire([a])
    fetcher.folders[a.sha256] = good
    assert touch(cache, a) >= 0
    assert cache.stats().load_failures == 1 and cache.stats().loads == 1


def test_stats_and_prometheus_text(bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher) -> None:
    cache = AdapterCache(bank, fetch=fetcher, capacity_slots=2, capacity_bytes=10**9)
    for m in (members[0], members[0], members[1], members[2]):
        touch(cache, m)
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions) == (1, 3, 1)
    assert stats.hit_rate == pytest.approx(0.25)
    assert stats.load_seconds_total == pytest.approx(sum(stats.load_seconds)) and stats.load_seconds_total > 0
    text = prometheus_text(ServingMetrics(), stats)
    assert "lorafleet_adapter_cache_hits_total 1\n" in text
    assert "lorafleet_adapter_cache_evictions_total 1\n" in text
    assert "lorafleet_adapter_cache_slots_capacity 2\n" in text


def test_cache_uses_only_slots_that_were_empty(
    bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher
) -> None:
    bank.init_slot(0, SlotConfig(rank=2, alpha=4.0))  # e.g. a slot a trainer uses
    cache = AdapterCache(bank, fetch=fetcher)
    assert cache.capacity_slots == bank.n_slots - 1
    for m in members:
        assert touch(cache, m) != 0
    assert bank.slot_info(0) is not None and bank.slot_info(0).config.name is None


def test_a_bad_digest_fails_alone(bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher) -> None:
    cache = AdapterCache(bank, fetch=fetcher, capacity_slots=2)
    bad = Expert(**{**members[0].__dict__, "sha256": "../../etc/passwd"})
    with cache.acquire([members[1], bad], strict=False) as lease:
        assert isinstance(lease.errors[bad.sha256], ValidationError) and members[1].sha256 in lease.slots
    with pytest.raises(ValidationError):
        cache.acquire([members[1], bad])
    assert cache.stats().pinned == 0 and fetcher.calls == [members[1].sha256]
