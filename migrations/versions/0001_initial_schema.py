"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 15:14:23.993860
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

#: the key type of the tables that grow without bound: BIGINT, but INTEGER on SQLite (only an INTEGER primary key
#: is its rowid, which autoincrements)
BIG_KEY = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _fk(table: str, column: str, target: str, *, ondelete: str = "CASCADE") -> sa.ForeignKeyConstraint:
    """``table.column`` references ``target.id``, named by the models' naming convention."""
    return sa.ForeignKeyConstraint(
        [column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"), ondelete=ondelete
    )


def _where(condition: str) -> dict[str, Any]:
    """A partial index's condition, the same on PostgreSQL and SQLite."""
    return {"postgresql_where": sa.text(condition), "sqlite_where": sa.text(condition)}


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
        _fk("api_keys", "tenant_id", "tenants"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_tenant_id"), ["tenant_id"], unique=False)

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
        _fk("jobs", "tenant_id", "tenants"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_state_run_after", ["state", "run_after"], unique=False)
        batch_op.create_index(
            "uq_jobs_active_dedupe_key",
            ["dedupe_key"],
            unique=True,
            **_where("state IN ('queued', 'running')"),
        )

    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        _fk("users", "tenant_id", "tenants"),
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
        _fk("adapters", "owner_user_id", "users"),
        _fk("adapters", "tenant_id", "tenants"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
    )
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.create_index(
            "uq_adapters_task_name",
            ["tenant_id", "name"],
            unique=True,
            **_where("owner_user_id IS NULL"),
        )
        batch_op.create_index(
            "uq_adapters_user_name",
            ["tenant_id", "owner_user_id", "name"],
            unique=True,
            **_where("owner_user_id IS NOT NULL"),
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
        _fk("dataset_snapshots", "user_id", "users"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_snapshots")),
    )
    with op.batch_alter_table("dataset_snapshots", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dataset_snapshots_user_id"), ["user_id"], unique=False)

    op.create_table(
        "feedback",
        sa.Column("id", BIG_KEY, nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("kind IN ('sft', 'preference', 'rating')", name=op.f("ck_feedback_kind")),
        _fk("feedback", "user_id", "users"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
        sa.UniqueConstraint("user_id", "content_hash", name=op.f("uq_feedback_user_id_content_hash")),
    )
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_index("ix_feedback_user_id_id", ["user_id", "id"], unique=False)

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
        _fk("adapter_versions", "adapter_id", "adapters"),
        _fk("adapter_versions", "dataset_snapshot_id", "dataset_snapshots", ondelete="SET NULL"),
        _fk("adapter_versions", "job_id", "jobs", ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_versions")),
        sa.UniqueConstraint("adapter_id", "number", name=op.f("uq_adapter_versions_adapter_id_number")),
    )
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_adapter_versions_job_id"), ["job_id"], unique=False)
        batch_op.create_index("ix_adapter_versions_sha256", ["sha256"], unique=False)

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
        _fk("alias_history", "adapter_id", "adapters"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias_history")),
    )
    with op.batch_alter_table("alias_history", schema=None) as batch_op:
        batch_op.create_index("ix_alias_history_adapter_id_id", ["adapter_id", "id"], unique=False)

    op.create_table(
        "aliases",
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("version_id", BIG_KEY, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        _fk("aliases", "adapter_id", "adapters"),
        _fk("aliases", "version_id", "adapter_versions", ondelete="RESTRICT"),
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
        _fk("lineage_edges", "child_version_id", "adapter_versions"),
        _fk("lineage_edges", "parent_version_id", "adapter_versions"),
        sa.PrimaryKeyConstraint("child_version_id", "parent_version_id", name=op.f("pk_lineage_edges")),
    )
    with op.batch_alter_table("lineage_edges", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_lineage_edges_parent_version_id"), ["parent_version_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("lineage_edges", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_lineage_edges_parent_version_id"))

    op.drop_table("lineage_edges")
    op.drop_table("aliases")
    with op.batch_alter_table("alias_history", schema=None) as batch_op:
        batch_op.drop_index("ix_alias_history_adapter_id_id")

    op.drop_table("alias_history")
    with op.batch_alter_table("adapter_versions", schema=None) as batch_op:
        batch_op.drop_index("ix_adapter_versions_sha256")
        batch_op.drop_index(batch_op.f("ix_adapter_versions_job_id"))

    op.drop_table("adapter_versions")
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index("ix_feedback_user_id_id")

    op.drop_table("feedback")
    with op.batch_alter_table("dataset_snapshots", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dataset_snapshots_user_id"))

    op.drop_table("dataset_snapshots")
    with op.batch_alter_table("adapters", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_adapters_user_name",
            **_where("owner_user_id IS NOT NULL"),
        )
        batch_op.drop_index(
            "uq_adapters_task_name",
            **_where("owner_user_id IS NULL"),
        )

    op.drop_table("adapters")
    op.drop_table("users")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_jobs_active_dedupe_key",
            **_where("state IN ('queued', 'running')"),
        )
        batch_op.drop_index("ix_jobs_state_run_after")

    op.drop_table("jobs")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_tenant_id"))

    op.drop_table("api_keys")
    op.drop_table("tenants")
