"""QA as jobs: a QA worker killed mid-run leaves nothing behind, the job is taken over after its lease and
decides once (a stale worker's late decision is fenced out); on a real local Ray, trainer actors run ``qa`` jobs
next to ``train`` jobs on the nf4 backbone, and an actor killed mid-QA is replaced by another that decides once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import ray
from qa_helpers import TINY_TRAINING, World, feed, qa_trainer
from tests.faults import FaultyBlobs
from tests.polling import wait_for

from lorafleet.config import Settings, load_settings
from lorafleet.domain import Job
from lorafleet.errors import LeaseLostError
from lorafleet.jobs import JobQueue, JobWorker, LeaseContext, Scheduler
from lorafleet.qa.reports import reports_for_version
from lorafleet.registry import Registry
from lorafleet.store.blob import open_blob_store_from_settings
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.training.overrides import set_tenant_training
from lorafleet.training.synthetic import make_user_records
from lorafleet.workflows.feedback import ingest_feedback
from lorafleet.workflows.qa_runner import QARunner
from lorafleet.workflows.qa_triggers import QA_JOB_KIND

pytestmark = pytest.mark.timeout(600)


class Killed(BaseException):
    """What a killed process looks like to the job: the handler never returns and nothing is settled."""


def _killed(_document: bytes) -> None:
    """QA's first write of a decision is its report document: dying there is dying before deciding."""
    raise Killed("worker killed after evaluating, before deciding")


def _queued_qa_job(world: World, user: str) -> Job:
    """Train a user's first version in-process; the ``qa`` job its train job queued."""
    feed(world, user, n_records=24)
    Scheduler(world.db).train_now(tenant_id=world.tenant_id, user_external_id=user)
    trained = JobWorker(
        JobQueue(world.db), worker_id="trainer", handlers={"train": qa_trainer(world).run_job}
    )
    (train_job,) = trained.run_until_idle()
    (qa_job_id,) = (train_job.result or {})["qa_jobs"]
    return JobQueue(world.db).get(tenant_id=None, job_id=qa_job_id)


def test_a_qa_worker_killed_mid_run_is_retried_and_the_job_decides_once(world: World) -> None:
    job = _queued_qa_job(world, "alice")
    queue = JobQueue(world.db)
    dying_registry = Registry(world.db, FaultyBlobs(world.registry.blobs, before_put_bytes=_killed))
    dying = QARunner(replace(world.resident, registry=dying_registry))
    first = JobWorker(queue, worker_id="w1", handlers={QA_JOB_KIND: dying.run_job}, lease_seconds=1.0)
    with pytest.raises(Killed):
        first.run_once()
    (version,) = world.registry.list_versions(tenant_id=world.tenant_id, adapter_id=world.personal("alice"))
    assert queue.get(tenant_id=None, job_id=job.id).state == "running" and version.status == "candidate"
    assert reports_for_version(world.db, tenant_id=world.tenant_id, version_id=version.id) == []
    assert world.bank.occupied() == {}  # the slots were evicted on the way out

    attempt1 = queue.get(tenant_id=None, job_id=job.id)
    wait_for("the killed worker's lease to expire", lambda: _expired(queue, job.id), every=0.1)
    runner = QARunner(world.resident)
    stale = LeaseContext(queue=queue, job=attempt1, worker_id="w1")
    with pytest.raises(LeaseLostError):  # the first worker, had it survived, could not decide any more
        runner.run_candidate(tenant_id=world.tenant_id, version_id=version.id, lease=stale)

    second = JobWorker(queue, worker_id="w2", handlers={QA_JOB_KIND: runner.run_job}, lease_seconds=30.0)
    done = second.run_once()
    assert done is not None and (done.id, done.state, done.attempts, done.lease_owner) == (
        job.id,
        "succeeded",
        2,
        "w2",
    )
    (report,) = reports_for_version(world.db, tenant_id=world.tenant_id, version_id=version.id)
    assert report.job_id == job.id and done.result == {
        "report_id": report.id,
        "version_id": version.id,
        "kind": "candidate",
        "decision": "promote",
        "reasons": list(report.reasons),
    }
    events = world.registry.alias_history(tenant_id=world.tenant_id, adapter_id=world.personal("alice"))
    assert [e.reason for e in events] == [f"qa-passed {report.id}"]
    assert (
        runner.run_candidate(tenant_id=world.tenant_id, version_id=version.id, lease=stale) is None
    )  # decided
    with pytest.raises(LeaseLostError):
        _fence(stale)
    assert second.run_once() is None  # nothing left to run


def _fence(lease: LeaseContext) -> None:
    with lease.fenced():
        pass


