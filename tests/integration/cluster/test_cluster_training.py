"""Training on a multi-node Ray cluster (every node on 127.0.0.1, started by ``cluster_host.py`` in its own
process): ``lorafleet workers`` processes connect to it through ``LORAFLEET_RAY_ADDRESS``, place their trainer
actors by the ``lorafleet_trainer`` resource (the head has none, each worker node one unit), and run the jobs
the scheduler queued in PostgreSQL. A node removed mid-job: the job's lease expires, the actor on the other
node retries it, and exactly one version results."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from cluster_helpers import TINY_TRAINING, ClusterHost, WorkersProcess, node_prefix
from sqlalchemy import func, select
from tests.polling import wait_for

from lorafleet.domain import AdapterVersion, Job
from lorafleet.jobs import JobQueue, Scheduler, SchedulerPolicy
from lorafleet.registry import Registry
from lorafleet.store.blob import open_blob_store
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlAdapterVersion, SqlJob
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.training.overrides import set_tenant_training
from lorafleet.training.synthetic import make_user_records
from lorafleet.workflows.continual import PERSONAL_ADAPTER
from lorafleet.workflows.feedback import ingest_feedback

#: a multi-node cluster: ``make test-extended``, not ``make test`` (CI time)
pytestmark = pytest.mark.extended

USERS = [f"user-{i}" for i in range(6)]
T = TypeVar("T")


@pytest.fixture
def blobs_url(tmp_path: Path) -> str:
    """The test's own object store, a folder."""
    return (tmp_path / "blobs").as_uri()


@pytest.fixture
def workers_env(
    ray_nodes: ClusterHost, pg_url: str, blobs_url: str, cluster_data_dir: Path
) -> Callable[..., dict[str, str]]:
    """``workers_env(**more)``: the ``lorafleet workers`` environment on the cluster, the test's PostgreSQL
    database and object store and the tiny backbone, with ``more`` variables."""

    def env(**more: str) -> dict[str, str]:
        return {
            "LORAFLEET_RAY_ADDRESS": ray_nodes.address,
            "LORAFLEET_DATABASE_URL": pg_url,
            "LORAFLEET_OBJECT_STORE_URL": blobs_url,
            "LORAFLEET_DATA_DIR": str(cluster_data_dir),
            "LORAFLEET_DEVICE": "cpu",
            "LORAFLEET_BACKBONE_QUANTIZATION": "nf4",
            "LORAFLEET_TRAINER_SLOTS": "4",
            "LORAFLEET_PROMOTE_RULE": "holdout-improved",
            **more,
        }

    return env


@dataclass(frozen=True)
class TrainingCluster:
    """What a training test on the cluster works with: its Ray nodes, the PostgreSQL database and the registry
    over the object store that the ``lorafleet workers`` share, and ``env(**more)``, their environment."""

    nodes: ClusterHost
    db: Database
    registry: Registry
    env: Callable[..., dict[str, str]]


@pytest.fixture
def cluster(
    ray_nodes: ClusterHost, pg_database: Database, blobs_url: str, workers_env: Callable[..., dict[str, str]]
) -> TrainingCluster:
    return TrainingCluster(
        ray_nodes, pg_database, Registry(pg_database, open_blob_store(blobs_url)), workers_env
    )


def _tenant_with_records(db: Database, *, users: list[str], n_records: int = 12) -> int:
    """A new tenant ``acme`` whose ``users`` each sent ``n_records`` records; its id."""
    tenant_id = TenantRepository(db).create_tenant(name="acme")[0].id
    for user in users:
        records = make_user_records(user, round=1, n_records=n_records, seed=0)
        ingest_feedback(db, tenant_id=tenant_id, user_external_id=user, records=records)
    return tenant_id


def _job(db: Database, job_id: int) -> Job:
    return JobQueue(db).get(tenant_id=None, job_id=job_id)


def _versions(db: Database, registry: Registry, *, tenant_id: int, user: str) -> list[AdapterVersion]:
    owner = TenantRepository(db).get_user(tenant_id=tenant_id, external_id=user)
    adapter = registry.find_adapter(tenant_id=tenant_id, owner_user_id=owner.id, name=PERSONAL_ADAPTER)
    return [] if adapter is None else registry.list_versions(tenant_id=tenant_id, adapter_id=adapter.id)


def _count_versions(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(SqlAdapterVersion)) or 0)


def _all_finished(db: Database, job_ids: list[int]) -> list[Job] | None:
    jobs = [_job(db, job_id) for job_id in job_ids]
    return jobs if all(j.state in ("succeeded", "failed", "cancelled") for j in jobs) else None


