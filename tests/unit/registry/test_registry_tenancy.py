"""Tenant scoping: another tenant's ids behave exactly like ids that do not exist, on every method."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from registry_helpers import TwoTenants, blob_digests, count_versions

from lorafleet.domain import AdapterVersion
from lorafleet.errors import NotFoundError
from lorafleet.registry import Registry
from lorafleet.store.blob import BlobStore
from lorafleet.store.sql.database import Database

MISSING = 987_654


@dataclass(frozen=True)
class World:
    """Tenant A's adapter with two versions (v1 live, v2 a child of v1) and tenant B's own adapter."""

    a_adapter: int
    v1: AdapterVersion
    v2: AdapterVersion
    b_adapter: int
    folder: Path


@pytest.fixture
def world(registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path]) -> World:
    a = registry.create_adapter(
        tenant_id=tenants.a, owner_user_id=tenants.a_user, name="chat", target_config={}
    )
    b = registry.create_adapter(
        tenant_id=tenants.b, owner_user_id=tenants.b_user, name="chat", target_config={}
    )
    v1 = registry.register_version(
        tenant_id=tenants.a, adapter_id=a.id, adapter_dir=make_adapter_dir(seed=1), base_fingerprint="fp"
    )
    v2 = registry.register_version(
        tenant_id=tenants.a,
        adapter_id=a.id,
        adapter_dir=make_adapter_dir(seed=2),
        base_fingerprint="fp",
        parents=[(v1.id, "continued-from")],
    )
    registry.promote(tenant_id=tenants.a, adapter_id=a.id, number=2, actor="qa")
    return World(a_adapter=a.id, v1=v1, v2=v2, b_adapter=b.id, folder=make_adapter_dir(seed=3))


def _calls(reg: Registry, w: World, tenants: TwoTenants, adapter: int, version: int, user: int) -> list[Any]:
    """Every tenant-scoped call, as tenant B, aimed at ``adapter``/``version``/``user``."""
    b = tenants.b
    return [
        lambda: reg.get_adapter(tenant_id=b, adapter_id=adapter),
        lambda: reg.list_adapters(tenant_id=b, owner_user_id=user),
        lambda: reg.create_adapter(tenant_id=b, owner_user_id=user, name="x", target_config={}),
        lambda: reg.get_or_create_adapter(tenant_id=b, owner_user_id=user, name="x", target_config={}),
        lambda: reg.get_version(tenant_id=b, adapter_id=adapter, number=1),
        lambda: reg.get_version_by_id(tenant_id=b, version_id=version),
        lambda: reg.list_versions(tenant_id=b, adapter_id=adapter),
        lambda: reg.live_version(tenant_id=b, adapter_id=adapter),
        lambda: reg.promote(tenant_id=b, adapter_id=adapter, number=1, actor="b"),
        lambda: reg.rollback(tenant_id=b, adapter_id=adapter, to_number=1, actor="b"),
        lambda: reg.rollback(tenant_id=b, adapter_id=adapter, to_number=None, actor="b"),
        lambda: reg.alias_history(tenant_id=b, adapter_id=adapter),
        lambda: reg.set_status(tenant_id=b, adapter_id=adapter, number=1, status="rejected"),
        lambda: reg.lineage(tenant_id=b, version_id=version),
        lambda: reg.register_version(
            tenant_id=b, adapter_id=adapter, adapter_dir=w.folder, base_fingerprint="fp"
        ),
        lambda: reg.register_version(
            tenant_id=b,
            adapter_id=w.b_adapter,
            adapter_dir=w.folder,
            base_fingerprint="fp",
            parents=[(version, "continued-from")],
        ),
    ]


def _message(call: Any) -> str:
    with pytest.raises(NotFoundError) as info:
        call()
    return re.sub(r"\d+", "<n>", str(info.value))


def test_foreign_ids_are_refused_like_missing_ones_and_nothing_changes(
    registry: Registry,
    database: Database,
    blob_store: BlobStore,
    tenants: TwoTenants,
    world: World,
) -> None:
    blobs_before, versions_before = blob_digests(blob_store), count_versions(database)
    w = world
    foreign = _calls(registry, w, tenants, w.a_adapter, w.v1.id, tenants.a_user)
    missing = _calls(registry, w, tenants, MISSING, MISSING, MISSING)
    for foreign_call, missing_call in zip(foreign, missing, strict=True):
        assert _message(foreign_call) == _message(missing_call)
    assert registry.find_adapter(tenant_id=tenants.b, owner_user_id=tenants.a_user, name="chat") is None

    # tenant A's state is untouched: live, statuses, history, versions and blobs
    live = registry.live_version(tenant_id=tenants.a, adapter_id=w.a_adapter)
    assert live is not None and live.id == w.v2.id
    assert [v.status for v in registry.list_versions(tenant_id=tenants.a, adapter_id=w.a_adapter)] == [
        "candidate",
        "live",
    ]
    assert len(registry.alias_history(tenant_id=tenants.a, adapter_id=w.a_adapter)) == 1
    assert count_versions(database) == versions_before and blob_digests(blob_store) == blobs_before
    assert registry.list_adapters(tenant_id=tenants.b) == [
        registry.get_adapter(tenant_id=tenants.b, adapter_id=w.b_adapter)
    ]
