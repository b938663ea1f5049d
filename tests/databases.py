"""Test databases on the PostgreSQL at ``LORAFLEET_TEST_PG_URL`` (default 127.0.0.1:5432): one way to make a
fresh, migrated database and drop it again; and a writer that holds a database's write lock while a test reads."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from sqlalchemy.engine import make_url

from lorafleet.store.sql import migrate
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlTenant

PG_ADMIN_URL = os.environ.get(
    "LORAFLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def pg_admin_conninfo() -> str:
    """psycopg's conninfo of the server the test databases are made on."""
    url = make_url(PG_ADMIN_URL)
    return f"host={url.host} port={url.port or 5432} user={url.username} dbname={url.database}"


@contextmanager
def migrated_pg_database(prefix: str) -> Iterator[str]:
    """A new database named ``<prefix>_<pid>_<random>``, migrated to the newest revision, dropped on exit;
    fails the test loudly when PostgreSQL is not reachable."""

    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(pg_admin_conninfo(), autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate.upgrade(url)
        yield url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


#: how long a helper thread waits for the test's signal before giving up (only reached when the test is broken)
GIVE_UP_SECONDS = 60


@contextmanager
def writer_holding_the_lock(db: Database) -> Iterator[None]:
    """Another thread's ordinary transaction, open for the block, that has written (not committed) a tenant
    ``uncommitted``; it rolls back after the block."""
    holding, release = threading.Event(), threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            with db.session() as session:
                session.add(SqlTenant(name="uncommitted"))
                session.flush()
                holding.set()
                release.wait(GIVE_UP_SECONDS)
                session.rollback()
        except BaseException as exc:  # reported by the test's thread
            failures.append(exc)
            holding.set()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert holding.wait(GIVE_UP_SECONDS)
        assert not failures, failures
        yield
    finally:
        release.set()
        writer.join()
    assert not failures, failures
