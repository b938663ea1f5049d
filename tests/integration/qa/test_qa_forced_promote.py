"""No live version without a decision: under the promote rule ``qa`` a person's promote of a version QA has not
passed is refused unless forced; a forced one is recorded as such, and QA, when its job runs, evaluates the live
version instead of skipping it: it rolls a bad one back (and rejects it) and keeps a good one."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from qa_helpers import (
    World,
    adversarial,
    feed,
    qa_trainer,
    register_candidate,
    train_adapter,
    user_examples,
    worker,
)

from lorafleet.domain import AdapterVersion, AliasEvent
from lorafleet.errors import InvalidStateError, QAUndecidedError
from lorafleet.jobs import JobQueue, Scheduler
from lorafleet.qa.reports import load_report, reports_for_version
from lorafleet.workflows.live_alias import versions_qa
from lorafleet.workflows.qa_runner import QARunner, StaleEvaluationError
from lorafleet.workflows.qa_triggers import QA_JOB_KIND, submit_candidate_qa

pytestmark = pytest.mark.timeout(300)


def _first_round(world: World, runner: QARunner, user: str) -> AdapterVersion:
    """Train a user's first version through a train job and the QA job it queues (promoted); the version."""
    feed(world, user, round=1, n_records=24)
    Scheduler(world.db).train_now(tenant_id=world.tenant_id, user_external_id=user)
    done = worker(world, runner, trainer=qa_trainer(world)).run_until_idle()
    assert [j.result and j.result.get("decision") for j in done] == [None, "promote"], done
    live = world.registry.live_version(tenant_id=world.tenant_id, adapter_id=world.personal(user))
    assert live is not None
    return live


def _candidate_with_qa_queued(world: World, user: str, folder: Path, parent: AdapterVersion | None) -> int:
    """Register ``folder`` as the user's next candidate and queue its QA job, as a train job under the promote
    rule ``qa`` does; the version's id."""
    examples = user_examples(world, user)
    version = register_candidate(
        world,
        adapter_id=world.personal(user),
        folder=folder,
        record_ids=[e.record_id for e in examples],
        user_id=world.user_id(user),
        parent=parent,
    )
    submit_candidate_qa(queue=JobQueue(world.db), tenant_id=world.tenant_id, version_id=version.id)
    return version.id


def _promote(world: World, user: str, number: int, *, force: bool = False) -> AliasEvent:
    adapter = world.registry.get_adapter(tenant_id=world.tenant_id, adapter_id=world.personal(user))
    return world.promote(
        adapter=adapter, number=number, actor="ops@acme", reason="hotfix before QA", force=force
    )


def _qa_state(world: World, user: str, version_id: int) -> tuple[str, bool]:
    found = versions_qa(
        world.db,
        world.registry,
        tenant_id=world.tenant_id,
        adapter_id=world.personal(user),
        version_ids=[version_id],
    )[version_id]
    return found.state, found.forced_live


def test_a_bad_version_promoted_before_qa_is_evaluated_and_rolled_back(world: World, tmp_path: Path) -> None:
    runner = QARunner(world.resident)
    v1 = _first_round(world, runner, "alice")
    adapter_id = world.personal("alice")
    harmful = train_adapter(world, adversarial(user_examples(world, "alice")), work=tmp_path / "harm")
    v2_id = _candidate_with_qa_queued(world, "alice", harmful, v1)
    history = world.registry.alias_history(tenant_id=world.tenant_id, adapter_id=adapter_id)

    # without force: refused, nothing changes
    with pytest.raises(QAUndecidedError, match="version 2 of 'personal' has no passing QA decision"):
        _promote(world, "alice", 2)
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=adapter_id) == v1
    assert world.registry.alias_history(tenant_id=world.tenant_id, adapter_id=adapter_id) == history

    # forced: live, recorded as forced, and its QA job (the one already queued) still pending
    event = _promote(world, "alice", 2, force=True)
    assert (event.forced, event.actor, event.reason, event.to_version_id) == (
        True,
        "ops@acme",
        "hotfix before QA",
        v2_id,
    )
    assert _qa_state(world, "alice", v2_id) == ("undecided", True)  # served without a decision: visible
    queued = JobQueue(world.db).list_jobs(tenant_id=world.tenant_id, state="queued")
    assert [(j.kind, j.payload) for j in queued] == [(QA_JOB_KIND, {"version_id": v2_id})]

    # QA runs: it evaluates the live version (no "nothing to decide") and rolls it back
    (done,) = worker(world, runner).run_until_idle()
    assert done.state == "succeeded" and done.result is not None
    assert done.result["decision"] == "rollback" and "skipped" not in done.result
    (report,) = reports_for_version(world.db, tenant_id=world.tenant_id, version_id=v2_id)
    assert (report.kind, report.decision) == ("candidate", "rollback")
    assert any(r.startswith("user-holdout: candidate") and "does not beat" in r for r in report.reasons)
    assert report.reasons[-1] == "forced live without a QA decision: rollback to version 1"
    _, document = load_report(world.db, world.registry, report_id=report.id)
    assert document["forced_live"] is True and document["previous"]["id"] == v1.id
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=adapter_id).id == v1.id
    after = world.registry.get_version_by_id(tenant_id=world.tenant_id, version_id=v2_id)
    assert after.status == "rejected"
    last = world.registry.alias_history(tenant_id=world.tenant_id, adapter_id=adapter_id)[-1]
    assert (last.actor, last.reason, last.forced) == ("qa", f"qa-regression {report.id}", False)
    assert (last.from_version_id, last.to_version_id) == (v2_id, v1.id)
    assert _qa_state(world, "alice", v2_id) == ("failed", True)
    with pytest.raises(InvalidStateError, match="rejected"):  # QA's decision stands, force or not
        _promote(world, "alice", 2, force=True)


