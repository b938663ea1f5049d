"""adapter versions: ``routing_claim``

- ``adapter_versions.routing_claim``: the version's routing claim (``lorafleet.routing.embeddings.fit_claim``: a
  linear probe over pooled base embeddings, hidden + 1 floats) that tells its training prompts from general ones,
  so the gate's base side sends a general prompt to the base model. Null for versions trained before it.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06 07:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from migration_helpers import add_columns, drop_columns

revision = "0015"
down_revision = "0014"


def upgrade() -> None:
    add_columns("adapter_versions", sa.Column("routing_claim", sa.JSON(), nullable=True))


def downgrade() -> None:
    drop_columns("adapter_versions", "routing_claim")
