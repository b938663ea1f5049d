"""The adapter cache's host tier: a slot miss on a version held in host memory is a copy, not a store read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from serving_helpers import FolderFetcher, touch

from lorafleet.adapters import AdapterBank
from lorafleet.config import Settings
from lorafleet.registry import Registry
from lorafleet.routing.experts import Expert
from lorafleet.serving.cache import AdapterCache, HostTier
from lorafleet.serving.factory import DEFAULT_HOST_ADAPTERS, DEFAULT_HOST_BYTES, build_engine
from lorafleet.store.blob import open_blob_store
from lorafleet.store.sql.database import Database


def test_a_slot_miss_in_the_host_tier_is_served_without_a_fetch(
    bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher
) -> None:
    cache = AdapterCache(bank, fetch=fetcher, capacity_slots=2, host_entries=10)
    a, b, c = members[:3]
    slot_a = touch(cache, a)
    from_store = bank.slot_state_dict(slot_a)
    for m in (b, c, a):  # c evicts a from its slot; a comes back from host memory
        touch(cache, m)
    stats = cache.stats()
    assert len(fetcher.calls) == 3 and fetcher.calls.count(a.sha256) == 1
    assert (stats.misses, stats.host_hits, stats.loads, stats.hits) == (4, 1, 4, 0)
    assert (stats.host_entries, stats.host_capacity_entries) == (3, 10)
    assert stats.host_bytes == sum(t.numel() * t.element_size() for t in from_store.values()) * 3
    assert stats.tiered_hit_rate == pytest.approx(1 / 4) and stats.hit_rate == 0.0
    again = bank.slot_state_dict(cache.slot_of(a.sha256) or 0)
    assert again.keys() == from_store.keys()
    assert all(torch.equal(again[k], from_store[k]) for k in again)  # the very same weights
    assert bank.slot_info(cache.slot_of(a.sha256) or 0).config.name == a.sha256  # type: ignore[union-attr]


def test_the_host_tier_is_lru_by_count_and_by_bytes(
    bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher
) -> None:
    cache = AdapterCache(bank, fetch=fetcher, capacity_slots=1, host_entries=2)
    a, b, c = members[:3]
    for m in (a, b, c, b, a):  # host holds b, c after c; b is a host hit; a was evicted from host: fetched
        touch(cache, m)
    assert fetcher.calls == [a.sha256, b.sha256, c.sha256, a.sha256]
    stats = cache.stats()
    assert (stats.host_hits, stats.host_evictions, stats.host_entries) == (1, 2, 2)

    one = stats.host_bytes // 2
    tier = HostTier(100, max_bytes=one + one // 2)  # room for one version only
    held = {k: v for k, v in bank.slot_state_dict(cache.slot_of(a.sha256) or 0).items()}
    config = bank.slot_info(cache.slot_of(a.sha256) or 0).config  # type: ignore[union-attr]
    assert tier.put("x", held, config) and tier.put("y", held, config)
    assert "x" not in tier and "y" in tier and (len(tier), tier.nbytes, tier.evictions) == (1, one, 1)
    assert not HostTier(1, max_bytes=one - 1).put("z", held, config)  # larger than the whole budget


def test_without_a_host_tier_every_slot_miss_reads_the_store(
    bank: AdapterBank, members: list[Expert], fetcher: FolderFetcher
) -> None:
    cache = AdapterCache(bank, fetch=fetcher, capacity_slots=1)
    a, b = members[:2]
    for m in (a, b, a):
        touch(cache, m)
    stats = cache.stats()
    assert len(fetcher.calls) == 3 and cache.host is None
    assert (stats.host_hits, stats.host_capacity_entries, stats.tiered_hit_rate) == (0, 0, 0.0)


def test_build_engine_gives_the_service_a_host_tier_and_the_serving_dtype(
    tiny_dir: Path, sqlite_database: Database, tmp_path: Path
) -> None:
    db = sqlite_database
    registry = Registry(db, open_blob_store((tmp_path / "blobs").as_uri()))
    settings = Settings(backbone=str(tiny_dir), device="cpu", data_dir=tmp_path)
    engine = build_engine(settings, db, registry, quantization="fp32", n_slots=2, max_rank=4)
    stats = engine.cache.stats()
    assert (stats.host_capacity_entries, stats.host_capacity_bytes) == (
        DEFAULT_HOST_ADAPTERS,
        DEFAULT_HOST_BYTES,
    )
    assert engine.bank.dtype == torch.float32  # serving_dtype on CPU
    small = build_engine(settings, db, registry, quantization="fp32", n_slots=2, max_rank=4, host_adapters=0)
    assert small.cache.host is None
