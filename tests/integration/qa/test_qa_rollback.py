"""Automatic rollback: when a bank changes (a task adapter is promoted, a user is enrolled), QA rechecks the
affected live versions and rolls a failing one back to the last version that passes, or to none."""

from __future__ import annotations

from pathlib import Path

import pytest
from qa_helpers import World, feed, key_of, qa_trainer, register_candidate, train_adapter, worker

from lorafleet.jobs import JobQueue, Scheduler
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.reports import load_report, reports_for_version
from lorafleet.qa.sanity import check_adapter
from lorafleet.training import synthetic
from lorafleet.training.dataset import build_dataset
from lorafleet.workflows.feedback import ingest_feedback, list_feedback
from lorafleet.workflows.qa_runner import QARunner
from lorafleet.workflows.qa_triggers import (
    QA_JOB_KIND,
    enrol_and_recheck,
    on_bank_changed,
    submit_candidate_qa,
)

pytestmark = pytest.mark.timeout(300)


def _rounds(world: World, runner: QARunner, user: str, rounds: int) -> None:
    """Train ``rounds`` rounds for a user, each decided by QA (all promoted)."""
    for r in range(1, rounds + 1):
        feed(world, user, round=r, n_records=24 if r == 1 else 16)
        Scheduler(world.db).train_now(tenant_id=world.tenant_id, user_external_id=user)
        done = worker(world, runner, trainer=qa_trainer(world)).run_until_idle()
        assert [j.result and j.result.get("decision") for j in done][-1] == "promote", done


def _refusing_task(world: World, work: Path) -> int:
    """A shared task adapter that answers every personalisation question with "no" (its own holdout improves,
    so QA promotes it), registered as a candidate with a routing key near the users' prompts; its id."""
    records = synthetic.make_user_records("task-author", round=1, n_records=40, seed=3)
    for record in records:
        record["completion"] = "no\n"
    ids = ingest_feedback(
        world.db, tenant_id=world.tenant_id, user_external_id="task-author", records=records
    ).ids
    stored = list_feedback(world.db, tenant_id=world.tenant_id, user_external_id="task-author", limit=1000)
    train = build_dataset(stored, config=world.config).train
    task = world.registry.create_adapter(
        tenant_id=world.tenant_id,
        owner_user_id=None,
        name="refuse",
        target_config=qa_trainer(world).target_config,
    )
    folder = train_adapter(world, train, work=work, steps=20)
    register_candidate(
        world, adapter_id=task.id, folder=folder, record_ids=ids, user_id=None, key=key_of(world, train)
    )
    return task.id


def _submit_task_qa(world: World, task_id: int) -> None:
    (candidate,) = world.registry.list_versions(
        tenant_id=world.tenant_id, adapter_id=task_id, status="candidate"
    )
    with world.db.session() as s:
        submit_candidate_qa(s, queue=JobQueue(world.db), tenant_id=world.tenant_id, version_id=candidate.id)


def test_an_interfering_task_adapter_triggers_rechecks_and_rolls_the_user_back(
    sqlite_world: World, tmp_path: Path
) -> None:
    world = sqlite_world
    runner = QARunner(world.db, world.registry, world.backbone, world.bank)
    _rounds(world, runner, "alice", 2)
    _rounds(world, runner, "bob", 1)
    alice, bob = world.personal("alice"), world.personal("bob")
    v1, v2 = world.registry.list_versions(tenant_id=world.tenant_id, adapter_id=alice)
    bob_live = world.registry.live_version(tenant_id=world.tenant_id, adapter_id=bob)

    task_id = _refusing_task(world, tmp_path / "task")
    _, queued = enrol_and_recheck(
        world.db,
        tenant_id=world.tenant_id,
        user_external_id="alice",
        task_name="refuse",
        actor="tenant-admin",
    )
    assert [j.payload["recheck"]["adapter_id"] for j in queued] == [alice]
    (kept,) = worker(
        world, runner
    ).run_until_idle()  # the task has no live version yet: alice's bank is as it was
    assert kept.result is not None and kept.result["decision"] == "keep"

    _submit_task_qa(world, task_id)
    # QA evaluates a task candidate in its enrolled users' banks by default and would reject this one before it
    # goes live (test_qa_task_adapters.py covers that); with that evaluation off, the recheck after the
    # promotion is what protects alice
    alone = QARunner(
        world.db, world.registry, world.backbone, world.bank, policy=QAPolicy(max_enrolled_users=0)
    )
    done = worker(world, alone).run_until_idle()
    # the task's QA promotes it and queues a recheck for its enrolled users (alice, not bob): alice rolls back
    assert [(j.kind, j.state, j.result and j.result["decision"]) for j in done] == [
        (QA_JOB_KIND, "succeeded", "promote"),
        (QA_JOB_KIND, "succeeded", "rollback"),
    ]
    assert done[1].payload == {
        "recheck": {"adapter_id": alice, "cause": "task adapter 'refuse' promoted to version 1"}
    }
    task_live = world.registry.live_version(tenant_id=world.tenant_id, adapter_id=task_id)
    assert task_live is not None
    assert done[1].result is not None
    rollback_report_id = done[1].result["report_id"]
    report, document = load_report(world.db, world.registry, report_id=rollback_report_id)
    assert (report.kind, report.decision, report.version_id) == ("recheck", "rollback", v2.id)
    assert report.reasons[0].startswith("gate-vs-best-member: worse than the best single member")
    assert "holdout:personal:personal" in report.reasons[0]
    assert document["cause"] == "task adapter 'refuse' promoted to version 1"
    assert document["bank"]["members"] == ["personal:personal", "task:refuse"]
    (trial,) = document["rollback"]["trials"]  # v1 was tried in the same bank
    assert trial["version_id"] == v1.id
    target = v1.id if trial["passed"] else None
    assert (
        document["rollback"]["to_version_id"] == target and report.summary["rollback_to_version_id"] == target
    )

    last = world.registry.alias_history(tenant_id=world.tenant_id, adapter_id=alice)[-1]
    assert (last.actor, last.reason, last.from_version_id, last.to_version_id) == (
        "qa",
        f"qa-regression {rollback_report_id}",
        v2.id,
        target,
    )
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=bob) == bob_live
    lineage = world.registry.lineage(tenant_id=world.tenant_id, version_id=v2.id)
    assert [(r.kind, r.decision) for r in lineage.root.qa_reports] == [
        ("candidate", "promote"),
        ("recheck", "keep"),
        ("recheck", "rollback"),
    ]


