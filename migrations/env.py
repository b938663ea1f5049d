"""Alembic environment for lorafleet.

The URL comes from the Alembic config (set by ``lorafleet.store.sql.migrate``) or from the settings.
``target_metadata`` is only used by autogenerate and the drift test; the migration scripts themselves are
self-contained and never import ORM classes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import context
from sqlalchemy.engine import Connection

from lorafleet.config import load_settings
from lorafleet.store.sql.database import create_db_engine
from lorafleet.store.sql.models import Base

#: the scripts in versions/ import ``migration_helpers`` from this folder (Alembic loads them by path)
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    return load_settings().resolved_database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection: Connection | None = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_db_engine(_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things: batch mode recreates tables
        compare_type=True,
    )
    with _sqlite_foreign_keys_off(connection):
        with context.begin_transaction():
            context.run_migrations()


@contextmanager
def _sqlite_foreign_keys_off(connection: Connection) -> Iterator[None]:
    """On SQLite, foreign keys are not enforced while migrating, then checked once at the end.

    Batch mode rebuilds a table by copy, drop and rename; with enforcement on, dropping a table that other tables
    reference (``adapter_versions``) would cascade into them or fail. SQLite ignores the pragma inside a
    transaction, so it goes to the driver before the migrations' first statement; a connection already in a
    transaction (one handed in through ``config.attributes``) is left as it is."""
    raw = connection.connection.driver_connection if connection.dialect.name == "sqlite" else None
    if raw is None or raw.in_transaction:
        yield
        return
    raw.execute("PRAGMA foreign_keys=OFF")
    try:
        yield
        broken = raw.execute("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"the migration left rows with broken foreign keys: {broken[:5]}")
    finally:
        raw.execute("PRAGMA foreign_keys=ON")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
