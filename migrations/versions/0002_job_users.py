"""job users: which users a job trains, and through which feedback id

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from migration_helpers import BIG_KEY, add_index, drop_table, fk

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "job_users",
        sa.Column("job_id", BIG_KEY, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("watermark", sa.BigInteger(), nullable=False),
        fk("job_users", "job_id", "jobs"),
        fk("job_users", "user_id", "users"),
        sa.PrimaryKeyConstraint("job_id", "user_id", name=op.f("pk_job_users")),
    )
    add_index("job_users", "user_id")


def downgrade() -> None:
    drop_table("job_users", "ix_job_users_user_id")
