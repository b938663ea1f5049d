"""Shared task adapters end to end in-process: trained from task feedback in a job with users, QA'd in enrolled
users' experts, served to enrolled users through the gate, unenrolment effective on the next request, and a
harmful task version rejected because it degrades an enrolled user's own holdout."""

from __future__ import annotations

from pathlib import Path

import pytest
from qa_helpers import (
    World,
    adversarial,
    feed,
    key_of,
    qa_trainer,
    register_candidate,
    train_adapter,
    user_examples,
    worker,
)

from lorafleet.errors import QAUndecidedError, ValidationError
from lorafleet.jobs import JobQueue
from lorafleet.jobs.scheduler import Scheduler, SchedulerPolicy
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.reports import load_report, reports_for_version
from lorafleet.qa.results import Matrix
from lorafleet.routing.experts import enrol, unenrol
from lorafleet.sdk.calls import pack_adapter_folder
from lorafleet.serving.cache import AdapterCache
from lorafleet.serving.engine import GenerationEngine, database_resolver
from lorafleet.serving.requests import GenerationRequest
from lorafleet.store.sql.qa_repository import QARepository
from lorafleet.store.sql.tenants import find_user, task_subject_id
from lorafleet.training.synthetic_routing import task_split
from lorafleet.workflows.import_jobs import IMPORT_JOB_KIND, ImportRunner, submit_import
from lorafleet.workflows.qa_runner import QARunner
from lorafleet.workflows.tasks import get_task_adapter, ingest_task_feedback, list_tasks, move_task_live

TASK = "favourite"


def _task_records(n_train: int = 32, seed: int = 0) -> list[dict[str, str]]:
    train, _ = task_split(TASK, n_train=n_train, n_holdout=1, seed=seed)
    return [{"kind": "sft", "prompt": e.prompt, "completion": e.completion} for e in train]


def _run_all(world: World, runner: QARunner) -> int:
    w, ran = worker(world, runner, trainer=qa_trainer(world)), 0
    while w.run_once() is not None:
        ran += 1
    return ran


def _subject_id(world: World) -> int:
    with world.db.session() as s:
        row = find_user(s, tenant_id=world.tenant_id, external_id=task_subject_id(TASK), kind="task")
        assert row is not None
        return row.id


def test_a_task_trained_from_its_feedback_serves_its_enrolled_users_until_they_leave(
    sqlite_world: World,
) -> None:
    world = sqlite_world
    ingest_task_feedback(world.db, tenant_id=world.tenant_id, task_name=TASK, records=_task_records())
    for user in ("alice", "bob"):
        feed(world, user, n_records=24)
        enrol(world.db, tenant_id=world.tenant_id, user_external_id=user, task_name=TASK, actor="test")

    tick = Scheduler(world.db, SchedulerPolicy(min_new_records=1)).tick()
    [job] = tick.jobs_created  # one job mixes the users' adapters and the task's
    assert sorted(u["kind"] for u in job.payload["users"]) == ["task", "user", "user"]
    runner = QARunner(world.resident)
    assert _run_all(world, runner) == 4  # the train job and a QA job per new version

    task = get_task_adapter(world.registry, tenant_id=world.tenant_id, task_name=TASK)
    [version] = world.registry.list_versions(tenant_id=world.tenant_id, adapter_id=task.id)
    [report] = reports_for_version(world.db, tenant_id=world.tenant_id, version_id=version.id)
    assert version.status == "live", report.reasons
    with world.db.session() as s:  # its routing key and claim were computed when it was trained
        assert None not in QARepository(dialect=world.db.dialect).routing(s, version_id=version.id)
    _, document = load_report(world.db, world.registry, report_id=report.id, tenant_id=world.tenant_id)
    assert report.decision == "promote", report.reasons
    assert sorted(document["enrolled"]["evaluated"]) == ["alice", "bob"]  # evaluated in their banks too
    assert all(b["passed"] and b["matrix"] for b in document["enrolled"]["banks"])
    [info] = list_tasks(world.db, tenant_id=world.tenant_id)
    assert (info.name, info.live_version, info.enrolled_users, info.feedback_records) == (TASK, 1, 2, 32)
    assert Scheduler(world.db, SchedulerPolicy(min_new_records=1)).tick().jobs_created == []  # all trained

    _, holdout = task_split(TASK, n_train=32, n_holdout=6, seed=0)
    task_prompts = [e.prompt for e in holdout]
    own_prompts = [e.prompt for e in user_examples(world, "alice")[:6]]
    engine = GenerationEngine(
        world.backbone,
        world.bank,
        AdapterCache.from_blob_store(world.bank, world.registry.blobs),
        resolve_bank=database_resolver(world.db),
    )
    try:

        def ask(user: str, prompts: list[str]) -> list[tuple[str, dict[str, float]]]:
            requests = [GenerationRequest(world.tenant_id, user, p, max_new_tokens=8) for p in prompts]
            return [(r.text, {b.adapter: b.weight for b in r.served_by}) for r in engine.generate(requests)]

        def top(weights: dict[str, float]) -> str:
            return max(weights, key=lambda name: weights[name])

        enrolled = ask("bob", task_prompts)
        # the gate sends task prompts to the task adapter, and the user's own prompts to their own adapter
        assert sum(top(w) == TASK for _t, w in enrolled) > len(task_prompts) / 2, enrolled
        assert sum(top(w) == "personal" for _t, w in ask("alice", own_prompts)) > len(own_prompts) / 2

        unenrol(world.db, tenant_id=world.tenant_id, user_external_id="bob", task_name=TASK, actor="test")
        after = ask("bob", task_prompts)  # the very next request is served without the task
        assert all(TASK not in w for _t, w in after)
        assert [t for t, _w in after] != [t for t, _w in enrolled]  # and the answers change

        # a task rollback moves its live alias like any other: alice's next request is served without it,
        # and QA is asked to recheck alice's live adapter in the changed bank
        assert any(TASK in w for _t, w in ask("alice", task_prompts))
        event = move_task_live(
            world.db,
            world.registry,
            tenant_id=world.tenant_id,
            task_name=TASK,
            to_number=None,
            action="rollback",
            actor="test",
            reason="bad release",
        )
        assert (event.from_version_id, event.to_version_id, event.actor) == (version.id, None, "test")
        assert all(TASK not in w for _t, w in ask("alice", task_prompts))
        queued = JobQueue(world.db).list_jobs(tenant_id=world.tenant_id, state="queued")
        assert [j.payload["recheck"]["adapter_id"] for j in queued] == [world.personal("alice")]
    finally:
        for slot in list(world.bank.occupied()):
            world.bank.evict_slot(slot)


