"""Read-only transactions (``Database.read``, ``session(read_only=True)``, ``unit_of_work(read_only=True)``), on
SQLite and PostgreSQL: they read the committed data while another connection holds a write transaction open,
without waiting for it (on SQLite every other transaction begins with ``BEGIN IMMEDIATE`` and would wait), and a
write in one is ``ReadOnlyTransactionError`` and changes nothing. Inside an open ``transaction()`` they join it."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session
from tests.databases import writer_holding_the_lock

from lorafleet.errors import ReadOnlyTransactionError
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlTenant
from lorafleet.store.sql.tenants import TenantRepository


def _tenant_names(session: Session) -> list[str]:
    return sorted(session.scalars(select(SqlTenant.name)))


def _add_tenant(session: Session, name: str) -> None:
    session.add(SqlTenant(name=name))
    session.flush()


def test_a_read_does_not_wait_for_an_open_write(database: Database) -> None:
    TenantRepository(database).create_tenant(name="committed")
    with writer_holding_the_lock(database):
        # the writer waits for this thread: were the read to wait for the writer, it would fail (busy_timeout)
        assert database.read(_tenant_names) == ["committed"]
        with database.session(read_only=True) as session:
            assert _tenant_names(session) == ["committed"]
        with database.unit_of_work(read_only=True):
            assert database.run(_tenant_names) == ["committed"]
    assert database.read(_tenant_names) == ["committed"]  # the writer rolled back


def test_an_ordinary_transaction_would_wait_for_the_writer(sqlite_database: Database) -> None:
    """What the read-only transactions spare the reads: on SQLite, what every other transaction begins with
    cannot start while a writer holds the lock (here with no busy timeout, so it fails instead of waiting)."""
    path = sqlite_database.engine.url.database
    assert path is not None
    with writer_holding_the_lock(sqlite_database):
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        finally:
            other.close()


def test_a_write_in_a_read_only_transaction_is_refused_and_changes_nothing(database: Database) -> None:
    TenantRepository(database).create_tenant(name="a")
    with pytest.raises(ReadOnlyTransactionError):
        database.read(_add_tenant, "b")
    with pytest.raises(ReadOnlyTransactionError), database.session(read_only=True) as session:
        session.execute(text("DELETE FROM tenants"))
    with pytest.raises(ReadOnlyTransactionError), database.unit_of_work(read_only=True):
        database.run(_add_tenant, "c")  # an ordinary call joins the read-only transaction
    assert database.read(_tenant_names) == ["a"]


def test_a_connection_writes_again_after_a_read_only_transaction(sqlite_url: str) -> None:
    """SQLite's ``query_only`` belongs to the connection: the next ordinary transaction on it turns it off."""
    db = Database(sqlite_url, pool_size=1, max_overflow=0)  # one connection: every session below uses it
    try:
        assert db.read(_tenant_names) == []
        TenantRepository(db).create_tenant(name="after")
        assert db.read(_tenant_names) == ["after"]
    finally:
        db.dispose()


def test_inside_a_transaction_a_read_joins_it(database: Database) -> None:
    """A read-only session inside ``transaction()`` is a savepoint of it: it sees the transaction's own writes
    (and is as writable as the transaction)."""
    with database.transaction():
        database.run(_add_tenant, "mine")
        assert database.read(_tenant_names) == ["mine"]
        database.read(_add_tenant, "joined")
    assert database.read(_tenant_names) == ["joined", "mine"]
