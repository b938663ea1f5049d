"""audit events: an append-only log of data rights actions, forced promotes, rollbacks, key and tenant changes

- ``audit_events``: id, tenant id (no foreign key: the log outlives what it records; NULL for an admin-wide
  event), when, actor, action (a check constraint over the actions of this revision), target (text, e.g.
  ``user:ada/personal@3``) and details (JSON: ids and hashes only); an index on ``(tenant_id, id)``.
- triggers that refuse UPDATE and DELETE of its rows, on PostgreSQL (a PL/pgSQL function) and on SQLite
  (``RAISE(ABORT, ...)``): the log is append-only below the application too.

Downgrading drops the triggers and the table (and with it the log).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from migration_helpers import BIG_KEY, add_index, drop_table

revision = "0013"
down_revision = "0012"

_ACTIONS = (
    "promote.forced",
    "rollback",
    "key.created",
    "key.revoked",
    "export.version",
    "export.feedback",
    "delete.records",
    "delete.user",
    "tenant.created",
)
_MESSAGE = "audit_events is append-only"

_PG_FUNCTION = f"""
CREATE FUNCTION audit_events_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '{_MESSAGE}' USING ERRCODE = 'insufficient_privilege';
END;
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", BIG_KEY, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=256), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.CheckConstraint(
            "action IN (" + ", ".join(repr(a) for a in _ACTIONS) + ")", name=op.f("ck_audit_events_action")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    add_index("audit_events", "tenant_id", "id")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"
        )
    else:
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_events_no_{event.lower()} BEFORE {event} ON audit_events "
                f"BEGIN SELECT RAISE(ABORT, '{_MESSAGE}'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS audit_events_append_only()")
    else:
        for event in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS audit_events_no_{event}")
    drop_table("audit_events", "ix_audit_events_tenant_id_id")
