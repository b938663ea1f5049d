"""forced promotions in the alias history

- ``alias_history.forced``: the move made a version live that QA had not passed, by a person's ``force`` under
  the promote rule ``qa`` (``lorafleet.workflows.live_alias.promote_manually``). False for every earlier move,
  and for every move QA makes itself. QA then evaluates the live version and rolls it back if it fails.

Added with ``ADD COLUMN`` (no table rebuild on SQLite); the server default fills the existing rows.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 15:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from migration_helpers import add_columns, drop_columns

revision = "0009"
down_revision = "0008"


def upgrade() -> None:
    add_columns("alias_history", sa.Column("forced", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    drop_columns("alias_history", "forced")
