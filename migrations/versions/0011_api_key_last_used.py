"""API keys: ``last_used_at``

- ``api_keys.last_used_at``: when the key last authenticated a request (updated at most once a minute), shown
  when an admin lists a tenant's keys to decide which to revoke.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 23:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from migration_helpers import add_columns, drop_columns

revision = "0011"
down_revision = "0010"


def upgrade() -> None:
    add_columns("api_keys", sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    drop_columns("api_keys", "last_used_at")