def test_a_live_version_that_now_fails_rolls_back_to_the_last_version_that_passes(
    sqlite_world: World, tmp_path: Path
) -> None:
    world = sqlite_world
    runner = QARunner(world.db, world.registry, world.backbone, world.bank)
    _rounds(world, runner, "alice", 2)
    adapter_id = world.personal("alice")
    adapter = world.registry.get_adapter(tenant_id=world.tenant_id, adapter_id=adapter_id)
    v1, v2 = world.registry.list_versions(tenant_id=world.tenant_id, adapter_id=adapter_id)
    norms = []
    for version in (v1, v2):
        folder = world.registry.fetch_version(version=version, dest_dir=tmp_path / f"v{version.number}")
        result = check_adapter(folder, version=version, adapter=adapter, bank=world.bank, policy=QAPolicy())
        norms.append(max(result.update_norms.values()))
    assert norms[0] < norms[1], norms  # v2 continued training from v1
    tightened = QAPolicy(version="qa-policy/tight", max_update_norm=(norms[0] + norms[1]) / 2)

    (job,) = on_bank_changed(
        world.db, tenant_id=world.tenant_id, user_ids=[world.user_id("alice")], cause="policy"
    )
    (done,) = worker(
        world, QARunner(world.db, world.registry, world.backbone, world.bank, policy=tightened)
    ).run_until_idle()

    assert done.id == job.id and done.result is not None and done.result["decision"] == "rollback"
    report, document = load_report(world.db, world.registry, report_id=done.result["report_id"])
    assert report.policy_version == "qa-policy/tight" and report.reasons[0].startswith("sanity/update-norm")
    assert report.reasons[-1] == "rollback to version 1 (1 earlier versions tried)"
    assert document["matrix"] is None and document["rollback"]["trials"][0]["passed"] is True
    live = world.registry.live_version(tenant_id=world.tenant_id, adapter_id=adapter_id)
    assert live is not None and live.id == v1.id
    last = world.registry.alias_history(tenant_id=world.tenant_id, adapter_id=adapter_id)[-1]
    assert last.reason == f"qa-regression {report.id}" and last.to_version_id == v1.id
    assert reports_for_version(world.db, tenant_id=world.tenant_id, version_id=v1.id)[0].decision == "promote"


def test_a_recheck_without_a_live_version_decides_nothing(sqlite_world: World) -> None:
    world = sqlite_world
    feed(world, "dave", n_records=8)
    runner = QARunner(world.db, world.registry, world.backbone, world.bank)
    adapter = qa_trainer(world).registry.get_or_create_adapter(
        tenant_id=world.tenant_id,
        owner_user_id=world.user_id("dave"),
        name="personal",
        target_config=qa_trainer(world).target_config,
    )
    assert (
        on_bank_changed(world.db, tenant_id=world.tenant_id, user_ids=[world.user_id("dave")], cause="x")
        == []
    )
    assert runner.run_recheck(tenant_id=world.tenant_id, adapter_id=adapter.id) is None