def test_a_task_version_that_degrades_an_enrolled_users_holdout_is_rejected(
    sqlite_world: World, tmp_path: Path
) -> None:
    world = sqlite_world
    runner = QARunner(world.resident)
    feed(world, "alice", n_records=24)
    ids = ingest_task_feedback(
        world.db, tenant_id=world.tenant_id, task_name=TASK, records=_task_records(n_train=24)
    ).ids
    Scheduler(world.db, SchedulerPolicy(min_new_records=1)).train_now(
        tenant_id=world.tenant_id, user_external_id="alice"
    )
    _run_all(world, runner)  # alice's personal adapter trained and promoted through QA
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=world.personal("alice"))
    enrol(world.db, tenant_id=world.tenant_id, user_external_id="alice", task_name=TASK, actor="test")
    task = get_task_adapter(world.registry, tenant_id=world.tenant_id, task_name=TASK)
    task_train, _ = task_split(TASK, n_train=24, n_holdout=1, seed=0)
    alice = user_examples(world, "alice")

    def candidate(examples: list, key_examples: list, work: str) -> int:
        folder = train_adapter(world, examples, work=tmp_path / work)
        return register_candidate(
            world,
            adapter_id=task.id,
            folder=folder,
            record_ids=ids,
            user_id=_subject_id(world),
            key=key_of(world, key_examples),
        ).id

    # poisoned: the task data plus alice's prompts answered with someone else's preferences, keyed on them
    harmful = candidate([*task_train, *adversarial(alice)], alice, "harmful")
    report = runner.run_candidate(tenant_id=world.tenant_id, version_id=harmful)
    assert report is not None and report.decision == "reject"
    assert any(r.startswith("user alice: no-regression") for r in report.reasons), report.reasons
    assert report.summary["enrolled_users_evaluated"] == 1
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=task.id) is None

    benign = candidate(task_train, task_train, "benign")  # the same task without the poison
    report = runner.run_candidate(tenant_id=world.tenant_id, version_id=benign)
    assert report is not None and report.decision == "promote", report.reasons
    live = world.registry.live_version(tenant_id=world.tenant_id, adapter_id=task.id)
    assert live is not None and live.id == benign


