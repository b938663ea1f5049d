"""TenantRepository on SQLite and PostgreSQL: hashed API keys, authentication, users per tenant."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from tests.databases import writer_holding_the_lock

from lorafleet.domain import User
from lorafleet.errors import AlreadyExistsError, AuthError, NotFoundError, ValidationError
from lorafleet.store.sql import tenants as tenants_module
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlApiKey, SqlUser
from lorafleet.store.sql.tenants import TenantRepository


@pytest.fixture
def tenants(database: Database) -> TenantRepository:
    return TenantRepository(database)


def _api_key_rows(db: Database) -> list[tuple[object, ...]]:
    with db.session() as session:
        return [tuple(row) for row in session.execute(select(SqlApiKey.__table__))]


def test_api_key_is_stored_only_as_hash_and_prefix(tenants: TenantRepository, database: Database) -> None:
    tenant, api_key = tenants.create_tenant(name="acme")
    second = tenants.create_api_key(tenant_id=tenant.id)

    rows = _api_key_rows(database)
    assert len(rows) == 2
    for key in (api_key, second):
        assert not [row for row in rows if any(key in str(value) for value in row)]
    with database.session() as session:
        stored = session.scalars(select(SqlApiKey).order_by(SqlApiKey.id)).all()
        assert [row.key_hash for row in stored] == [
            hashlib.sha256(k.encode()).hexdigest() for k in (api_key, second)
        ]
        assert [row.prefix for row in stored] == [api_key[:11], second[:11]]
    assert api_key != second and len(api_key) > 40


def test_authenticate_accepts_active_keys_only(tenants: TenantRepository) -> None:
    tenant, api_key = tenants.create_tenant(name="acme")
    other, other_key = tenants.create_tenant(name="globex")
    rotated = tenants.create_api_key(tenant_id=tenant.id)

    assert tenants.authenticate(api_key=api_key) == tenant
    assert tenants.authenticate(api_key=rotated) == tenant
    assert tenants.authenticate(api_key=other_key) == other

    tenants.revoke_api_key(api_key=api_key)
    tenants.revoke_api_key(api_key=api_key)  # idempotent
    with pytest.raises(AuthError, match="revoked"):
        tenants.authenticate(api_key=api_key)
    assert tenants.authenticate(api_key=rotated) == tenant

    for bad in ("lf_unknown-key", api_key + "x", "", "Bearer " + rotated):
        with pytest.raises(AuthError):
            tenants.authenticate(api_key=bad)
    with pytest.raises(NotFoundError):
        tenants.revoke_api_key(api_key="lf_never-issued")


def test_tenant_lookup_and_unique_names(tenants: TenantRepository) -> None:
    acme, _ = tenants.create_tenant(name="acme")
    globex, _ = tenants.create_tenant(name="globex")
    with pytest.raises(AlreadyExistsError):
        tenants.create_tenant(name="acme")

    assert tenants.get_tenant(tenant_id=acme.id) == acme
    assert tenants.get_tenant(name="globex") == globex
    assert tenants.list_tenants() == [acme, globex]
    assert tenants.list_tenants(limit=1, offset=1) == [globex]
    with pytest.raises(NotFoundError):
        tenants.get_tenant(name="initech")
    with pytest.raises(NotFoundError):
        tenants.create_api_key(tenant_id=globex.id + 100)
    with pytest.raises(ValidationError):
        tenants.get_tenant()
    for bad_name in ("", "   ", "x" * 129, "tab\there"):
        with pytest.raises(ValidationError):
            tenants.create_tenant(name=bad_name)


def test_users_are_unique_per_tenant_and_never_leak(tenants: TenantRepository) -> None:
    acme, _ = tenants.create_tenant(name="acme")
    globex, _ = tenants.create_tenant(name="globex")

    alice = tenants.get_or_create_user(tenant_id=acme.id, external_id="alice")
    assert tenants.get_or_create_user(tenant_id=acme.id, external_id="alice") == alice
    assert tenants.get_user(tenant_id=acme.id, external_id="alice") == alice
    other_alice = tenants.get_or_create_user(tenant_id=globex.id, external_id="alice")
    assert other_alice.id != alice.id and other_alice.tenant_id == globex.id

    bob = tenants.get_or_create_user(tenant_id=acme.id, external_id="bob")
    with pytest.raises(NotFoundError):
        tenants.get_user(tenant_id=globex.id, external_id="bob")
    assert tenants.list_users(tenant_id=acme.id) == [alice, bob]
    assert tenants.list_users(tenant_id=acme.id, limit=1, offset=1) == [bob]
    assert tenants.list_users(tenant_id=globex.id) == [other_alice]
    with pytest.raises(NotFoundError):
        tenants.get_or_create_user(tenant_id=globex.id + 100, external_id="carol")


@pytest.mark.parametrize("external_id", ["", "x" * 257, "line\nbreak", "nul\x00", 42])
def test_external_id_is_validated(tenants: TenantRepository, external_id: str) -> None:
    tenant, _ = tenants.create_tenant(name="acme")
    with pytest.raises(ValidationError, match="external_id"):
        tenants.get_or_create_user(tenant_id=tenant.id, external_id=external_id)


def test_longest_external_id_is_accepted(tenants: TenantRepository) -> None:
    tenant, _ = tenants.create_tenant(name="acme")
    user = tenants.get_or_create_user(tenant_id=tenant.id, external_id="é" * 256)
    assert tenants.get_user(tenant_id=tenant.id, external_id="é" * 256) == user


def test_page_limits_are_checked(tenants: TenantRepository) -> None:
    with pytest.raises(ValidationError):
        tenants.list_users(tenant_id=1, limit=0)
    with pytest.raises(ValidationError):
        tenants.list_users(tenant_id=1, offset=-1)


def test_concurrent_get_or_create_user_makes_one_row(pg_database: Database) -> None:
    tenants = TenantRepository(pg_database)
    tenant, _ = tenants.create_tenant(name="acme")
    start = threading.Barrier(8)

    def create(_: int) -> User:
        start.wait(timeout=10)
        return tenants.get_or_create_user(tenant_id=tenant.id, external_id="racer")

    with ThreadPoolExecutor(max_workers=8) as pool:
        users = list(pool.map(create, range(8)))

    assert len({user.id for user in users}) == 1
    with pg_database.session() as session:
        assert session.scalar(select(func.count()).select_from(SqlUser)) == 1


def test_authentication_and_user_lookups_do_not_wait_for_a_writer(
    tenants: TenantRepository, database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request authenticates, and most look a user up: read-only transactions, which answer while another
    connection holds a write open. A key's last use is stamped in a write of its own, when it is due."""
    tenant, api_key = tenants.create_tenant(name="acme")
    alice = tenants.get_or_create_user(tenant_id=tenant.id, external_id="alice")
    assert tenants.authenticate(api_key=api_key) == tenant
    (stamped,) = [key.last_used_at for key in tenants.list_api_keys(tenant_id=tenant.id)]
    assert stamped is not None
    monkeypatch.setattr(
        tenants_module, "LAST_USED_RESOLUTION", timedelta(days=1)
    )  # not due again in this test
    with writer_holding_the_lock(database):
        assert tenants.authenticate(api_key=api_key) == tenant
        assert tenants.get_user(tenant_id=tenant.id, external_id="alice") == alice
    assert [key.last_used_at for key in tenants.list_api_keys(tenant_id=tenant.id)] == [stamped]
