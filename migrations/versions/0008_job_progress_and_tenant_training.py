"""job progress and cancellation; per-tenant training settings

- ``jobs.progress``: the running job's latest progress (step, total steps, per-subject loss, ETA), written by
  the worker at most every few seconds; NULL until the first report.
- ``jobs.cancel_requested_at`` / ``jobs.cancelled_by``: a cancel request on a queued or running job; the worker
  stops it at its next step, through the lease fence, and the job ends ``cancelled``.
- ``tenants.training_config``: the tenant's training-config overrides (``TrainingConfig`` fields); a job's
  own overrides are applied on top of them when it is queued.

Added with ``ADD COLUMN`` (no table rebuild on SQLite).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 08:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from migration_helpers import add_columns, drop_columns

revision = "0008"
down_revision = "0007"


def upgrade() -> None:
    add_columns(
        "jobs",
        sa.Column("progress", sa.JSON(), nullable=True),
        sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_by", sa.String(length=256), nullable=True),
    )
    add_columns("tenants", sa.Column("training_config", sa.JSON(), nullable=True))


def downgrade() -> None:
    drop_columns("tenants", "training_config")
    drop_columns("jobs", "cancelled_by", "cancel_requested_at", "progress")