def test_an_imported_peft_adapter_goes_through_its_import_job_and_qa_like_a_trained_version(
    sqlite_world: World, tmp_path: Path
) -> None:
    world = sqlite_world
    # answers decide here (QAPolicy.answer_evidence "require"; the default only reports them)
    require = QAPolicy(answer_evidence="require")
    runner = QARunner(world.resident, policy=require)
    imports = ImportRunner(world.resident, promote_rule="qa")
    w = worker(world, runner, trainer=qa_trainer(world))
    w.handlers[IMPORT_JOB_KIND] = imports.run_job
    task_train, task_holdout = task_split(TASK, n_train=24, n_holdout=8, seed=0)
    prompts = [e.prompt for e in task_train[:8]]

    def submit(seed: int, examples: list[dict[str, str]] | None = None) -> int:
        folder = train_adapter(world, task_train, work=tmp_path / f"peft-{seed}", seed=seed)
        archive = pack_adapter_folder(folder)  # what the SDK uploads for a folder
        submitted = submit_import(
            world.db,
            world.registry,
            tenant_id=world.tenant_id,
            task_name=TASK,
            archive=archive,
            example_prompts=prompts,
            actor="test",
            examples=examples or [],
        )
        while w.run_once() is not None:
            pass
        job = JobQueue(world.db).get(tenant_id=world.tenant_id, job_id=submitted.job.id)
        assert job.state == "succeeded", job.error
        assert job.result is not None and job.result["qa_job"] > 0
        return int(job.result["version_id"])

    # no examples and no task feedback: no evidence, so QA holds it as a candidate for a person to decide
    first = submit(seed=1)
    task = get_task_adapter(world.registry, tenant_id=world.tenant_id, task_name=TASK)
    [held] = world.registry.list_versions(tenant_id=world.tenant_id, adapter_id=task.id)
    assert (held.id, held.status) == (first, "candidate")
    [report] = reports_for_version(world.db, tenant_id=world.tenant_id, version_id=first)
    assert report.decision == "hold" and report.reasons[0].startswith("no-evidence: "), report.reasons
    with pytest.raises(QAUndecidedError):
        world.promote(adapter=task, number=1, actor="test", reason="try")
    world.promote(adapter=task, number=1, actor="ops", reason="vetted by hand", force=True)
    while w.run_once() is not None:  # the forced version's QA job: no evidence, the person's force decides
        pass
    reports = reports_for_version(world.db, tenant_id=world.tenant_id, version_id=first)
    assert [r.decision for r in reports] == ["hold", "keep"], [r.reasons for r in reports]

    # an import that carries examples with expected outputs is answered on them: trained like the live one, it
    # answers no better than it, so it is rejected for no improvement (the figures come from its examples)
    evidence = [{"prompt": e.prompt, "expected": e.completion} for e in task_holdout]
    second = submit(seed=2, examples=evidence)
    versions = world.registry.list_versions(tenant_id=world.tenant_id, adapter_id=task.id)
    assert [(v.id, v.status) for v in versions] == [(first, "live"), (second, "rejected")]
    [report] = reports_for_version(world.db, tenant_id=world.tenant_id, version_id=second)
    assert report.summary["answers"]["source"] == "import-examples", report.summary
    assert report.summary["answers"]["answers"] == len(evidence)
    assert report.summary["answers"]["reference"] == "previous"
    assert any(r.startswith("no-improvement:") and "vs previous live" in r for r in report.reasons), (
        report.reasons
    )
    assert versions[1].training_config["source"] == "peft-import"
    assert versions[1].training_config["evidence"] == evidence
    lineage = world.registry.lineage(tenant_id=world.tenant_id, version_id=second)
    assert [(e.child_version_id, e.parent_version_id, e.relation) for e in lineage.edges] == [
        (second, first, "imported")
    ]
    with world.db.session() as s:
        assert None not in QARepository(dialect=world.db.dialect).routing(s, version_id=second)

    # once the task has feedback, an import is scored on the holdout of it (whatever QA then decides)
    ingest_task_feedback(
        world.db, tenant_id=world.tenant_id, task_name=TASK, records=_task_records(n_train=24)
    )
    third = submit(seed=3)
    [report] = reports_for_version(world.db, tenant_id=world.tenant_id, version_id=third)
    _, document = load_report(world.db, world.registry, report_id=report.id, tenant_id=world.tenant_id)
    own = Matrix.from_json(document["matrix"]).rows[0]
    assert own.own and own.kind == "task-holdout" and own.examples > 0

    with pytest.raises(ValidationError, match="not a .tar"):  # refused before anything is stored or queued
        submit_import(
            world.db,
            world.registry,
            tenant_id=world.tenant_id,
            task_name=TASK,
            archive=b"plain text",
            example_prompts=prompts,
            actor="test",
        )
