"""Train jobs on a real local Ray (127.0.0.1): trainer actors with the nf4 tiny backbone resident, pulling jobs
the scheduler queued. End to end on PostgreSQL and S3 over HTTP (moto), a worker killed mid-job on SQLite, and
``LORAFLEET_RAY_ADDRESS`` connecting to the running cluster instead of starting one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import ray
from continual_helpers import (
    TINY_TRAINING,
    count_versions_and_snapshots,
    feed_users,
    get_job,
    queue_legacy_train_job,
    tiny_tenant,
)
from tests.polling import wait_for

from lorafleet.config import Settings
from lorafleet.domain import AdapterVersion
from lorafleet.jobs import Scheduler, SchedulerPolicy
from lorafleet.registry import Registry
from lorafleet.runtime.job_commands import train_user_now_and_wait
from lorafleet.runtime.trainer_pool import TrainerPool
from lorafleet.store.blob import open_blob_store_from_settings
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.feedback import get_snapshot
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.workflows.continual import AUTO_PROMOTE_ACTOR, PERSONAL_ADAPTER

USERS = [f"user-{i}" for i in range(6)]
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _versions_by_user(registry: Registry, db: Database, tenant_id: int) -> dict[str, list[AdapterVersion]]:
    repo = TenantRepository(db)
    out: dict[str, list[AdapterVersion]] = {}
    for name in USERS:
        user = repo.get_user(tenant_id=tenant_id, external_id=name)
        adapter = registry.find_adapter(tenant_id=tenant_id, owner_user_id=user.id, name=PERSONAL_ADAPTER)
        assert adapter is not None, name
        out[name] = registry.list_versions(tenant_id=tenant_id, adapter_id=adapter.id)
    return out


def _tick_and_drain(db: Database, pool: TrainerPool) -> list[int]:
    tick = Scheduler(db, SchedulerPolicy(min_new_records=4, users_per_job=3)).tick()
    assert len(tick.jobs_created) == 2 and tick.users_queued == 6
    ran = pool.drain(timeout=300)
    assert sorted(ran) == sorted(job.id for job in tick.jobs_created)
    for job_id in ran:
        job = get_job(db, job_id)
        assert (job.state, job.attempts) == ("succeeded", 1), job.error
    return ran


def test_two_rounds_for_six_users_through_the_scheduler_and_a_trainer_actor(
    ray_cluster: str,
    pg_database: Database,
    pg_url: str,
    s3_bucket: str,
    moto_endpoint: str,
    make_settings: Callable[..., Settings],
) -> None:
    db = pg_database
    settings = make_settings(
        database_url=pg_url,
        object_store_url=f"s3://{s3_bucket}/adapters",
        s3_endpoint_url=moto_endpoint,
        trainer_threads=2,  # Ray alone would give the 1-CPU actor one torch thread
    )
    registry = Registry(db, open_blob_store_from_settings(settings))
    tenant_id = tiny_tenant(db)
    round1 = feed_users(db, tenant_id=tenant_id, users=USERS, round=1, n_records=16)

    with TrainerPool(settings, n_actors=1, training=TINY_TRAINING, env_vars=AWS_TEST_ENV) as pool:
        jobs1 = _tick_and_drain(db, pool)
        first = _versions_by_user(registry, db, tenant_id)
        for name, (v1,) in first.items():
            assert v1.job_id in jobs1 and v1.base_fingerprint
            snapshot = get_snapshot(db, snapshot_id=v1.dataset_snapshot_id or 0)
            assert snapshot.record_ids == tuple(round1[name])
            m = v1.metrics
            assert m["holdout_examples"] > 0 and m["train_loss"] > 0
            assert m["holdout_loss_after"] < m["holdout_loss_before"], (name, m)  # so the rule promotes it
            assert v1.status == "live"
            (event,) = registry.alias_history(tenant_id=tenant_id, adapter_id=v1.adapter_id)
            assert event.actor == AUTO_PROMOTE_ACTOR and event.reason.startswith("holdout loss improved")

        round2 = feed_users(db, tenant_id=tenant_id, users=USERS, round=2, n_records=8)
        jobs2 = _tick_and_drain(db, pool)
        second = _versions_by_user(registry, db, tenant_id)
        for name, (v1, v2) in second.items():
            assert v2.number == 2 and v2.job_id in jobs2
            lineage = registry.lineage(tenant_id=tenant_id, version_id=v2.id)
            assert [(e.parent_version_id, e.relation) for e in lineage.edges] == [(v1.id, "continued-from")]
            used = lineage.root.dataset_snapshot
            assert used is not None and used.record_ids is not None
            replay = used.details["replay_ids"]
            assert len(replay) == 4 and set(replay) <= set(round1[name])  # ratio 0.5 x 8 new records
            assert set(used.record_ids) == set(round2[name]) | set(replay)
            # the parent was loaded: the new version's "before" is what version 1 reached
            assert v2.metrics["holdout_loss_before"] < v1.metrics["holdout_loss_before"]

        round3 = feed_users(db, tenant_id=tenant_id, users=USERS[:1], round=3, n_records=6)
        v3 = train_user_now_and_wait(settings, tenant="acme", user=USERS[0], timeout=120, pool=pool)
        assert v3 is not None and v3.number == 3
        assert max(get_snapshot(db, snapshot_id=v3.dataset_snapshot_id or 0).record_ids or ()) == max(
            round3[USERS[0]]
        )

        (stats,) = pool.stats()
        assert stats["backbone_loads"] == 1 and stats["jobs_succeeded"] == 5 and stats["jobs_failed"] == 0
        assert stats["torch_threads"] == 2
    assert count_versions_and_snapshots(db) == (13, 13)


def test_a_worker_killed_mid_job_is_taken_over_after_its_lease_and_one_version_results(
    ray_cluster: str, sqlite_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    database_url = sqlite_url  # PostgreSQL is covered end to end; one database keeps this slow test short
    db = Database(database_url)
    settings = make_settings(database_url=database_url, object_store_url=(tmp_path / "blobs").as_uri())
    tenant_id = TenantRepository(db).create_tenant(name="acme")[0].id
    feed_users(db, tenant_id=tenant_id, users=["eve"], round=1, n_records=12)
    # a job without its own config: the doomed actor's default never ends, the rescuer's is short
    job = queue_legacy_train_job(db, tenant_id=tenant_id, user="eve")

    doomed = TrainerPool(
        make_settings(
            database_url=database_url, object_store_url=(tmp_path / "blobs").as_uri(), lease_seconds=3.0
        ),
        training={**TINY_TRAINING, "max_steps": 100_000},
    )
    running = doomed.actors[0].run_once.remote()
    wait_for("the first actor to claim the job", lambda: get_job(db, job.id).lease_owner == doomed.workers[0])
    wait_for("a heartbeat while training", lambda: _heartbeats(db, job.id) >= 2, timeout=30)
    ray.kill(doomed.actors[0])
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(running, timeout=30)
    assert get_job(db, job.id).state == "running" and count_versions_and_snapshots(db) == (0, 0)

    with TrainerPool(settings, training=TINY_TRAINING) as rescuer:
        wait_for("the dead worker's lease to expire", lambda: _lease_expired(db, job.id), timeout=30)
        assert rescuer.drain(timeout=120) == [job.id]

    done = get_job(db, job.id)
    assert (done.state, done.attempts, done.lease_owner) == ("succeeded", 2, rescuer.workers[0])
    assert count_versions_and_snapshots(db) == (1, 1)
    (entry,) = (done.result or {})["versions"]
    assert entry["number"] == 1
    db.dispose()


def _heartbeats(db: Database, job_id: int) -> float:
    job = get_job(db, job_id)
    if job.heartbeat_at is None or job.started_at is None:
        return 0.0
    return (job.heartbeat_at - job.started_at).total_seconds()


def _lease_expired(db: Database, job_id: int) -> bool:
    job = get_job(db, job_id)
    return job.lease_expires_at is not None and job.lease_expires_at < datetime.now(UTC)


CONNECT_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from lorafleet.config import load_settings
    from lorafleet.runtime.job_commands import run_workers

    ran = run_workers(load_settings(), n_actors=1, until_idle=True, training=json.loads(sys.argv[1]))
    import ray  # connected by run_workers

    context = ray.get_runtime_context()
    print(json.dumps({"gcs": context.gcs_address, "nodes": len(ray.nodes()), "ran": ran}))
    """
)


@pytest.mark.extended  # a second Ray cluster started beside the test's: make test-extended (CI time)
def test_lorafleet_ray_address_connects_to_the_running_cluster(
    ray_cluster: str, sqlite_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    db = Database(sqlite_url)
    tenant_id = tiny_tenant(db)
    feed_users(db, tenant_id=tenant_id, users=["fay"], round=1, n_records=8)
    job = Scheduler(db).train_now(tenant_id=tenant_id, user_external_id="fay").job
    settings = make_settings(database_url=sqlite_url, object_store_url=(tmp_path / "blobs").as_uri())
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env.update(
        {
            f"LORAFLEET_{k.upper()}": str(v)
            for k, v in settings.model_dump(mode="json").items()
            if v is not None
        }
    )
    env["LORAFLEET_RAY_ADDRESS"] = ray_cluster
    nodes_before = len(ray.nodes())

    out = subprocess.run(
        [sys.executable, "-c", CONNECT_SCRIPT, json.dumps(TINY_TRAINING)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["gcs"] == ray_cluster and report["nodes"] == nodes_before == 1
    assert report["ran"] == [job.id]
    assert get_job(db, job.id).state == "succeeded" and count_versions_and_snapshots(db) == (1, 1)
    db.dispose()
