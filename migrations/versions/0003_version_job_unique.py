"""at most one version per adapter and job: a unique index on adapter_versions (adapter_id, job_id)

A training job that Ray (or a lease takeover) runs twice must not register two versions of one adapter.
Versions without a job (imports, manual uploads) have a NULL ``job_id``; PostgreSQL and SQLite both treat
NULLs as distinct in a unique index, so any number of those stay allowed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

from alembic import op
from migration_helpers import add_index

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    add_index("adapter_versions", "adapter_id", "job_id", unique=True)


def downgrade() -> None:
    op.drop_index("uq_adapter_versions_adapter_id_job_id", table_name="adapter_versions")
