"""A value a PostgreSQL column cannot hold is the input's fault: ``ValidationError`` (an API 422), never a
``StoreError`` (a 500). The API checks its inputs first; this is the net under those checks (issue 18)."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from lorafleet.errors import ValidationError
from lorafleet.store.sql.database import Database


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("statement", "value"),
    [("SELECT CAST(:v AS integer)", 2**31), ("SELECT CAST(:v AS bigint)", 2**63), ("SELECT :v", "a\x00b")],
)
def test_a_value_the_database_cannot_hold_is_a_validation_error(
    pg_database: Database, statement: str, value: object
) -> None:
    with pytest.raises(ValidationError, match="a value the database cannot store"):
        with pg_database.session() as session:
            session.execute(text(statement), {"v": value})
    with pg_database.session() as session:  # the connection is usable afterwards
        assert session.execute(text("SELECT 1")).scalar() == 1
