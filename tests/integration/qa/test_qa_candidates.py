"""QA of candidates end to end on the real parts: train jobs queue QA jobs, which promote good versions and
reject harmful, non-finite or foreign-backbone ones with the rule that failed; reports are complete, stored in
both stores, linked in lineage, printed by the command line and kept by the blob GC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from qa_helpers import (
    World,
    adversarial,
    feed,
    qa_trainer,
    register_candidate,
    register_unchecked,
    scale_weights,
    train_adapter,
    user_examples,
    worker,
)

from lorafleet.entrypoints.cli import main as cli_main
from lorafleet.jobs import JobQueue, Scheduler
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.probe import RANDOM_INIT_EPSILON_PROBE
from lorafleet.qa.reports import load_report, reports_for_version
from lorafleet.qa.results import BASE, CANDIDATE, GATED_CANDIDATE, GATED_PREVIOUS, PREVIOUS, Matrix
from lorafleet.registry import Registry
from lorafleet.routing.embeddings import ROUTING_KEY_VECTORS
from lorafleet.workflows.qa_runner import QARunner
from lorafleet.workflows.qa_triggers import QA_JOB_KIND, candidate_dedupe_key

pytestmark = pytest.mark.timeout(300)


def _train_round(world: World, runner: QARunner, user: str, *, round: int, n_records: int) -> list[int]:
    """Feed a round, queue a train job and run it and the QA job it queues; the ids of the jobs run."""
    feed(world, user, round=round, n_records=n_records)
    Scheduler(world.db).train_now(tenant_id=world.tenant_id, user_external_id=user)
    done = worker(world, runner, trainer=qa_trainer(world)).run_until_idle()
    assert [(j.kind, j.state) for j in done] == [("train", "succeeded"), (QA_JOB_KIND, "succeeded")], done
    return [j.id for j in done]


def test_good_candidates_are_promoted_through_qa_jobs_with_complete_linked_reports(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runner = QARunner(world.resident)
    train1, qa1 = _train_round(world, runner, "alice", round=1, n_records=24)
    train2, qa2 = _train_round(world, runner, "alice", round=2, n_records=64)
    adapter_id = world.personal("alice")
    v1, v2 = world.registry.list_versions(tenant_id=world.tenant_id, adapter_id=adapter_id)
    assert (v1.status, v2.status) == ("archived", "live")
    qa_job = JobQueue(world.db).get(tenant_id=None, job_id=qa2)
    assert qa_job.payload == {"version_id": v2.id} and qa_job.dedupe_key == candidate_dedupe_key(v2.id)
    assert JobQueue(world.db).job_users(job_id=qa2) == {}  # a pending QA job never holds back training

    events = world.registry.alias_history(tenant_id=world.tenant_id, adapter_id=adapter_id)
    (r1,) = reports_for_version(world.db, tenant_id=world.tenant_id, version_id=v1.id)
    (r2,) = reports_for_version(world.db, tenant_id=world.tenant_id, version_id=v2.id)
    assert [(e.actor, e.reason, e.to_version_id) for e in events] == [
        ("qa", f"qa-passed {r1.id}", v1.id),
        ("qa", f"qa-passed {r2.id}", v2.id),
    ]
    assert (r2.kind, r2.decision, r2.job_id, r2.policy_version) == (
        "candidate",
        "promote",
        qa2,
        QAPolicy().version,
    )
    assert r2.reasons[0].startswith("user-holdout: candidate") and "beats previous live" in r2.reasons[0]
    assert r2.summary["rules"] == {
        "user-holdout": True,
        "answers": True,
        "training-answers": True,
        "general-facts": True,
        "no-regression": True,
        "gate-vs-best-member": True,
        "probe": True,
        "finite-outputs": True,
    }
    assert any(r.startswith("answers: answer F1") and "vs previous live" in r for r in r2.reasons)
    assert any(r.startswith("training-answers: ") for r in r2.reasons), r2.reasons

    report, document = load_report(world.db, world.registry, report_id=r2.id, tenant_id=world.tenant_id)
    assert (
        report == r2
        and document["decision"] == "promote"
        and document["policy"] == QAPolicy(epsilon_probe=RANDOM_INIT_EPSILON_PROBE).model_dump()
    )  # the report records the bound QA used: the tiny backbone's
    assert document["version"]["id"] == v2.id and document["previous"]["id"] == v1.id
    assert document["sanity"]["passed"] and document["probe"]["version"] == "probe/2"
    matrix = Matrix.from_json(document["matrix"])
    assert [r.name for r in matrix.rows] == ["holdout:personal:personal", "probe"]
    assert matrix.column_names() == [BASE, PREVIOUS, CANDIDATE, GATED_PREVIOUS, GATED_CANDIDATE]
    own = matrix.rows[0]
    assert own.own and own.examples > 0 and matrix.loss(own.name, CANDIDATE) < matrix.loss(own.name, BASE)
    cell = matrix.cell(own.name, CANDIDATE)
    assert cell is not None and len(cell.samples) == 2 and cell.samples[0].prompt
    assert document["matrix"]["cells"]["probe"]["base"]["tokens"] > 0

    lineage = world.registry.lineage(tenant_id=world.tenant_id, version_id=v2.id)
    assert [r.id for r in lineage.root.qa_reports] == [r2.id]
    assert [[r.id for r in n.qa_reports] for n in lineage.ancestors] == [[r1.id]]

    orphan = world.registry.blobs.put_bytes(b'{"orphan": true}')
    collected = Registry(world.db, world.registry.blobs, gc_grace_seconds=0).gc()  # report blobs are kept
    assert collected == [orphan.sha256] and world.registry.blobs.exists(r2.blob_sha256)

    monkeypatch.setenv("LORAFLEET_DATABASE_URL", world.db.url)
    monkeypatch.setenv("LORAFLEET_OBJECT_STORE_URL", (tmp_path / "blobs").as_uri())
    assert cli_main(["qa", "report", str(r2.id)]) == 0
    printed = capsys.readouterr().out
    assert f"QA report {r2.id}: candidate version 2" in printed and "decision: PROMOTE" in printed
    assert (
        "holdout:personal:personal" in printed
        and "gated:candidate" in printed
        and "greedy samples" in printed
    )


def test_a_harmful_candidate_is_rejected_by_the_user_holdout_rule(
    sqlite_world: World, tmp_path: Path
) -> None:
    world = sqlite_world
    runner = QARunner(world.resident)
    _train_round(world, runner, "alice", round=1, n_records=24)
    adapter_id = world.personal("alice")
    live = world.registry.live_version(tenant_id=world.tenant_id, adapter_id=adapter_id)
    assert live is not None
    examples = user_examples(world, "alice")
    folder = train_adapter(world, adversarial(examples), work=tmp_path / "harm")  # another user's answers
    harmful = register_candidate(
        world,
        adapter_id=adapter_id,
        folder=folder,
        record_ids=[e.record_id for e in examples],
        user_id=world.user_id("alice"),
        parent=live,
    )

    report = runner.run_candidate(tenant_id=world.tenant_id, version_id=harmful.id)

    assert report is not None and report.decision == "reject" and report.job_id is None
    assert any(r.startswith("user-holdout: candidate") and "does not beat" in r for r in report.reasons)
    assert report.summary["rules"]["user-holdout"] is False
    after = world.registry.get_version_by_id(tenant_id=world.tenant_id, version_id=harmful.id)
    assert after.status == "rejected"
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=adapter_id) == live
    assert runner.run_candidate(tenant_id=world.tenant_id, version_id=harmful.id) is None  # decided once


def test_non_finite_foreign_or_diverged_candidates_are_rejected_before_evaluation(
    sqlite_world: World, tmp_path: Path
) -> None:
    world = sqlite_world
    runner = QARunner(world.resident, policy=QAPolicy(max_update_norm=50.0))
    _train_round(world, runner, "alice", round=1, n_records=24)
    adapter_id, user_id = world.personal("alice"), world.user_id("alice")
    live = world.registry.live_version(tenant_id=world.tenant_id, adapter_id=adapter_id)
    assert live is not None
    examples = user_examples(world, "alice")
    ids = [e.record_id for e in examples]
    good = train_adapter(world, examples, work=tmp_path / "good")

    nan_id = register_unchecked(world, adapter_id=adapter_id, folder=good, work=tmp_path, base=live)
    foreign = register_candidate(
        world,
        adapter_id=adapter_id,
        folder=train_adapter(world, examples, work=tmp_path / "foreign", seed=1),
        record_ids=ids,
        user_id=user_id,
        fingerprint="f" * 64,  # the row says it was trained on another backbone
    )
    diverged = register_candidate(
        world,
        adapter_id=adapter_id,
        folder=scale_weights(train_adapter(world, examples, work=tmp_path / "big", seed=2), 1e4),
        record_ids=ids,
        user_id=user_id,
    )

    expected = {
        nan_id: "sanity/non-finite",
        foreign.id: "sanity/fingerprint",
        diverged.id: "sanity/update-norm",
    }
    for version_id, problem in expected.items():
        report = runner.run_candidate(tenant_id=world.tenant_id, version_id=version_id)
        assert report is not None and report.decision == "reject"
        assert report.reasons and all(r.startswith("sanity/") for r in report.reasons)
        assert any(r.startswith(problem) for r in report.reasons), report.reasons
        _, document = load_report(world.db, world.registry, report_id=report.id)
        assert document["matrix"] is None and document["rules"] == [] and not document["sanity"]["passed"]
        assert report.summary["sanity_passed"] is False
        status = world.registry.get_version_by_id(tenant_id=world.tenant_id, version_id=version_id).status
        assert status == "rejected"
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=adapter_id) == live


def test_a_candidate_on_the_4bit_backbone_is_promoted_and_its_routing_key_set(nf4_world: World) -> None:
    world = nf4_world
    runner = QARunner(world.resident)
    _train_round(world, runner, "carol", round=1, n_records=24)
    (version,) = world.registry.list_versions(tenant_id=world.tenant_id, adapter_id=world.personal("carol"))
    assert version.status == "live"
    (report,) = reports_for_version(world.db, tenant_id=world.tenant_id, version_id=version.id)
    _, document = load_report(world.db, world.registry, report_id=report.id)
    assert document["backbone"]["quantization"] == "nf4" and document["decision"] == "promote"
    from lorafleet.routing.experts import resolve_user_experts

    (member,) = resolve_user_experts(world.db, tenant_id=world.tenant_id, user_external_id="carol").members
    # computed by QA for the gate: up to ROUTING_KEY_VECTORS unit vectors of the backbone's hidden size (64)
    assert member.routing_key is not None and len(member.routing_key) % 64 == 0
    assert 1 <= len(member.routing_key) // 64 <= ROUTING_KEY_VECTORS
    json.dumps(document)  # the stored document is plain JSON