def test_a_good_version_promoted_before_qa_is_evaluated_and_kept(sqlite_world: World, tmp_path: Path) -> None:
    world = sqlite_world
    runner = QARunner(world.resident)
    feed(world, "bob", round=1, n_records=24)
    world.registry.create_adapter(
        tenant_id=world.tenant_id,
        owner_user_id=world.user_id("bob"),
        name="personal",
        target_config=qa_trainer(world).target_config,
    )
    good = train_adapter(world, user_examples(world, "bob"), work=tmp_path / "good")
    v1_id = _candidate_with_qa_queued(world, "bob", good, None)
    with pytest.raises(QAUndecidedError, match="QA has not decided it yet"):
        _promote(world, "bob", 1)
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=world.personal("bob")) is None

    assert _promote(world, "bob", 1, force=True).forced
    (done,) = worker(world, runner).run_until_idle()
    assert done.result is not None and done.result["decision"] == "keep", done.result
    live = world.registry.live_version(tenant_id=world.tenant_id, adapter_id=world.personal("bob"))
    assert live is not None and live.id == v1_id
    assert _qa_state(world, "bob", v1_id) == ("passed", True)
    assert runner.run_candidate(tenant_id=world.tenant_id, version_id=v1_id) is None  # decided once

    # a decided version needs no force: a rollback and a promote back are plain moves
    world.registry.rollback(
        tenant_id=world.tenant_id, adapter_id=world.personal("bob"), to_number=None, actor="ops", reason="x"
    )
    assert _promote(world, "bob", 1).forced is False


def test_other_promote_rules_need_no_force(sqlite_world: World, tmp_path: Path) -> None:
    world = sqlite_world
    feed(world, "cy", round=1, n_records=24)
    world.registry.create_adapter(
        tenant_id=world.tenant_id, owner_user_id=world.user_id("cy"), name="personal", target_config={}
    )
    folder = train_adapter(world, user_examples(world, "cy"), work=tmp_path / "cy")
    _candidate_with_qa_queued(world, "cy", folder, None)
    adapter = world.registry.get_adapter(tenant_id=world.tenant_id, adapter_id=world.personal("cy"))
    event = world.promote(adapter=adapter, number=1, actor="ops", reason="rule never", promote_rule="never")
    assert event.forced is False


def test_the_command_line_promotes_with_force_only(
    sqlite_world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from lorafleet.entrypoints.cli import main as cli_main

    world = sqlite_world
    feed(world, "dee", round=1, n_records=24)
    world.registry.create_adapter(
        tenant_id=world.tenant_id, owner_user_id=world.user_id("dee"), name="personal", target_config={}
    )
    folder = train_adapter(world, user_examples(world, "dee"), work=tmp_path / "dee")
    version_id = _candidate_with_qa_queued(world, "dee", folder, None)
    monkeypatch.setenv("LORAFLEET_DATABASE_URL", world.db.url)
    monkeypatch.setenv("LORAFLEET_OBJECT_STORE_URL", (tmp_path / "blobs").as_uri())
    monkeypatch.setenv("LORAFLEET_PROMOTE_RULE", "qa")
    args = ["promote", "--tenant", "acme", "--user", "dee", "--version", "1", "--reason", "ops"]

    assert cli_main(args) == 2
    assert (
        "error [qa_undecided]: version 1 of 'personal' has no passing QA decision" in capsys.readouterr().err
    )
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=world.personal("dee")) is None

    assert cli_main([*args, "--force"]) == 0
    assert "live is now v1 (forced: QA has not passed it" in capsys.readouterr().out
    (event,) = world.registry.alias_history(tenant_id=world.tenant_id, adapter_id=world.personal("dee"))
    assert (event.to_version_id, event.actor, event.reason, event.forced) == (version_id, "cli", "ops", True)


