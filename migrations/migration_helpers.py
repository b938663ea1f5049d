"""Operations the scripts in ``versions/`` share, so that each script says only what it changes.

Alembic loads the scripts by path, not as a package: ``env.py`` puts this folder on ``sys.path`` so that they can
``from migration_helpers import ...``. Like the scripts, this module never imports ``lorafleet``. Changing what a
helper does changes every migration that calls it: keep their effect as it is.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

#: the key type of the tables that grow without bound: BIGINT, but INTEGER on SQLite (only an INTEGER primary key
#: is its rowid, which autoincrements)
BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def fk(table: str, column: str, target: str, *, ondelete: str = "CASCADE") -> sa.ForeignKeyConstraint:
    """``table.column`` references ``target.id``, named by the models' naming convention."""
    return sa.ForeignKeyConstraint(
        [column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"), ondelete=ondelete
    )


def where(condition: str) -> dict[str, Any]:
    """A partial index's condition, the same on PostgreSQL and SQLite."""
    return {"postgresql_where": sa.text(condition), "sqlite_where": sa.text(condition)}


def add_index(table: str, *columns: str, unique: bool = False) -> None:
    """Index ``table`` on ``columns``, named by the models' naming convention: ``ix_`` (``uq_`` when unique),
    the table, then the columns."""
    name = f"{'uq' if unique else 'ix'}_{table}_{'_'.join(columns)}"
    op.create_index(op.f(name), table, list(columns), unique=unique)


def add_columns(table: str, *columns: sa.Column[Any]) -> None:
    """Add ``columns`` to ``table`` in one batch (a plain ``ADD COLUMN`` on SQLite too, no table rebuild)."""
    with op.batch_alter_table(table, schema=None) as batch_op:
        for column in columns:
            batch_op.add_column(column)


def drop_columns(table: str, *names: str) -> None:
    """Drop the columns ``names`` of ``table`` in one batch (one table rebuild on SQLite)."""
    with op.batch_alter_table(table, schema=None) as batch_op:
        for name in names:
            batch_op.drop_column(name)


def replace_check(table: str, name: str, condition: str) -> None:
    """Drop ``table``'s check constraint ``name`` and create it again as ``condition`` (one rebuild on SQLite)."""
    with op.batch_alter_table(table, schema=None) as batch_op:
        batch_op.drop_constraint(op.f(name), type_="check")
        batch_op.create_check_constraint(op.f(name), condition)


def drop_table(table: str, *indexes: str) -> None:
    """Drop ``table``'s ``indexes`` (in the order given), then the table itself."""
    for index in indexes:
        op.drop_index(index, table_name=table)
    op.drop_table(table)
