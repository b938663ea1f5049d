"""Concurrency: gap-free numbers under concurrent registration, and alias moves racing readers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from registry_helpers import TwoTenants, version_count

from lorafleet.domain import AdapterVersion
from lorafleet.errors import LorafleetError
from lorafleet.registry import Registry
from lorafleet.store.blob import BlobStore
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlTenant, SqlUser


def _register_concurrently(
    registry: Registry, *, tenant_id: int, adapter_id: int, folders: list[Path]
) -> list[int]:
    start = threading.Barrier(len(folders))

    def register(folder: Path) -> int:
        start.wait()
        return registry.register_version(
            tenant_id=tenant_id, adapter_id=adapter_id, adapter_dir=folder, base_fingerprint="fp"
        ).number

    with ThreadPoolExecutor(max_workers=len(folders)) as pool:
        return list(pool.map(register, folders))


@pytest.mark.postgres
def test_fifty_concurrent_registrations_get_numbers_one_to_fifty_on_postgresql(
    pg_database: Database, local_blobs: BlobStore, make_adapter_dir: Callable[..., Path]
) -> None:
    with pg_database.session() as s:
        tenant = SqlTenant(name="t")
        s.add(tenant)
        s.flush()
        tenant_id = tenant.id
    registry = Registry(pg_database, local_blobs)
    adapter = registry.create_adapter(tenant_id=tenant_id, owner_user_id=None, name="task", target_config={})
    folders = [make_adapter_dir(seed=i) for i in range(50)]
    numbers = _register_concurrently(registry, tenant_id=tenant_id, adapter_id=adapter.id, folders=folders)
    assert sorted(numbers) == list(range(1, 51))
    listed = registry.list_versions(tenant_id=tenant_id, adapter_id=adapter.id)
    assert [v.number for v in listed] == list(range(1, 51))
    assert version_count(pg_database, adapter.id) == 50


def test_concurrent_registrations_are_gap_free_on_both_databases(
    local_registry: Registry, database: Database, tenants: TwoTenants, make_adapter_dir: Callable[..., Path]
) -> None:
    adapter = local_registry.create_adapter(
        tenant_id=tenants.a, owner_user_id=None, name="t", target_config={}
    )
    folders = [make_adapter_dir(seed=i % 3) for i in range(12)]  # same content shares one blob
    numbers = _register_concurrently(
        local_registry, tenant_id=tenants.a, adapter_id=adapter.id, folders=folders
    )
    assert sorted(numbers) == list(range(1, 13))
    assert version_count(database, adapter.id) == 12


def test_alias_moves_interleaved_with_reads_always_see_a_complete_version(
    registry: Registry,
    blob_store: BlobStore,
    tenants: TwoTenants,
    make_adapter_dir: Callable[..., Path],
) -> None:
    """100 promotes cycle over 4 versions while a reader does 1,000 lookups: each read is a whole version
    row that is live, one of the registered ones, and whose blob exists and verifies."""
    t = tenants.a
    adapter = registry.create_adapter(
        tenant_id=t, owner_user_id=tenants.a_user, name="chat", target_config={}
    )
    registered: dict[int, AdapterVersion] = {}
    for i in range(4):
        v = registry.register_version(
            tenant_id=t, adapter_id=adapter.id, adapter_dir=make_adapter_dir(seed=i), base_fingerprint="fp"
        )
        registered[v.id] = v
    registry.promote(tenant_id=t, adapter_id=adapter.id, number=1, actor="setup")
    seen: set[int] = set()
    failures: list[str] = []
    reads: list[int] = []

    def read() -> None:
        for i in range(1000):
            live = registry.live_version(tenant_id=t, adapter_id=adapter.id)
            reads.append(i)
            if live is None or live.id not in registered or live.status != "live":
                failures.append(f"read {i}: {live!r}")
                continue
            expected = registered[live.id]
            if (live.sha256, live.size_bytes, live.number) != (
                expected.sha256,
                expected.size_bytes,
                expected.number,
            ):
                failures.append(f"read {i}: fields differ from the registered row: {live!r}")
            try:
                blob_store.get_bytes(live.sha256, expected_size=live.size_bytes)
            except LorafleetError as exc:
                failures.append(f"read {i}: blob {live.sha256}: {exc}")
            seen.add(live.number)

    reader = threading.Thread(target=read)
    reader.start()
    for move in range(100):
        while len(reads) < 10 * move and reader.is_alive():  # pace the moves across the reads
            time.sleep(0.0005)
        registry.promote(tenant_id=t, adapter_id=adapter.id, number=(move + 1) % 4 + 1, actor=f"mover-{move}")
    reader.join(timeout=300)
    assert not reader.is_alive() and failures == []
    assert seen == {1, 2, 3, 4}  # the reads really interleaved with the moves

    history = registry.alias_history(tenant_id=t, adapter_id=adapter.id)
    assert len(history) == 101
    for before, after in zip(history, history[1:], strict=False):
        assert after.from_version_id == before.to_version_id
    live = [v for v in registry.list_versions(tenant_id=t, adapter_id=adapter.id) if v.status == "live"]
    assert len(live) == 1 and live[0].id == history[-1].to_version_id


def test_concurrent_adapter_creation_yields_one_adapter(database: Database, local_registry: Registry) -> None:
    with database.session() as s:
        tenant = SqlTenant(name="t")
        s.add(tenant)
        s.flush()
        user = SqlUser(tenant_id=tenant.id, external_id="u")
        s.add(user)
        s.flush()
        tenant_id, user_id = tenant.id, user.id
    start = threading.Barrier(8)

    def create(_: int) -> int:
        start.wait()
        return local_registry.get_or_create_adapter(
            tenant_id=tenant_id, owner_user_id=user_id, name="chat", target_config={}
        ).id

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = set(pool.map(create, range(8)))
    assert len(ids) == 1
