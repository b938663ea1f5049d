"""qa reports: one row per QA run on an adapter version (decision, reasons, summary, the matrix blob)

- ``qa_reports``: tenant, version (cascade), kind (``candidate`` | ``recheck``), policy version, decision
  (``promote`` | ``reject`` | ``keep`` | ``rollback``), reasons and summary (JSON), the full matrix as a JSON
  blob (sha256, uri, size), the QA job (``SET NULL``; unique, so a retried job decides once) and a timestamp.
- indexes on ``version_id`` (reports of a version, lineage) and ``blob_sha256`` (the blob GC's lookup).

Downgrading drops the table; the report blobs then become orphans that ``Registry.gc`` removes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from migration_helpers import BIG_KEY, add_index, drop_table, fk

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    op.create_table(
        "qa_reports",
        sa.Column("id", BIG_KEY, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("version_id", BIG_KEY, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("policy_version", sa.String(length=64), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("blob_uri", sa.String(length=1024), nullable=False),
        sa.Column("blob_size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("job_id", BIG_KEY, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('candidate', 'recheck')", name=op.f("ck_qa_reports_kind")),
        sa.CheckConstraint(
            "decision IN ('promote', 'reject', 'keep', 'rollback')", name=op.f("ck_qa_reports_decision")
        ),
        fk("qa_reports", "tenant_id", "tenants"),
        fk("qa_reports", "version_id", "adapter_versions"),
        fk("qa_reports", "job_id", "jobs", ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_qa_reports")),
        sa.UniqueConstraint("job_id", name=op.f("uq_qa_reports_job_id")),
    )
    add_index("qa_reports", "version_id")
    add_index("qa_reports", "blob_sha256")


def downgrade() -> None:
    drop_table("qa_reports", "ix_qa_reports_blob_sha256", "ix_qa_reports_version_id")
