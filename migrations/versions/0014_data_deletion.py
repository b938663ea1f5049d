"""data deletion: revoked versions, deletion receipts, idempotency entries by subject

- ``adapter_versions.status`` may be ``revoked`` (a record the version was trained on was deleted: never served,
  never a promote or rollback target, final), with ``revoked_at``.
- ``deletion_receipts``: what each deletion did (ids and hashes only): the request, the removed records' content
  hashes, the revoked versions, counts of what else was erased, the blobs held from the gc until
  ``purge_after`` and when they were deleted, the rebuild job, the actor. ``tenant_id`` has no foreign key: a
  receipt outlives what it describes.
- ``idempotency_keys.subject``: the user whose path a keyed request was on, so forgetting the user deletes the
  stored responses that hold their data; an index on ``(tenant_id, subject)``.

The status check constraint is dropped and created again (a table rebuild on SQLite, via batch mode). A
downgrade turns ``revoked`` versions into ``rejected`` ones (the older status that also never goes live).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 14:40:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from migration_helpers import add_columns, add_index

revision = "0014"
down_revision = "0013"

_OLD = "status IN ('candidate', 'live', 'rejected', 'archived', 'corrupt')"
_NEW = "status IN ('candidate', 'live', 'rejected', 'archived', 'corrupt', 'revoked')"


def upgrade() -> None:
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.drop_constraint(op.f("ck_adapter_versions_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_adapter_versions_status"), _NEW)
    op.create_table(
        "deletion_receipts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("subject", sa.String(length=300), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("record_hashes", sa.JSON(), nullable=False),
        sa.Column("revoked_versions", sa.JSON(), nullable=False),
        sa.Column("erased", sa.JSON(), nullable=False),
        sa.Column("blobs", sa.JSON(), nullable=False),
        sa.Column("purge_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("blobs_deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rebuild_job_id", sa.BigInteger(), nullable=True),
        sa.Column("adapter_ids", sa.JSON(), nullable=False),
        sa.CheckConstraint("kind IN ('records', 'user')", name=op.f("ck_deletion_receipts_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deletion_receipts")),
    )
    add_index("deletion_receipts", "tenant_id", "created_at")
    add_index("deletion_receipts", "blobs_deleted_at")
    add_columns("idempotency_keys", sa.Column("subject", sa.String(length=256), nullable=True))
    add_index("idempotency_keys", "tenant_id", "subject")


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_idempotency_keys_tenant_id_subject")
        batch_op.drop_column("subject")
    op.drop_table("deletion_receipts")
    op.execute("UPDATE adapter_versions SET status = 'rejected' WHERE status = 'revoked'")
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_adapter_versions_status"), type_="check")
        batch_op.create_check_constraint(op.f("ck_adapter_versions_status"), _OLD)
        batch_op.drop_column("revoked_at")
