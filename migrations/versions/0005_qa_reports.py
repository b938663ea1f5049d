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

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


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
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name=op.f("fk_qa_reports_tenant_id_tenants"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["adapter_versions.id"],
            name=op.f("fk_qa_reports_version_id_adapter_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_qa_reports_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_qa_reports")),
        sa.UniqueConstraint("job_id", name=op.f("uq_qa_reports_job_id")),
    )
    with op.batch_alter_table("qa_reports", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_qa_reports_version_id"), ["version_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_qa_reports_blob_sha256"), ["blob_sha256"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("qa_reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_qa_reports_blob_sha256"))
        batch_op.drop_index(batch_op.f("ix_qa_reports_version_id"))
    op.drop_table("qa_reports")
