"""Fixtures for the registry tests: two tenants inserted directly, adapter folders, and a ``Registry``
over the real ``database`` and ``blob_store`` fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from registry_helpers import RegistryEnv, TwoTenants, write_adapter_dir

from lorafleet.registry import Registry
from lorafleet.store.blob import BlobStore, open_blob_store
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlTenant, SqlUser


@pytest.fixture
def make_adapter_dir(tmp_path: Path) -> Callable[..., Path]:
    """``make_adapter_dir(seed=..., ...)`` builds a fresh folder under the test's tmp dir."""
    counter = iter(range(1_000_000))

    def make(**kwargs: Any) -> Path:
        return write_adapter_dir(tmp_path / f"adapter-{next(counter)}", **kwargs)

    return make


@pytest.fixture
def tenants(database: Database) -> TwoTenants:
    with database.session() as s:
        a, b = SqlTenant(name="tenant-a"), SqlTenant(name="tenant-b")
        s.add_all([a, b])
        s.flush()
        a_user, b_user = (
            SqlUser(tenant_id=a.id, external_id="alice"),
            SqlUser(tenant_id=b.id, external_id="bob"),
        )
        s.add_all([a_user, b_user])
        s.flush()
        return TwoTenants(a=a.id, a_user=a_user.id, b=b.id, b_user=b_user.id)


@pytest.fixture
def registry(database: Database, blob_store: BlobStore) -> Registry:
    """Over both databases and both blob stores (local directory, S3 over HTTP)."""
    return Registry(database, blob_store)


@pytest.fixture
def local_blobs(tmp_path: Path) -> BlobStore:
    return open_blob_store((tmp_path / "local-blobs").as_uri())


@pytest.fixture
def local_registry(database: Database, local_blobs: BlobStore) -> Registry:
    """Over both databases and the local blob store, for tests about SQL behaviour only."""
    return Registry(database, local_blobs)


@pytest.fixture
def env(
    database: Database, local_registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path]
) -> RegistryEnv:
    """``database``, ``local_registry``, ``tenants`` and ``make_adapter_dir`` in one."""
    return RegistryEnv(database, local_registry, tenants, make_adapter_dir)
