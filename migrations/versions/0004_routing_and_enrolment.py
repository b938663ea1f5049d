"""routing and enrolment: routing keys on versions, adapter kinds (learned gates), enrolments, gate settings

- ``adapter_versions.routing_key`` (JSON, nullable): the centroid gate's key of a version.
- ``adapters.kind`` (``lora`` | ``gate``, default ``lora``): a user's learned gate is an adapter of kind ``gate``
  whose versions are safetensors blobs, so it is versioned, aliased and garbage-collected like any adapter.
- ``enrolments`` (a user in a tenant's shared task adapter) and ``enrolment_events`` (who enrolled or
  unenrolled whom, when).
- ``gate_settings``: a user's gate spec (JSON), set by the tenant.

``adapters`` is referenced by other tables with ``ON DELETE CASCADE``: recreating it (SQLite's batch mode) would
delete their rows on the way, so its column is added and dropped with plain ``ALTER TABLE`` on both databases
(SQLite >= 3.35 drops a column natively; the column's own CHECK goes with it).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from migration_helpers import BIG_KEY, add_index, drop_table, fk

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.add_column("adapter_versions", sa.Column("routing_key", sa.JSON(), nullable=True))
    op.add_column(
        "adapters",
        sa.Column(
            "kind",
            sa.String(length=16),
            sa.CheckConstraint("kind IN ('lora', 'gate')", name=op.f("ck_adapters_kind")),
            nullable=False,
            server_default="lora",
        ),
    )
    _create_enrolments()
    _create_enrolment_events()
    _create_gate_settings()


def _create_enrolments() -> None:
    op.create_table(
        "enrolments",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
        fk("enrolments", "user_id", "users"),
        fk("enrolments", "adapter_id", "adapters"),
        fk("enrolments", "tenant_id", "tenants"),
        sa.PrimaryKeyConstraint("user_id", "adapter_id", name=op.f("pk_enrolments")),
    )
    add_index("enrolments", "adapter_id")


def _create_enrolment_events() -> None:
    op.create_table(
        "enrolment_events",
        sa.Column("id", BIG_KEY, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("action IN ('enrol', 'unenrol')", name=op.f("ck_enrolment_events_action")),
        fk("enrolment_events", "tenant_id", "tenants"),
        fk("enrolment_events", "user_id", "users"),
        fk("enrolment_events", "adapter_id", "adapters"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrolment_events")),
    )
    add_index("enrolment_events", "adapter_id")
    add_index("enrolment_events", "user_id", "id")


def _create_gate_settings() -> None:
    op.create_table(
        "gate_settings",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        fk("gate_settings", "user_id", "users"),
        fk("gate_settings", "tenant_id", "tenants"),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_gate_settings")),
    )


def downgrade() -> None:
    drop_table("gate_settings")
    drop_table("enrolment_events", "ix_enrolment_events_user_id_id", "ix_enrolment_events_adapter_id")
    drop_table("enrolments", "ix_enrolments_adapter_id")
    # learned gates cannot be represented without the kind column: drop their versions and adapters first
    # (aliases point at versions with ON DELETE RESTRICT, so they go first; their blobs become GC orphans)
    gate_adapters = "SELECT id FROM adapters WHERE kind = 'gate'"
    op.execute(f"DELETE FROM aliases WHERE adapter_id IN ({gate_adapters})")
    op.execute(f"DELETE FROM alias_history WHERE adapter_id IN ({gate_adapters})")
    op.execute(f"DELETE FROM adapter_versions WHERE adapter_id IN ({gate_adapters})")
    op.execute("DELETE FROM adapters WHERE kind = 'gate'")
    op.drop_column("adapters", "kind")
    op.drop_column("adapter_versions", "routing_key")
