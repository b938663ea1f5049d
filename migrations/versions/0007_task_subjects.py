"""task subjects: a shared task's feedback and training reuse the users' tables

- ``users.kind``: ``user`` (the default, every existing row) or ``task``. A task's dataset is a subject row
  of kind ``task`` whose ``external_id`` is a non-printable prefix + the task name (real users' ids are
  printable, so the existing unique ``(tenant_id, external_id)`` keeps the two apart). Its feedback, jobs,
  leases and dataset snapshots are then the same rows as a user's, and its versions belong to the tenant's
  task adapter of that name (``adapters.owner_user_id`` NULL).

Added with ``ADD COLUMN`` (no table rebuild on SQLite, which would cascade through the foreign keys).
Downgrading drops the task rows first (their feedback and snapshots cascade), then the column.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-12 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from migration_helpers import add_columns, drop_columns

revision = "0007"
down_revision = "0006"


def upgrade() -> None:
    add_columns("users", sa.Column("kind", sa.String(length=8), server_default="user", nullable=False))


def downgrade() -> None:
    op.execute("DELETE FROM users WHERE kind = 'task'")
    drop_columns("users", "kind")
