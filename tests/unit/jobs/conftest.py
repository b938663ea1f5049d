"""Fixtures for the job tests: a clock the test moves, tenants made through ``TenantRepository`` and
feedback ingested through ``lorafleet.workflows.feedback.ingest_feedback``."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from tests.unit.version_rows import add_version_row

from lorafleet.jobs import JobQueue, RetryBackoff
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlDatasetSnapshot
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.workflows.feedback import ingest_feedback


class FakeClock:
    """A clock that starts at the real time (feedback rows are stamped with it) and moves when told."""

    def __init__(self) -> None:
        self._now = datetime.now(UTC)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, **delta: float) -> datetime:
        with self._lock:
            self._now += timedelta(**delta)
            return self._now


Feed = Callable[..., list[int]]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(database: Database, clock: FakeClock) -> JobQueue:
    return JobQueue(database, clock=clock, backoff=RetryBackoff(base_seconds=10, max_seconds=25))


@pytest.fixture
def make_tenant(database: Database) -> Callable[[str], int]:
    repo = TenantRepository(database)
    return lambda name: repo.create_tenant(name=name)[0].id


@pytest.fixture
def tenant_id(make_tenant: Callable[[str], int]) -> int:
    return make_tenant("acme")


_COUNTER = itertools.count()


@pytest.fixture
def feed(database: Database) -> Feed:
    """``feed(tenant_id, user, count)`` ingests ``count`` distinct SFT records for the user (created if
    absent) and returns their ids."""

    def ingest(tenant_id: int, user: str, count: int) -> list[int]:
        records = [{"kind": "sft", "prompt": f"q{next(_COUNTER)}", "completion": "a"} for _ in range(count)]
        return ingest_feedback(database, tenant_id=tenant_id, user_external_id=user, records=records).ids

    return ingest


@pytest.fixture
def uid(database: Database) -> Callable[[int, str], int]:
    """``uid(tenant_id, user)``: the user's row id."""
    repo = TenantRepository(database)
    return lambda tenant_id, user: repo.get_user(tenant_id=tenant_id, external_id=user).id


@pytest.fixture
def record_version(database: Database) -> Callable[..., None]:
    """``record_version(tenant_id, user_id, through)``: a version of the user's adapter trained on their
    feedback up to id ``through`` (rows inserted directly, as the trainer will through the registry)."""

    def record(tenant_id: int, user_id: int, through: int) -> None:
        with database.session() as s:
            snapshot = SqlDatasetSnapshot(
                user_id=user_id, min_record_id=1, max_record_id=through, record_count=1, content_hash="0" * 64
            )
            s.add(snapshot)
            s.flush()
            snapshot_id = snapshot.id
        add_version_row(database, tenant_id=tenant_id, user_id=user_id, snapshot_id=snapshot_id)

    return record
