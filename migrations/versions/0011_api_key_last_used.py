"""API keys: ``last_used_at``

- ``api_keys.last_used_at``: when the key last authenticated a request (updated at most once a minute), shown
  when an admin lists a tenant's keys to decide which to revoke.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 23:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("last_used_at")
