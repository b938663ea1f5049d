"""``Database.transaction()``: the store calls made inside it join one transaction (each as a savepoint), on
SQLite and PostgreSQL. Nothing commits before the block ends; a call that fails inside rolls back alone, as it
would have on its own, and the block goes on; a block that raises keeps nothing. ``unit_of_work()`` opens one or
joins the open one, ``run()`` is one repository call that joins it, ``outside_transaction()`` steps out of it."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from lorafleet.errors import AlreadyExistsError, NotFoundError
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlTenant
from lorafleet.store.sql.tenants import TenantRepository, require_tenant


def _tenants(db: Database) -> list[str]:
    with db.session() as s:
        return sorted(s.scalars(select(SqlTenant.name)))


def test_calls_inside_commit_together_and_a_failed_one_rolls_back_alone(database: Database) -> None:
    tenants = TenantRepository(database)
    with database.transaction():
        tenants.create_tenant(name="a")
        with pytest.raises(AlreadyExistsError):  # its savepoint rolls back; the transaction goes on
            tenants.create_tenant(name="a")
        with pytest.raises(NotFoundError), database.session() as s:
            s.add(SqlTenant(name="b"))
            s.flush()
            raise NotFoundError("after a write: the write goes with the savepoint")
        tenants.create_tenant(name="c")
    assert _tenants(database) == ["a", "c"]


def test_a_block_that_raises_keeps_nothing(database: Database) -> None:
    tenants = TenantRepository(database)
    with pytest.raises(RuntimeError), database.transaction():
        tenants.create_tenant(name="a")
        raise RuntimeError("the process dies here")
    assert _tenants(database) == []
    with pytest.raises(RuntimeError, match="already open"), database.transaction(), database.transaction():
        pass


def test_other_threads_and_databases_do_not_join(pg_database: Database) -> None:
    """Only this thread's calls on this ``Database`` join: another thread commits on its own, and sees nothing
    of the open transaction."""
    tenants = TenantRepository(pg_database)
    seen: list[int] = []

    def elsewhere() -> None:
        tenants.create_tenant(name="other-thread")
        with pg_database.session() as s:
            seen.append(int(s.scalar(select(func.count()).select_from(SqlTenant)) or 0))

    with pg_database.transaction():
        tenants.create_tenant(name="mine")
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(30)
        assert _tenants(pg_database) == ["mine", "other-thread"]  # inside: mine, and the other's commit
    assert seen == [1]  # the other thread did not see "mine" before the block ended
    assert _tenants(pg_database) == ["mine", "other-thread"]


def test_a_unit_of_work_opens_a_transaction_or_nests_in_the_open_one(database: Database) -> None:
    tenants = TenantRepository(database)
    with database.transaction():
        tenants.create_tenant(name="a")
        with pytest.raises(RuntimeError), database.unit_of_work():  # a savepoint: rolls back alone
            tenants.create_tenant(name="b")
            raise RuntimeError("the inner block fails")
        with database.unit_of_work():
            tenants.create_tenant(name="c")
        assert _tenants(database) == ["a", "c"]
    with pytest.raises(RuntimeError), database.unit_of_work():  # none open: its own transaction
        tenants.create_tenant(name="d")
        raise RuntimeError("the process dies here")
    assert _tenants(database) == ["a", "c"]


def test_run_joins_the_open_transaction_and_outside_transaction_commits_on_its_own(
    database: Database,
) -> None:
    tenants = TenantRepository(database)
    with pytest.raises(RuntimeError), database.unit_of_work():
        with database.outside_transaction():  # before the transaction writes (SQLite: one writer at a time)
            tenants.create_tenant(name="on-its-own")
        tenant, _key = tenants.create_tenant(name="joined")
        assert database.run(require_tenant, tenant_id=tenant.id).name == "joined"  # sees the open transaction
        raise RuntimeError("the transaction is rolled back")
    assert _tenants(database) == ["on-its-own"]
    database.ping()
