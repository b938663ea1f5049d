"""Each train job trains with the config it was queued with, on SQLite and PostgreSQL, with a real ``JobWorker`` and
``ContinualTrainer`` on the nf4 tiny backbone: the tenant's overrides, a job's own on top, a job queued before
configs were stored (the trainer's default), and configs the trainer's bank cannot hold (failed, no retry). And
``TrainerHost``'s bank: every linear layer up to ``LORAFLEET_TRAINER_MAX_RANK``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from continual_helpers import TINY_TRAINING, feed_users, get_job, queue_legacy_train_job, tiny_tenant

from lorafleet.config import Settings
from lorafleet.domain import AdapterVersion, Job
from lorafleet.jobs import JobQueue, JobWorker, Scheduler
from lorafleet.registry import Registry
from lorafleet.store.sql.database import Database
from lorafleet.training.overrides import set_tenant_training
from lorafleet.workflows.continual import PERSONAL_ADAPTER, ContinualTrainer


def _run(trainer: ContinualTrainer, database: Database, job: Job) -> Job:
    worker = JobWorker(
        JobQueue(database), worker_id="w", handlers={"train": trainer.run_job}, lease_seconds=30
    )
    assert worker.run_once() is not None
    return get_job(database, job.id)


def _version(registry: Registry, *, tenant_id: int, job: Job) -> AdapterVersion:
    user_id = job.payload["users"][0]["user_id"]
    adapter = registry.find_adapter(tenant_id=tenant_id, owner_user_id=user_id, name=PERSONAL_ADAPTER)
    assert adapter is not None
    (version,) = [
        v for v in registry.list_versions(tenant_id=tenant_id, adapter_id=adapter.id) if v.job_id == job.id
    ]
    return version


def test_a_job_trains_with_the_tenants_config_as_it_was_when_queued(
    database: Database, registry: Registry, tenant_id: int, make_trainer: Callable[..., ContinualTrainer]
) -> None:
    set_tenant_training(database, tenant_id=tenant_id, overrides={**TINY_TRAINING, "max_steps": 3, "rank": 2})
    feed_users(database, tenant_id=tenant_id, users=["ann"], round=1, n_records=10)
    job = Scheduler(database).train_now(tenant_id=tenant_id, user_external_id="ann").job
    set_tenant_training(database, tenant_id=tenant_id, overrides=TINY_TRAINING)  # too late for this job

    done = _run(make_trainer(), database, job)  # the trainer's own default: TINY_TRAINING (8 steps, rank 4)

    assert done.state == "succeeded", done.error
    version = _version(registry, tenant_id=tenant_id, job=job)
    assert (version.metrics["steps"], version.rank) == (3, 2)
    assert version.training_config["max_steps"] == 3 and version.training_config["rank"] == 2
    adapter = registry.get_adapter(tenant_id=tenant_id, adapter_id=version.adapter_id)
    assert adapter.target_config["rank"] == 2


def test_a_jobs_own_overrides_win_over_the_tenants(
    database: Database, registry: Registry, tenant_id: int, make_trainer: Callable[..., ContinualTrainer]
) -> None:
    set_tenant_training(database, tenant_id=tenant_id, overrides={**TINY_TRAINING, "max_steps": 3})
    feed_users(database, tenant_id=tenant_id, users=["bo"], round=1, n_records=10)
    job = (
        Scheduler(database)
        .train_now(
            tenant_id=tenant_id,
            user_external_id="bo",
            training={"max_steps": 2, "target_modules": ["v_proj"]},
        )
        .job
    )

    done = _run(make_trainer(), database, job)

    assert done.state == "succeeded", done.error
    version = _version(registry, tenant_id=tenant_id, job=job)
    assert version.metrics["steps"] == 2 and version.training_config["learning_rate"] == 5e-3  # the tenant's
    assert {m.rsplit(".", 1)[-1] for m in version.target_modules} == {"v_proj"}


def test_a_job_queued_without_a_config_trains_with_the_trainers_default(
    database: Database, registry: Registry, tenant_id: int, make_trainer: Callable[..., ContinualTrainer]
) -> None:
    feed_users(database, tenant_id=tenant_id, users=["cy"], round=1, n_records=10)
    job = queue_legacy_train_job(database, tenant_id=tenant_id, user="cy")

    done = _run(make_trainer(max_steps=4), database, job)

    assert done.state == "succeeded" and "training" not in job.payload
    assert _version(registry, tenant_id=tenant_id, job=job).metrics["steps"] == 4


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"rank": 6}, "rank: 6 is above the trainers' maximum rank 4"),
        ({"target_modules": ["q_proj", "gate_proj"]}, "target_modules: ['gate_proj'] match no layer"),
        ({"layers": [7]}, "layers: [7] out of range"),
    ],
)
def test_a_config_the_bank_cannot_hold_fails_the_job_at_once_naming_the_field(
    database: Database,
    registry: Registry,
    tenant_id: int,
    make_trainer: Callable[..., ContinualTrainer],
    training: dict[str, Any],
    message: str,
) -> None:
    feed_users(database, tenant_id=tenant_id, users=["di"], round=1, n_records=8)
    job = Scheduler(database).train_now(tenant_id=tenant_id, user_external_id="di", training=training).job

    done = _run(make_trainer(), database, job)  # the in-process bank: q_proj and v_proj, ranks up to 4

    assert (done.state, done.attempts) == ("failed", 1) and message in (done.error or ""), done.error
    user_id = job.payload["users"][0]["user_id"]
    assert registry.find_adapter(tenant_id=tenant_id, owner_user_id=user_id, name=PERSONAL_ADAPTER) is None


def test_a_trainer_hosts_bank_holds_every_linear_layer_up_to_the_max_rank_setting(
    sqlite_url: str, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    from lorafleet.runtime.ray_runtime import TrainerHost, actor_settings

    settings = make_settings(
        database_url=sqlite_url, object_store_url=(tmp_path / "blobs").as_uri(), trainer_max_rank=6
    )
    host = TrainerHost(actor_settings(settings), TINY_TRAINING)
    try:
        bank = host.trainer.bank
        assert bank.max_rank == 6
        assert {name.rsplit(".", 1)[-1] for name in bank.layers} >= {
            "q_proj",
            "o_proj",
            "gate_proj",
            "down_proj",
        }
        db = host.db
        tenant_id = tiny_tenant(db)
        feed_users(db, tenant_id=tenant_id, users=["eve", "fay"], round=1, n_records=8)
        wide = Scheduler(db).train_now(
            tenant_id=tenant_id, user_external_id="eve", training={"rank": 6, "target_modules": "all-linear"}
        )
        too_wide = Scheduler(db).train_now(tenant_id=tenant_id, user_external_id="fay", training={"rank": 8})
        assert host.run_until_idle() == [wide.job.id, too_wide.job.id]
        assert get_job(db, wide.job.id).state == "succeeded"
        version = _version(host.registry, tenant_id=tenant_id, job=wide.job)
        assert version.rank == 6 and {m.rsplit(".", 1)[-1] for m in version.target_modules} >= {
            "up_proj",
            "k_proj",
        }
        failed = get_job(db, too_wide.job.id)
        assert failed.state == "failed" and "rank: 8 is above the trainers' maximum rank 6" in (
            failed.error or ""
        )
    finally:
        host.close()
