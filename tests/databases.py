"""Test databases on the PostgreSQL at ``LORAFLEET_TEST_PG_URL`` (default 127.0.0.1:5432): one way to make a
fresh, migrated database and drop it again."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from sqlalchemy.engine import make_url

from lorafleet.store.sql import migrate

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
