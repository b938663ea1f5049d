"""The typed contracts of ``lorafleet.domain``: enums are their strings, one Subject codec, job payload shapes."""

from __future__ import annotations

import json

import pytest

from lorafleet.domain import JobState, SubjectKind, VersionStatus
from lorafleet.domain.jobs import (
    ImportPayload,
    ImportResult,
    QAPayload,
    QAResult,
    TrainPayload,
    TrainResult,
)
from lorafleet.domain.subject import TASK_SUBJECT_PREFIX, Subject, task_subject_id
from lorafleet.errors import ValidationError
from lorafleet.store.sql import models


def test_enum_members_are_their_strings_in_comparisons_formatting_and_json() -> None:
    assert (
        JobState.QUEUED == "queued" and f"{JobState.QUEUED}" == "queued" and str(VersionStatus.LIVE) == "live"
    )
    assert json.dumps({"state": JobState.FAILED}) == '{"state": "failed"}'
    assert models.JOB_STATES == ("queued", "running", "succeeded", "failed", "cancelled")
    assert models.ACTIVE_JOB_STATES == ("queued", "running")
    assert all(type(v) is str for v in models.VERSION_STATUSES)


def test_a_subject_encodes_and_decodes_the_task_prefix_in_one_place() -> None:
    task = Subject.task("sql")
    assert task.external_id == TASK_SUBJECT_PREFIX + "sql" == task_subject_id("sql")
    assert task.label == "task:sql" and task.task_name == "sql" and task.is_task
    assert Subject.from_external_id(task.external_id) == task
    assert Subject.from_row("task", task.external_id) == task
    user = Subject.from_row(SubjectKind.USER, "ann")
    assert (user.external_id, user.label, user.task_name) == ("ann", "ann", None)


def test_old_train_payloads_parse_and_new_ones_keep_the_stored_shape() -> None:
    old = {"users": [{"user_id": 3, "external_id": "ann", "watermark": 9}]}  # before kinds and configs
    parsed = TrainPayload.parse(old)
    assert parsed.training is None and parsed.users[0].kind == "user"
    new = {
        "training": {"rank": 4},
        "users": [
            {
                "user_id": 3,
                "external_id": task_subject_id("sql"),
                "kind": "task",
                "watermark": 9,
                "trained_through_id": None,
            }
        ],
    }
    assert TrainPayload.parse(new).to_json() == new
    with pytest.raises(ValidationError, match="train job payload"):
        TrainPayload.parse({"users": []})


def test_qa_and_import_payloads_round_trip_and_results_keep_their_keys() -> None:
    assert QAPayload.candidate(7).to_json() == {"version_id": 7}
    recheck = {"recheck": {"adapter_id": 2, "cause": "enrolled"}}
    assert QAPayload.parse(recheck).to_json() == recheck
    with pytest.raises(ValidationError, match="qa job payload"):
        QAPayload.parse({"version_id": True})
    payload = {
        "task": "sql",
        "archive_sha256": "ab" * 32,
        "archive_size": 10,
        "example_prompts": ["q"],
        "actor": "cli",
        "reason": "",
    }
    assert ImportPayload.parse(payload).to_json() == payload  # without examples: as before they existed
    evidence = {**payload, "examples": [{"prompt": "q", "expected": "a"}]}
    assert ImportPayload.parse(evidence).to_json() == evidence
    assert TrainResult(skipped={"ann": "no_new_records"}).to_json() == {
        "versions": [],
        "skipped": {"ann": "no_new_records"},
    }
    assert QAResult(skipped="nothing to decide").to_json() == {"skipped": "nothing to decide"}
    imported = ImportResult(
        task="sql", adapter_id=1, version_id=2, number=1, parent_version_id=None, source_sha256="x"
    )
    assert "qa_job" not in imported.to_json() and imported.to_json()["parent_version_id"] is None
