"""The Alembic migrations: up, down and up again on both databases, no drift against the models, real
downgrades, and scripts that never import the live ORM classes."""

from __future__ import annotations

import ast
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from lorafleet.store.sql import migrate
from lorafleet.store.sql.database import create_db_engine
from lorafleet.store.sql.models import Base

VERSIONS = sorted((migrate.migrations_dir() / "versions").glob("*.py"))


#: as in tests/conftest.py: the server the test databases are created on
PG_ADMIN_URL = os.environ.get(
    "LORAFLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """An empty PostgreSQL database of this test's own, dropped afterwards."""
    import psycopg

    admin_url = make_url(PG_ADMIN_URL)
    conninfo = f"host={admin_url.host} port={admin_url.port or 5432} user={admin_url.username} dbname={admin_url.database}"
    name = f"lorafleet_migr_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield admin_url.set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return str(request.getfixturevalue("fresh_pg_url"))


def _drift(url: str) -> list[object]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_db_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_without_drift(empty_url: str) -> None:
    migrate.upgrade(empty_url)
    assert _tables(empty_url) == set(Base.metadata.tables)
    assert _drift(empty_url) == []
    head = migrate.current_revision(empty_url)
    assert head is not None

    migrate.downgrade(empty_url, "base")
    assert _tables(empty_url) == set()
    assert len(_drift(empty_url)) >= len(Base.metadata.tables)  # the drift check is not vacuous
    assert migrate.current_revision(empty_url) is None

    migrate.upgrade(empty_url)
    assert migrate.current_revision(empty_url) == head
    assert _drift(empty_url) == []


def _function_body(tree: ast.Module, name: str) -> list[ast.stmt]:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node.body
    raise AssertionError(f"no {name}() defined")


def _is_placeholder(statement: ast.stmt) -> bool:
    """``pass``, ``...`` or a bare docstring: a statement that does nothing."""
    return isinstance(statement, ast.Pass) or (
        isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
    )


@pytest.mark.parametrize("script", VERSIONS, ids=lambda path: path.stem)
def test_every_migration_has_a_real_downgrade(script: Path) -> None:
    tree = ast.parse(script.read_text(encoding="utf-8"))
    for name in ("upgrade", "downgrade"):
        body = _function_body(tree, name)
        assert not all(_is_placeholder(statement) for statement in body), f"{script.name}: empty {name}()"


@pytest.mark.parametrize("script", VERSIONS, ids=lambda path: path.stem)
def test_migration_scripts_do_not_import_lorafleet(script: Path) -> None:
    tree = ast.parse(script.read_text(encoding="utf-8"))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "lorafleet"]
    # also catches importlib / __import__ tricks and ORM class names pasted in
    assert not re.search(r"lorafleet\.store|\bSql[A-Z]\w+\b|\bBase\.metadata\b", script.read_text("utf-8"))


def test_there_is_at_least_one_migration() -> None:
    assert VERSIONS, "migrations/versions is empty"
