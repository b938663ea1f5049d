"""Shared task adapters through the SDK and the HTTP API: task feedback (creates the task; deduplicated and
idempotent like a user's), listing, training on demand, import submission, versions, promote and rollback with
the history and the rechecks they queue, and serving that follows a task rollback at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from api_helpers import Library, TenantHandle, live_personal_version, live_task_version, sft

from lorafleet.routing.experts import set_gate_spec
from lorafleet.routing.spec import GateSpec
from lorafleet.sdk import errors


def test_task_feedback_creates_the_task_and_trains_like_a_user(
    tenant: TenantHandle,
) -> None:
    client = tenant.client
    first = client.submit_task_feedback("sql", [sft("q1"), sft("q2"), sft("q1")], idempotency_key="k-1")
    assert (first.created, first.duplicates) == (2, 1)
    again = client.submit_task_feedback("sql", [sft("q1"), sft("q2"), sft("q1")], idempotency_key="k-1")
    assert again == first  # replayed, nothing stored twice
    assert [r.payload["prompt"] for r in client.list_task_feedback("sql")] == ["q1", "q2"]
    [task] = client.list_tasks()
    assert (task.name, task.live_version, task.versions, task.feedback_records) == ("sql", None, 0, 2)
    assert client.enrol("ann", "sql").task == "sql"
    assert client.task_enrolments("sql").users == ["ann"]

    submitted = client.train_task("sql")
    assert submitted.created and submitted.job.kind == "train" and submitted.job.users == ["task:sql"]
    assert client.train_task("sql").job.id == submitted.job.id  # an active job is returned, not doubled
    with pytest.raises(errors.ValidationFailed):
        client.submit_task_feedback("sql", [{"kind": "sft", "prompt": "only a prompt"}])
    with pytest.raises(errors.NotFound):
        client.train_task("no-feedback-yet")
    with pytest.raises(errors.NotFound):
        client.list_task_versions("no-such-task")


def test_an_import_is_queued_as_a_job_for_a_trainer(
    tenant: TenantHandle, adapter_folder: Callable[[int], Path]
) -> None:
    client = tenant.client
    submitted = client.import_task_adapter("tone", adapter_folder(3), ["Be polite: hello"], reason="vendor")
    assert submitted.created and len(submitted.archive_sha256) == 64
    job = submitted.job
    assert (job.kind, job.state) == ("import", "queued")  # no workers in this server: it waits for one
    again = client.import_task_adapter("tone", adapter_folder(3), ["Be polite: hello"])
    assert again.job.id == job.id and not again.created  # the same archive for the same task: one job
    with pytest.raises(errors.ValidationFailed):
        client.import_task_adapter("tone", b"not an archive at all", ["Be polite: hello"])
    with pytest.raises(errors.ValidationFailed):
        client.import_task_adapter("tone", adapter_folder(3), [])


def test_an_import_carries_its_examples_as_evidence_and_bad_ones_are_refused(
    tenant: TenantHandle, library: Library, adapter_folder: Callable[[int], Path]
) -> None:
    client = tenant.client
    examples = [("Be polite: hello", "Good day to you"), ("Be polite: bye", "Farewell, kind friend")]
    submitted = client.import_task_adapter("tone", adapter_folder(4), ["Be polite: hello"], examples=examples)
    payload = library.queue.get(tenant_id=None, job_id=submitted.job.id).payload
    assert [(e["prompt"], e["expected"]) for e in payload["examples"]] == examples  # QA's holdout for it
    plain = client.import_task_adapter("tone", adapter_folder(5), ["Be polite: hello"])
    assert not library.queue.get(tenant_id=None, job_id=plain.job.id).payload.get("examples")
    with pytest.raises(errors.ValidationFailed):
        client.import_task_adapter(
            "tone", adapter_folder(6), ["Be polite: hello"], examples=[("Be polite: x", "")]
        )


def test_task_promote_and_rollback_move_live_and_serving_follows(
    tenant: TenantHandle, library: Library, adapter_folder: Callable[[int], Path]
) -> None:
    client = tenant.client
    live_personal_version(library, tenant_id=tenant.id, user="uma", folder=adapter_folder(7))
    client.submit_task_feedback("legal", [sft("contract")])
    assert live_task_version(library, tenant_id=tenant.id, task="legal", folder=adapter_folder(8)) == 1
    assert live_task_version(library, tenant_id=tenant.id, task="legal", folder=adapter_folder(9)) == 2
    client.enrol("uma", "legal")
    weights = {"personal": 0.5, "legal": 0.5}
    spec = GateSpec(kind="fixed", fixed_weights=weights)
    set_gate_spec(library.db, tenant_id=tenant.id, user_external_id="uma", spec=spec, actor="test")
    assert client.generate("uma", "Hello", max_tokens=2).versions == {"personal": 1, "legal": 2}

    event = client.rollback_task("legal", 1, reason="bad release")
    assert (event.adapter, event.from_version, event.to_version, event.reason) == (
        "legal",
        2,
        1,
        "bad release",
    )
    assert client.generate("uma", "Hello", max_tokens=2).versions == {"personal": 1, "legal": 1}
    # uma's bank is to be rechecked: the recheck queued by her enrolment (no worker ran it) covers this change too
    assert [(j.kind, j.state) for j in client.list_jobs() if j.kind == "qa"] == [("qa", "queued")]
    assert [v.status for v in client.list_task_versions("legal")] == ["live", "archived"]
    assert client.get_task_version("legal", 1).status == "live"

    client.promote_task("legal", 2, reason="fixed")
    assert client.generate("uma", "Hello", max_tokens=2).versions == {"personal": 1, "legal": 2}
    history = client.task_history("legal")
    assert [(e.from_version, e.to_version) for e in history][-2:] == [(2, 1), (1, 2)]
    assert client.task_lineage("legal", 2).root.version.number == 2
    client.rollback_task("legal", None, reason="off for now")
    assert client.generate("uma", "Hello", max_tokens=2).versions == {"personal": 1}
