"""QA decision ``hold``

- ``qa_reports.decision`` may be ``hold``: QA found nothing wrong with a version but had no evidence to decide
  by (an imported task version without example prompts and expected outputs, on a task without feedback); the
  version stays a ``candidate`` until a person promotes it with ``force``.

The check constraint is dropped and created again with the new value (a table rebuild on SQLite, via batch mode).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 10:00:00.000000
"""

from __future__ import annotations

from alembic import op
from migration_helpers import replace_check

revision = "0010"
down_revision = "0009"

_OLD = "decision IN ('promote', 'reject', 'keep', 'rollback')"
_NEW = "decision IN ('promote', 'reject', 'keep', 'rollback', 'hold')"


def upgrade() -> None:
    replace_check("qa_reports", "ck_qa_reports_decision", _NEW)


def downgrade() -> None:
    op.execute("DELETE FROM qa_reports WHERE decision = 'hold'")
    replace_check("qa_reports", "ck_qa_reports_decision", _OLD)
