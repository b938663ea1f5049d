"""A candidate revoked (``lorafleet.workflows.deletion``) before its QA job runs is never promoted: the job ends
cleanly with nothing to decide, and the adapter stays without a live version."""

from __future__ import annotations

from pathlib import Path

from qa_helpers import World, feed, register_candidate, worker
from tests.lora_weights import write_random_peft_folder

from lorafleet.domain.subject import Subject
from lorafleet.jobs import JobQueue
from lorafleet.workflows.continual import PERSONAL_ADAPTER
from lorafleet.workflows.deletion import RecordSelection, forget_records
from lorafleet.workflows.qa_runner import QARunner
from lorafleet.workflows.qa_triggers import submit_candidate_qa


def test_a_revoked_candidate_is_never_promoted_and_its_qa_job_ends_cleanly(
    sqlite_world: World, data_dir: Path, tmp_path: Path
) -> None:
    world = sqlite_world
    ids = feed(world, "alice", n_records=6)
    adapter = world.registry.get_or_create_adapter(
        tenant_id=world.tenant_id,
        owner_user_id=world.user_id("alice"),
        name=PERSONAL_ADAPTER,
        target_config={},
    )
    folder = write_random_peft_folder("builtin:tiny", data_dir, tmp_path / "candidate", seed=5)
    candidate = register_candidate(
        world, adapter_id=adapter.id, folder=folder, record_ids=ids, user_id=world.user_id("alice")
    )
    job = submit_candidate_qa(queue=JobQueue(world.db), tenant_id=world.tenant_id, version_id=candidate.id)
    forget_records(
        world.db,
        world.registry,
        tenant_id=world.tenant_id,
        subject=Subject.user("alice"),
        selection=RecordSelection.parse(ids=[ids[0]]),
        actor="test",
    )

    done = worker(world, QARunner(world.resident)).run_once()

    assert done is not None and done.id == job.id and done.state == "succeeded"
    assert done.result == {"skipped": "nothing to decide"}
    assert (
        world.registry.get_version_by_id(tenant_id=world.tenant_id, version_id=candidate.id).status
        == "revoked"
    )
    assert world.registry.live_version(tenant_id=world.tenant_id, adapter_id=adapter.id) is None