def test_jobs_of_several_users_run_on_both_trainer_nodes(cluster: TrainingCluster) -> None:
    db = cluster.db
    tenant_id = _tenant_with_records(db, users=USERS)
    set_tenant_training(db, tenant_id=tenant_id, overrides=TINY_TRAINING)  # the config its jobs carry
    training = json.dumps(TINY_TRAINING)

    workers = WorkersProcess(cluster.env(), "--count", "2", "--poll-seconds", "0.5", "--training", training)
    try:
        # one actor per trainer node (one unit each), none on the head (no unit)
        assert sorted(workers.ready_nodes(2)) == sorted(cluster.nodes.workers)
        tick = Scheduler(
            db, SchedulerPolicy(min_new_records=4, users_per_job=1, max_active_jobs=len(USERS))
        ).tick()
        job_ids = [job.id for job in tick.jobs_created]
        assert len(job_ids) == len(USERS)
        jobs = wait_for("every job to finish", lambda: _all_finished(db, job_ids), timeout=240, every=0.25)
    finally:
        status = workers.stop()

    assert status == 0, workers.output.text()[-3000:]
    assert [(j.state, j.attempts) for j in jobs] == [("succeeded", 1)] * len(USERS), [j.error for j in jobs]
    ran_on = {node_prefix(job.lease_owner) for job in jobs}
    assert ran_on == {node[:8] for node in cluster.nodes.workers}, "jobs did not run on both trainer nodes"
    for user in USERS:
        (version,) = _versions(db, cluster.registry, tenant_id=tenant_id, user=user)
        assert version.job_id in job_ids
    workers.output.wait_for(rf"trainer workers stopped after {len(USERS)} job\(s\)", timeout=5)


def test_workers_fail_clearly_when_no_node_offers_their_resource(
    workers_env: Callable[..., dict[str, str]],
) -> None:
    env = workers_env(LORAFLEET_TRAINER_RESOURCE="gpu_box")
    workers = WorkersProcess(env, "--count", "1", "--start-timeout", "3")

    assert workers.wait(timeout=120) == 2
    text = workers.output.text()
    assert "no alive node of the Ray cluster offers 1 CPU + 1 gpu_box" in text, text[-3000:]
    assert "error [job_error]: 1 of 1 trainer actors not started after 3 s" in text, text[-3000:]
    assert "room for 0 such actors" in text


def test_a_node_lost_mid_job_leaves_the_job_to_the_other_node_and_one_version(
    cluster: TrainingCluster,
) -> None:
    db = cluster.db
    tenant_id = _tenant_with_records(db, users=["zed"])
    # a job without its own config: the doomed workers' default never ends, the rescuer's is short
    queued = Scheduler(db).train_now(tenant_id=tenant_id, user_external_id="zed").job
    job = _without_training_config(db, queued)
    env = cluster.env(LORAFLEET_LEASE_SECONDS="4")
    endless = json.dumps(
        {**TINY_TRAINING, "max_steps": 100_000}
    )  # the first attempt is still running when cut

    doomed = WorkersProcess(env, "--count", "1", "--poll-seconds", "0.5", "--training", endless)
    rescuer: WorkersProcess | None = None
    try:
        owner = wait_for(
            "the job to be claimed", lambda: _job(db, job.id).lease_owner, timeout=180, every=0.25
        )
        (lost,) = [node for node in cluster.nodes.workers if node.startswith(node_prefix(owner))]
        wait_for(
            "a heartbeat while it trains",
            lambda: _heartbeat_seconds(_job(db, job.id)) > 1,
            timeout=60,
            every=0.25,
        )
        rescuer = WorkersProcess(
            env, "--count", "1", "--poll-seconds", "0.5", "--training", json.dumps(TINY_TRAINING)
        )
        (other,) = rescuer.ready_nodes(1)
        assert {lost, other} == set(cluster.nodes.workers)
        assert _job(db, job.id).state == "running"

        cluster.nodes.remove(lost)
        done = wait_for("the job to finish", lambda: _all_finished(db, [job.id]), timeout=180, every=0.25)[0]
        doomed.output.wait_for(r"died .*starting a replacement", timeout=120)
    finally:
        statuses = [doomed.stop()] + ([rescuer.stop()] if rescuer else [])

    assert (done.state, done.attempts) == ("succeeded", 2), done.error
    assert node_prefix(done.lease_owner) == other[:8] != lost[:8]
    (entry,) = (done.result or {})["versions"]
    (version,) = _versions(db, cluster.registry, tenant_id=tenant_id, user="zed")
    assert (version.id, version.job_id, version.number) == (entry["version_id"], job.id, 1)
    assert _count_versions(db) == 1
    assert statuses == [0, 0], (
        doomed.output.text()[-3000:],
        rescuer.output.text()[-3000:] if rescuer else "",
    )


def _without_training_config(db: Database, job: Job) -> Job:
    """The job as code before per-job configs queued it (no ``payload["training"]``): each trainer runs it with
    its own ``--training`` config."""
    with db.session() as session:
        row = session.get(SqlJob, job.id)
        assert row is not None
        row.payload = {k: v for k, v in row.payload.items() if k != "training"}
    return _job(db, job.id)


def _heartbeat_seconds(job: Job) -> float:
    if job.heartbeat_at is None or job.started_at is None:
        return 0.0
    return (job.heartbeat_at - job.started_at).total_seconds()