def _expired(queue: JobQueue, job_id: int) -> bool:
    job = queue.get(tenant_id=None, job_id=job_id)
    return job.lease_expires_at is not None and job.lease_expires_at < datetime.now(UTC)


# --- on Ray ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_address(data_dir: Path) -> Iterator[str]:
    """A local Ray on 127.0.0.1 (started through ``init_ray``; one this session already runs is reused)."""
    from lorafleet.runtime.ray_runtime import init_ray

    started = not ray.is_initialized()
    address = init_ray(load_settings(data_dir=data_dir, ray_address="", ray_num_cpus=4))
    assert address.startswith("127.0.0.1:")
    yield address
    if started:
        ray.shutdown()


def _settings(data_dir: Path, *, url: str, blobs: Path, **more: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "database_url": url,
        "object_store_url": blobs.as_uri(),
        "backbone_quantization": "nf4",
        "device": "cpu",
        "ray_address": "",
        "trainer_slots": 4,
        "promote_rule": "qa",
        **more,
    }
    return load_settings(**values)


#: a deliberately slow QA (many long greedy samples, the whole probe set) so the actor can be killed in the
#: middle of it
SLOW_QA = {"samples_per_cell": 16, "sample_max_new_tokens": 256, "probe_size": 63}


def test_trainer_actors_run_qa_jobs_and_one_killed_mid_qa_is_replaced(
    ray_address: str, data_dir: Path, sqlite_url: str, tmp_path: Path
) -> None:
    from lorafleet.runtime.trainer_pool import TrainerPool

    db = Database(sqlite_url)
    tenant_id = TenantRepository(db).create_tenant(name="acme")[0].id
    set_tenant_training(db, tenant_id=tenant_id, overrides=TINY_TRAINING)  # the config its jobs carry
    for user in ("erin", "fred"):
        records = make_user_records(user, round=1, n_records=48)  # 24: erin 2 of 6 right, too few to tell
        ingest_feedback(db, tenant_id=tenant_id, user_external_id=user, records=records)
    settings = _settings(data_dir, url=sqlite_url, blobs=tmp_path / "blobs")
    registry = Registry(db, open_blob_store_from_settings(settings))
    train = Scheduler(db).train_now(tenant_id=tenant_id, user_external_id="erin").job

    doomed = TrainerPool(
        _settings(data_dir, url=sqlite_url, blobs=tmp_path / "blobs", lease_seconds=3.0),
        training=TINY_TRAINING,
        qa_policy=SLOW_QA,
    )
    assert ray.get(doomed.actors[0].run_once.remote(), timeout=120) == train.id  # train: queues the QA job
    (qa_id,) = (JobQueue(db).get(tenant_id=None, job_id=train.id).result or {})["qa_jobs"]
    running = doomed.actors[0].run_once.remote()
    wait_for(
        "the actor to claim the QA job",
        lambda: JobQueue(db).get(tenant_id=None, job_id=qa_id).lease_owner,
        every=0.1,
    )
    time.sleep(1.0)
    ray.kill(doomed.actors[0])
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(running, timeout=30)
    qa_job = JobQueue(db).get(tenant_id=None, job_id=qa_id)
    assert qa_job.state == "running" and qa_job.attempts == 1

    with TrainerPool(settings, training=TINY_TRAINING) as rescuer:
        wait_for(
            "the dead actor's lease to expire", lambda: _expired(JobQueue(db), qa_id), timeout=30, every=0.1
        )
        Scheduler(db).train_now(tenant_id=tenant_id, user_external_id="fred")
        ran = rescuer.drain(timeout=300)
        assert qa_id in ran and len(ran) == 3  # the taken-over QA job, fred's train job and its QA job
        (stats,) = rescuer.stats()
        assert stats["jobs_failed"] == 0 and stats["backbone_loads"] == 1

    done = JobQueue(db).get(tenant_id=None, job_id=qa_id)
    assert (done.state, done.attempts, done.lease_owner) == ("succeeded", 2, rescuer.workers[0])
    for user in ("erin", "fred"):
        user_id = TenantRepository(db).get_user(tenant_id=tenant_id, external_id=user).id
        adapter = registry.find_adapter(tenant_id=tenant_id, owner_user_id=user_id, name="personal")
        assert adapter is not None
        (version,) = registry.list_versions(tenant_id=tenant_id, adapter_id=adapter.id)
        (report,) = reports_for_version(db, tenant_id=tenant_id, version_id=version.id)
        events = registry.alias_history(tenant_id=tenant_id, adapter_id=adapter.id)
        assert version.status == "live", (user, report.reasons)
        assert [e.reason for e in events] == [f"qa-passed {report.id}"]
    db.dispose()