def _insert_unchecked(world: World, *, adapter_id: int, folder: Path, work: Path) -> AdapterVersion:
    """Insert ``folder`` as the adapter's next candidate without the registry's checks (as a version written
    before weight bounds existed would be): QA must still refuse it."""
    from lorafleet.registry import pack_adapter_archive
    from lorafleet.registry.peft_format import inspect_adapter_dir
    from lorafleet.store.sql.registry_repository import NewVersion, RegistryRepository

    files = inspect_adapter_dir(folder)
    ref = world.registry.blobs.put_file(pack_adapter_archive(files=files, dest=work / "unchecked.tar"))
    new = NewVersion(
        blob_uri=ref.uri,
        sha256=ref.sha256,
        size_bytes=ref.size,
        base_fingerprint=world.backbone.fingerprint.digest,
        rank=files.rank,
        target_modules=tuple(files.target_modules),
        training_config={"source": "peft-import"},
        metrics={},
        status="candidate",
        job_id=None,
        dataset_snapshot_id=None,
        parents=(),
    )
    repo = RegistryRepository(dialect=world.db.dialect)
    with world.db.session() as s:
        number = repo.next_version_number(s, tenant_id=world.tenant_id, adapter_id=adapter_id)
        return repo.insert_version(s, adapter_id=adapter_id, number=number, new=new)


def _huge_task_version(world: World, tmp_path: Path) -> tuple[int, AdapterVersion, str]:
    """A task adapter "tone" with one candidate holding 1e30 in a lora_B weight (inserted unchecked) and its QA
    job queued; the task's id, the version and the tensor's name."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    feed(world, "eve", round=1, n_records=24)
    folder = train_adapter(world, user_examples(world, "eve"), work=tmp_path / "task")
    weights = folder / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(weights))
    first = sorted(k for k in tensors if ".lora_B." in k)[0]
    tensors[first][0, 0] = 1e30
    save_file(tensors, str(weights), metadata=metadata)
    task = world.registry.create_adapter(
        tenant_id=world.tenant_id, owner_user_id=None, name="tone", target_config={}
    )
    version = _insert_unchecked(world, adapter_id=task.id, folder=folder, work=tmp_path)
    submit_candidate_qa(queue=JobQueue(world.db), tenant_id=world.tenant_id, version_id=version.id)
    return task.id, version, first


def _promote_task(world: World, *, force: bool) -> AliasEvent:
    from lorafleet.workflows.tasks import move_task_live

    return move_task_live(
        world.db,
        world.registry,
        tenant_id=world.tenant_id,
        task_name="tone",
        to_number=1,
        action="promote",
        actor="tenant-admin",
        reason="vendor says it is fine",
        promote_rule="qa",
        force=force,
    )


def test_a_1e30_task_version_forced_live_before_qa_is_rolled_back_for_its_weights(
    sqlite_world: World, tmp_path: Path
) -> None:
    """The issue's case: a task version with finite but huge weights, promoted by hand before its QA job ran."""
    world = sqlite_world
    task_id, version, first = _huge_task_version(world, tmp_path)
    with pytest.raises(QAUndecidedError):
        _promote_task(world, force=False)
    assert _promote_task(world, force=True).forced

    runner = QARunner(world.resident)
    (done,) = worker(world, runner).run_until_idle()
    assert done.result is not None and done.result["decision"] == "rollback"
    reasons = done.result["reasons"]
    assert reasons[0] == f"sanity/weights: largest |value| above the bound 1000 in {first}: 1e+30"
    assert reasons[-1] == "forced live without a QA decision: rollback to none"
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=task_id) is None
    after = world.registry.get_version_by_id(tenant_id=world.tenant_id, version_id=version.id)
    assert after.status == "rejected"


def test_a_version_forced_live_while_qa_evaluates_it_is_evaluated_again_as_live(
    sqlite_world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The force lands between QA's evaluation and its decision: the decision is stale (the job is retried),
    and the retry evaluates the now-live version instead of skipping it."""
    world = sqlite_world
    task_id, version, _ = _huge_task_version(world, tmp_path)
    runner = QARunner(world.resident)
    evaluate = runner.evaluator.evaluate

    def forced_meanwhile(*args: Any, **kwargs: Any) -> Any:
        result = evaluate(*args, **kwargs)
        _promote_task(world, force=True)  # a person, while QA evaluated
        return result

    monkeypatch.setattr(runner.evaluator, "evaluate", forced_meanwhile)
    with pytest.raises(StaleEvaluationError):
        runner.run_candidate(tenant_id=world.tenant_id, version_id=version.id)
    monkeypatch.setattr(runner.evaluator, "evaluate", evaluate)
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=task_id) == replace(
        version, status="live"
    )

    report = runner.run_candidate(tenant_id=world.tenant_id, version_id=version.id)  # the retry
    assert report is not None and report.decision == "rollback"
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=task_id) is None
