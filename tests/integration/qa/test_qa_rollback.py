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
from lorafleet.routing.experts import enrolment_history, resolve_user_experts
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
        feed(world, user, round=r, n_records=24 if r == 1 else 64)
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
    submit_candidate_qa(queue=JobQueue(world.db), tenant_id=world.tenant_id, version_id=candidate.id)


def _promote_interfering_task(world: World, runner: QARunner, tmp_path: Path) -> tuple[int, int, int]:
    """alice (two rounds) and bob (one) live; alice enrolled in a refusing task, which QA then promotes with the
    enrolled-bank evaluation off (on, it would reject it before it goes live: test_qa_task_adapters.py), so the
    recheck after the promotion is what protects alice. Returns (alice's adapter, bob's, the task's) ids."""
    _rounds(world, runner, "alice", 2)
    _rounds(world, runner, "bob", 1)
    alice = world.personal("alice")
    task_id = _refusing_task(world, tmp_path / "task")
    _, queued = enrol_and_recheck(
        world.db,
        tenant_id=world.tenant_id,
        user_external_id="alice",
        task_name="refuse",
        actor="tenant-admin",
    )
    assert [j.payload["recheck"] for j in queued] == [
        {"adapter_id": alice, "cause": "enrolled in task adapter 'refuse'", "changed_adapter_id": task_id}
    ]
    (kept,) = worker(
        world, runner
    ).run_until_idle()  # the task has no live version yet: the bank is as it was
    assert kept.result is not None and kept.result["decision"] == "keep"
    _submit_task_qa(world, task_id)
    return alice, world.personal("bob"), task_id


@pytest.mark.parametrize("action", ["unenrol", "rollback-task"])
def test_an_interfering_task_adapter_is_blamed_and_the_users_own_adapter_stays_live(
    sqlite_world: World, tmp_path: Path, action: str
) -> None:
    """The finding: a bad task adapter's promotion made an enrolled user's experts fail, and QA rolled back the
    user's innocent personal adapter while the task stayed live. Now the bank is evaluated without the task,
    passes, and the task is what QA acts on (``QAPolicy.blame_action``)."""
    world = sqlite_world
    runner = QARunner(world.resident)
    alice, bob, task_id = _promote_interfering_task(world, runner, tmp_path)
    alice_live = world.registry.live_version(tenant_id=world.tenant_id, adapter_id=alice)
    bob_live = world.registry.live_version(tenant_id=world.tenant_id, adapter_id=bob)
    policy = QAPolicy(max_enrolled_users=0, blame_action=action)
    done = worker(world, QARunner(world.resident, policy=policy)).run_until_idle()

    # the task's QA promotes it and queues a recheck for its enrolled users (alice, not bob): alice's bank
    # fails, the bank without the task passes, so the task is to blame and alice's v2 is kept
    assert [(j.kind, j.state, j.result and j.result["decision"]) for j in done][:2] == [
        (QA_JOB_KIND, "succeeded", "promote"),
        (QA_JOB_KIND, "succeeded", "keep"),
    ]
    assert done[1].payload == {
        "recheck": {
            "adapter_id": alice,
            "cause": "task adapter 'refuse' promoted to version 1",
            "changed_adapter_id": task_id,
        }
    }
    assert done[1].result is not None
    report, document = load_report(world.db, world.registry, report_id=done[1].result["report_id"])
    assert alice_live is not None and (report.kind, report.decision, report.version_id) == (
        "recheck",
        "keep",
        alice_live.id,
    )
    assert report.reasons[0].startswith("gate-vs-best-member: worse than the best single member")
    assert report.reasons[-1].startswith("blame: task:refuse (without it the bank passes); ")
    assert report.reasons[-1].endswith("the personal adapter stays live")
    assert document["bank"]["members"] == ["personal:personal", "task:refuse"]
    assert document["blame"]["culprit"] == "task:refuse" and document["blame"]["action"] == action
    assert [t["without"] for t in document["blame"]["trials"]] == ["task:refuse"]
    assert document["blame"]["trials"][0]["passed"] is True
    assert document["rollback"] == {"to_version_id": None, "trials": []}
    # alice's own adapter and bob's are untouched
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=alice) == alice_live
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=bob) == bob_live
    assert world.registry.alias_history(tenant_id=world.tenant_id, adapter_id=alice)[-1].actor == "qa"
    assert (
        "qa-regression"
        not in world.registry.alias_history(tenant_id=world.tenant_id, adapter_id=alice)[-1].reason
    )
    members = [
        m.adapter_name
        for m in resolve_user_experts(world.db, tenant_id=world.tenant_id, user_external_id="alice").members
    ]
    task_history = world.registry.alias_history(tenant_id=world.tenant_id, adapter_id=task_id)
    if action == "unenrol":
        # alice leaves the task (recorded as QA's doing); the task stays live for anyone else
        assert members == ["personal"] and len(done) == 2
        assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=task_id) is not None
        (event,) = [
            e
            for e in enrolment_history(world.db, tenant_id=world.tenant_id, user_external_id="alice")
            if e.action == "unenrol"
        ]
        assert event.actor == "qa"
    else:
        # the task's live version goes back (to none: it had no earlier one); that would recheck its enrolled
        # users, but alice's recheck is this very job (one per adapter: its dedupe key), and it has just passed
        # the bank without the task
        assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=task_id) is None
        last = task_history[-1]
        assert (last.actor, last.reason, last.to_version_id) == ("qa", f"qa-blame {report.id}", None)
        assert members == ["personal"]  # still enrolled, but a task without a live version serves nothing
        assert len(done) == 2


def test_a_live_version_that_now_fails_rolls_back_to_the_last_version_that_passes(
    sqlite_world: World, tmp_path: Path
) -> None:
    world = sqlite_world
    runner = QARunner(world.resident)
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
    (done,) = worker(world, QARunner(world.resident, policy=tightened)).run_until_idle()

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
    runner = QARunner(world.resident)
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
