"""idempotency keys: a tenant's ``Idempotency-Key`` and the response it produced, so a retry is replayed

- ``idempotency_keys``: tenant (cascade), the client's key, sha256 of the request (method, path, body), the
  response's status and JSON body (both NULL while the first request is still running) and a timestamp;
  unique ``(tenant_id, key)``, so two concurrent requests with one key cannot both run.
- an index on ``created_at`` for pruning old keys.

Downgrading drops the table; retries after it simply run again (feedback is still deduplicated by content).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from migration_helpers import BIG_KEY, add_index, drop_table, fk

revision = "0006"
down_revision = "0005"


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("id", BIG_KEY, nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=256), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        fk("idempotency_keys", "tenant_id", "tenants"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_keys")),
        sa.UniqueConstraint("tenant_id", "key", name=op.f("uq_idempotency_keys_tenant_id_key")),
    )
    add_index("idempotency_keys", "created_at")


def downgrade() -> None:
    drop_table("idempotency_keys", "ix_idempotency_keys_created_at")
