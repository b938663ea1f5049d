"""Matrices round-trip through JSON, documents are canonical JSON, and a report renders as a readable table."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest

from lorafleet.errors import ValidationError
from lorafleet.qa.reports import encode_document, format_report, summary_of
from lorafleet.qa.results import Cell, ColumnInfo, Matrix, RowInfo, Sample
from lorafleet.store.sql.qa_repository import QAReport

MATRIX = Matrix(
    rows=(RowInfo("holdout:personal:p", "user-holdout", 2, 3, 1, True), RowInfo("probe", "probe", 0, 0)),
    columns=(
        ColumnInfo("base", "base"),
        ColumnInfo("candidate", "candidate"),
        ColumnInfo("pair:task:t", "pair", "task:t"),
    ),
    cells={
        "holdout:personal:p": {
            "base": Cell(5.0, 0.0, 10, 2),
            "candidate": Cell(4.25, 0.5, 10, 2, (Sample("Q?\n", "teal\n", "tea"),)),
            "pair:task:t": Cell(4.5, 0.25, 10, 2),
        },
        "probe": {"base": Cell(math.nan, math.nan, 0, 0)},
    },
)


def test_a_matrix_round_trips_through_json_with_nan_as_null() -> None:
    data = json.loads(encode_document({"matrix": MATRIX.to_json()}))["matrix"]
    assert data["cells"]["probe"]["base"]["loss"] is None
    back = Matrix.from_json(data)
    assert back.rows == MATRIX.rows and back.columns == MATRIX.columns
    assert back.cell("holdout:personal:p", "candidate") == MATRIX.cell("holdout:personal:p", "candidate")
    assert math.isnan(back.loss("probe", "base")) and math.isnan(back.loss("probe", "missing"))


def test_documents_are_canonical_and_refuse_nan() -> None:
    assert encode_document({"b": 1, "a": [1.5]}) == b'{"a":[1.5],"b":1}'
    with pytest.raises(ValidationError):
        encode_document({"loss": math.nan})


def test_a_report_renders_as_a_table_with_reasons_and_samples() -> None:
    report = QAReport(
        id=7,
        tenant_id=1,
        version_id=3,
        kind="candidate",
        policy_version="qa-policy/2",
        decision="reject",
        reasons=("user-holdout: candidate 4.2500 does not beat",),
        summary={},
        blob_sha256="a" * 64,
        blob_uri="file:///x",
        blob_size_bytes=10,
        job_id=9,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    document = {
        "version": {"number": 2, "adapter_name": "personal"},
        "bank": {
            "user": "alice",
            "sampling": {"bank_size": 9, "sampled": ["task:t"], "left_out": ["task:u"], "budget": 1},
        },
        "sanity": {"passed": True, "max_update_norm": 1.5},
        "matrix": MATRIX.to_json(),
    }
    text = format_report(report, document)
    lines = text.splitlines()
    assert lines[0] == "QA report 7: candidate version 2 (id 3) of adapter 'personal' of user 'alice'"
    assert lines[1].startswith("decision: REJECT   policy: qa-policy/2   job: 9")
    assert "  - user-holdout: candidate 4.2500 does not beat" in lines
    assert "sanity: passed (max update norm 1.5)" in lines
    assert "bank: 9 other members, 1 evaluated (budget 1), left out: task:u" in lines
    header = next(line for line in lines if line.startswith("set (examples)"))
    assert [c.strip() for c in header.split(" | ")[1:]] == ["base", "candidate", "pair:task:t"]
    row = next(line for line in lines if line.startswith("holdout:personal:p (2/3)"))
    assert "5.000 / 0%" in row and "4.250 / 50%" in row and "4.500 / 25%" in row
    assert "  [candidate] Q?\\n -> 'tea' (expected 'teal\\\\n')" in lines


def test_the_summary_keeps_the_own_sets_key_losses_and_rule_outcomes() -> None:
    summary = summary_of(MATRIX, [{"rule": "probe", "passed": False}], {"seconds": 1.0})
    assert summary["rules"] == {"probe": False} and summary["seconds"] == 1.0
    assert summary["own_losses"] == {"base": 5.0, "candidate": 4.25}
    assert (summary["rows"], summary["columns"]) == (2, 3)
