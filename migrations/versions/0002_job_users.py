"""job users: which users a job trains, and through which feedback id

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_users",
        sa.Column("job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("watermark", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_users_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_job_users_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "user_id", name=op.f("pk_job_users")),
    )
    with op.batch_alter_table("job_users", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_users_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("job_users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_users_user_id"))

    op.drop_table("job_users")
