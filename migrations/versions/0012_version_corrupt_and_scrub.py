"""Version status ``corrupt`` and the blob scrub's cursor

- ``adapter_versions.status`` may be ``corrupt``: the version's blob failed verification (``lorafleet verify
  --repair``, ``POST /v1/admin/verify``, or the scheduler's scrub with ``LORAFLEET_SCRUB_REPAIR``); it is
  quarantined, never served and never a promote or rollback target.
- ``scrub_cursors``: where the scheduler's periodic blob scrub goes on (the id of the last version it claimed), so
  a restarted scheduler resumes and two schedulers never re-hash the same window.

The check constraint is dropped and created again with the new value (a table rebuild on SQLite, via batch mode).
A downgrade turns ``corrupt`` versions into ``rejected`` ones, the older status that also never goes live.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from migration_helpers import replace_check

revision = "0012"
down_revision = "0011"

_OLD = "status IN ('candidate', 'live', 'rejected', 'archived')"
_NEW = "status IN ('candidate', 'live', 'rejected', 'archived', 'corrupt')"


def upgrade() -> None:
    replace_check("adapter_versions", "ck_adapter_versions_status", _NEW)
    op.create_table(
        "scrub_cursors",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("after_version_id", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_scrub_cursors")),
    )


def downgrade() -> None:
    op.drop_table("scrub_cursors")
    op.execute("UPDATE adapter_versions SET status = 'rejected' WHERE status = 'corrupt'")
    replace_check("adapter_versions", "ck_adapter_versions_status", _OLD)
