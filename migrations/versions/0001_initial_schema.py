"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 15:14:23.993860
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from migration_helpers import BIG_KEY, add_index, drop_table, fk, where

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        fk("api_keys", "tenant_id", "tenants"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    add_index("api_keys", "tenant_id")

    op.create_table(
        "jobs",
        sa.Column("id", BIG_KEY, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("dedupe_key", sa.String(length=256), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f("ck_jobs_state")
        ),
        fk("jobs", "tenant_id", "tenants"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    add_index("jobs", "state", "run_after")
    op.create_index(
        "uq_jobs_active_dedupe_key",
        "jobs",
        ["dedupe_key"],
        unique=True,
        **where("state IN ('queued', 'running')"),
    )

    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        fk("users", "tenant_id", "tenants"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("tenant_id", "external_id", name=op.f("uq_users_tenant_id_external_id")),
    )
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("owner_user_id", sa.Integer(), nullable=True),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("target_config", sa.JSON(), nullable=False),
        sa.Column("version_count", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        fk("adapters", "owner_user_id", "users"),
        fk("adapters", "tenant_id", "tenants"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
    )
    op.create_index(
        "uq_adapters_task_name",
        "adapters",
        ["tenant_id", "name"],
        unique=True,
        **where("owner_user_id IS NULL"),
    )
    op.create_index(
        "uq_adapters_user_name",
        "adapters",
        ["tenant_id", "owner_user_id", "name"],
        unique=True,
        **where("owner_user_id IS NOT NULL"),
    )

    op.create_table(
        "dataset_snapshots",
        sa.Column("id", BIG_KEY, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("min_record_id", sa.BigInteger(), nullable=True),
        sa.Column("max_record_id", sa.BigInteger(), nullable=True),
        sa.Column("record_ids", sa.JSON(), nullable=True),
        sa.Column("record_count", sa.Integer(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        fk("dataset_snapshots", "user_id", "users"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_snapshots")),
    )
    add_index("dataset_snapshots", "user_id")

    op.create_table(
        "feedback",
        sa.Column("id", BIG_KEY, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('sft', 'preference', 'rating')", name=op.f("ck_feedback_kind")),
        fk("feedback", "user_id", "users"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
        sa.UniqueConstraint("user_id", "content_hash", name=op.f("uq_feedback_user_id_content_hash")),
    )
    add_index("feedback", "user_id", "id")

    op.create_table(
        "adapter_versions",
        sa.Column("id", BIG_KEY, nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("blob_uri", sa.String(length=1024), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("base_fingerprint", sa.String(length=128), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("training_config", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("job_id", BIG_KEY, nullable=True),
        sa.Column("dataset_snapshot_id", BIG_KEY, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('candidate', 'live', 'rejected', 'archived')", name=op.f("ck_adapter_versions_status")
        ),
        sa.CheckConstraint("number >= 1", name=op.f("ck_adapter_versions_number_positive")),
        fk("adapter_versions", "adapter_id", "adapters"),
        fk("adapter_versions", "dataset_snapshot_id", "dataset_snapshots", ondelete="SET NULL"),
        fk("adapter_versions", "job_id", "jobs", ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_versions")),
        sa.UniqueConstraint("adapter_id", "number", name=op.f("uq_adapter_versions_adapter_id_number")),
    )
    add_index("adapter_versions", "job_id")
    add_index("adapter_versions", "sha256")

    op.create_table(
        "alias_history",
        sa.Column("id", BIG_KEY, nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(length=32), nullable=False),
        sa.Column("from_version_id", sa.BigInteger(), nullable=True),
        sa.Column("to_version_id", sa.BigInteger(), nullable=True),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        fk("alias_history", "adapter_id", "adapters"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias_history")),
    )
    add_index("alias_history", "adapter_id", "id")

    op.create_table(
        "aliases",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("version_id", BIG_KEY, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        fk("aliases", "adapter_id", "adapters"),
        fk("aliases", "version_id", "adapter_versions", ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("adapter_id", "name", name=op.f("pk_aliases")),
    )
    op.create_table(
        "lineage_edges",
        sa.Column("child_version_id", BIG_KEY, nullable=False),
        sa.Column("parent_version_id", BIG_KEY, nullable=False),
        sa.Column("relation", sa.String(length=32), nullable=False),
        sa.CheckConstraint(
            "relation IN ('continued-from', 'merged-from', 'imported')",
            name=op.f("ck_lineage_edges_relation"),
        ),
        sa.CheckConstraint("child_version_id <> parent_version_id", name=op.f("ck_lineage_edges_not_self")),
        fk("lineage_edges", "child_version_id", "adapter_versions"),
        fk("lineage_edges", "parent_version_id", "adapter_versions"),
        sa.PrimaryKeyConstraint("child_version_id", "parent_version_id", name=op.f("pk_lineage_edges")),
    )
    add_index("lineage_edges", "parent_version_id")


def downgrade() -> None:
    drop_table("lineage_edges", "ix_lineage_edges_parent_version_id")
    drop_table("aliases")
    drop_table("alias_history", "ix_alias_history_adapter_id_id")
    drop_table("adapter_versions", "ix_adapter_versions_sha256", "ix_adapter_versions_job_id")
    drop_table("feedback", "ix_feedback_user_id_id")
    drop_table("dataset_snapshots", "ix_dataset_snapshots_user_id")
    drop_table("adapters", "uq_adapters_user_name", "uq_adapters_task_name")
    drop_table("users")
    drop_table("jobs", "uq_jobs_active_dedupe_key", "ix_jobs_state_run_after")
    drop_table("api_keys", "ix_api_keys_tenant_id")
    drop_table("tenants")
