"""The idempotency-key store behind the API (``lorafleet.store.sql.idempotency``) on SQLite and PostgreSQL:
reserve, replay, reuse with another request, in flight, released, a dead request's key taken over, pruning,
and many concurrent requests with one key of which exactly one runs."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from lorafleet.errors import ValidationError
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.idempotency import (
    IdempotencyKeyInFlightError,
    IdempotencyKeyReusedError,
    IdempotencyRepository,
    StoredResponse,
    request_hash,
)
from lorafleet.store.sql.models import SqlIdempotencyKey, utcnow
from lorafleet.store.sql.tenants import TenantRepository

H1 = request_hash(method="post", path="/v1/users/a/feedback", body={"records": [1]})
H2 = request_hash(method="POST", path="/v1/users/a/feedback", body={"records": [2]})


def test_reserve_complete_replay_and_refusals(database: Database) -> None:
    tenant_id = TenantRepository(database).create_tenant(name="acme")[0].id
    other_id = TenantRepository(database).create_tenant(name="other")[0].id
    store = IdempotencyRepository(database)
    assert store.reserve(tenant_id=tenant_id, key="k", request_hash=H1) is None
    with pytest.raises(IdempotencyKeyInFlightError):
        store.reserve(tenant_id=tenant_id, key="k", request_hash=H1)
    assert store.reserve(tenant_id=other_id, key="k", request_hash=H2) is None  # keys are per tenant
    store.complete(tenant_id=tenant_id, key="k", status=200, body={"ids": [1]})
    assert store.reserve(tenant_id=tenant_id, key="k", request_hash=H1) == StoredResponse(200, {"ids": [1]})
    with pytest.raises(IdempotencyKeyReusedError):
        store.reserve(tenant_id=tenant_id, key="k", request_hash=H2)
    store.release(tenant_id=tenant_id, key="k")  # a completed key is kept
    assert store.reserve(tenant_id=tenant_id, key="k", request_hash=H1) is not None
    for bad in ("", "x" * 256, "naïve", "tab\there"):
        with pytest.raises(ValidationError):
            store.reserve(tenant_id=tenant_id, key=bad, request_hash=H1)


def test_a_released_key_runs_again_and_a_dead_request_is_taken_over(database: Database) -> None:
    tenant_id = TenantRepository(database).create_tenant(name="acme")[0].id
    store = IdempotencyRepository(database, stale_after=timedelta(minutes=5))
    assert store.reserve(tenant_id=tenant_id, key="a", request_hash=H1) is None
    store.release(tenant_id=tenant_id, key="a")
    assert store.reserve(tenant_id=tenant_id, key="a", request_hash=H1) is None
    with database.session() as s:  # the request holding "a" died ten minutes ago
        s.execute(update(SqlIdempotencyKey).values(created_at=utcnow() - timedelta(minutes=10)))
    assert store.reserve(tenant_id=tenant_id, key="a", request_hash=H1) is None
    with pytest.raises(IdempotencyKeyInFlightError):
        store.reserve(tenant_id=tenant_id, key="a", request_hash=H1)
    assert store.prune(older_than=utcnow() + timedelta(seconds=1)) == 1


def test_concurrent_requests_with_one_key_run_once(pg_database: Database) -> None:
    tenant_id = TenantRepository(pg_database).create_tenant(name="acme")[0].id
    store = IdempotencyRepository(pg_database)
    outcomes: list[str] = []
    lock, start = threading.Lock(), threading.Barrier(8)

    def attempt() -> None:
        start.wait()
        try:
            won = store.reserve(tenant_id=tenant_id, key="same", request_hash=H1) is None
            outcome = "ran" if won else "replayed"
        except IdempotencyKeyInFlightError:
            outcome = "in flight"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["in flight"] * 7 + ["ran"]
