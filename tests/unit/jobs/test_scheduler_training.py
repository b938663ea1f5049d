"""The training config a train job is queued with, on SQLite and PostgreSQL: the scheduler's defaults, then the
tenant's overrides, then the job's, stored in the payload; tenants never share a job; bad overrides queue
nothing and name their field."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select

from lorafleet.errors import ValidationError
from lorafleet.jobs import JobQueue, Scheduler, SchedulerPolicy
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlJob
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.training.config import TrainingConfig
from lorafleet.training.overrides import set_tenant_training

Feed = Callable[..., list[int]]


def _scheduler(database: Database, queue: JobQueue, **kwargs: Any) -> Scheduler:
    return Scheduler(database, SchedulerPolicy(min_new_records=1), queue=queue, clock=queue.clock, **kwargs)


def _jobs(database: Database) -> int:
    with database.session() as session:
        return int(session.scalar(select(func.count()).select_from(SqlJob)) or 0)


def test_each_tenants_jobs_carry_its_own_effective_config(
    database: Database, queue: JobQueue, make_tenant: Callable[[str], int], feed: Feed
) -> None:
    acme, globex, plain = make_tenant("acme"), make_tenant("globex"), make_tenant("plain")
    set_tenant_training(database, tenant_id=acme, overrides={"learning_rate": 1e-3, "rank": 4})
    set_tenant_training(database, tenant_id=globex, overrides={"max_steps": 50})
    for tenant in (acme, globex, plain):
        feed(tenant, "u1", 1)
        feed(tenant, "u2", 1)

    scheduler = _scheduler(database, queue, training_defaults={"max_steps": 20, "seed": 7})
    jobs = {job.tenant_id: job for job in scheduler.tick().jobs_created}

    assert sorted(jobs) == sorted([acme, globex, plain])  # one job per tenant: configs never mix
    assert all(len(job.payload["users"]) == 2 for job in jobs.values())
    base = TrainingConfig(max_steps=20, seed=7)
    assert jobs[acme].payload["training"] == base.with_changes(learning_rate=1e-3, rank=4).model_dump(
        mode="json"
    )
    assert jobs[globex].payload["training"] == base.with_changes(max_steps=50).model_dump(mode="json")
    assert jobs[plain].payload["training"] == base.model_dump(mode="json")


def test_a_job_queued_now_has_its_overrides_on_top_of_the_tenants(
    database: Database, queue: JobQueue, tenant_id: int, feed: Feed
) -> None:
    set_tenant_training(database, tenant_id=tenant_id, overrides={"learning_rate": 1e-3, "max_steps": 40})
    feed(tenant_id, "ann", 2)
    feed(tenant_id, "bo", 2)
    scheduler = _scheduler(database, queue)

    job = scheduler.train_now(tenant_id=tenant_id, user_external_id="ann", training={"max_steps": 5}).job
    assert (job.payload["training"]["max_steps"], job.payload["training"]["learning_rate"]) == (5, 1e-3)
    other = scheduler.train_now(tenant_id=tenant_id, user_external_id="bo").job
    assert other.payload["training"]["max_steps"] == 40

    set_tenant_training(database, tenant_id=tenant_id, overrides={})  # later changes do not touch queued jobs
    assert queue.get(tenant_id=tenant_id, job_id=job.id).payload["training"]["learning_rate"] == 1e-3


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({"learning_rate": 1.0}, "training.learning_rate"),
        ({"rank": 32}, "training.rank"),
        ({"warmup": 0.1}, "training.warmup"),
        ({"max_steps": "10"}, "training.max_steps"),
    ],
)
def test_bad_job_overrides_queue_nothing_and_name_the_field(
    database: Database, queue: JobQueue, tenant_id: int, feed: Feed, training: dict[str, Any], field: str
) -> None:
    feed(tenant_id, "ann", 2)
    scheduler = _scheduler(database, queue, max_rank=16)
    with pytest.raises(ValidationError) as caught:
        scheduler.train_now(tenant_id=tenant_id, user_external_id="ann", training=training)
    assert str(caught.value).startswith(f"{field}: ")
    with pytest.raises(ValidationError, match=r"^training\.learning_rate: "):
        scheduler.train_task_now(tenant_id=tenant_id, task_name="sql", training={"learning_rate": 0})
    assert _jobs(database) == 0


def test_a_tenant_rank_above_the_trainers_maximum_is_refused_when_queued_now(
    database: Database, queue: JobQueue, tenant_id: int, feed: Feed
) -> None:
    set_tenant_training(database, tenant_id=tenant_id, overrides={"rank": 32})  # allowed when set, max was 64
    feed(tenant_id, "ann", 2)
    with pytest.raises(ValidationError, match=r"^rank: 32 is above the trainers' maximum rank 16"):
        _scheduler(database, queue, max_rank=16).train_now(tenant_id=tenant_id, user_external_id="ann")
    assert _jobs(database) == 0
    job = _scheduler(database, queue, max_rank=16).train_now(
        tenant_id=tenant_id, user_external_id="ann", training={"rank": 16}
    )
    assert job.job.payload["training"]["rank"] == 16


def test_a_tenant_whose_stored_config_is_invalid_is_skipped_and_the_others_are_queued(
    database: Database, queue: JobQueue, make_tenant: Callable[[str], int], feed: Feed
) -> None:
    broken, fine = make_tenant("broken"), make_tenant("fine")
    TenantRepository(database).set_training_overrides(tenant_id=broken, overrides={"max_steps": -1})
    feed(broken, "ann", 1)
    feed(fine, "bo", 1)

    result = _scheduler(database, queue).tick()

    assert [job.tenant_id for job in result.jobs_created] == [fine]
    assert result.skipped == {"invalid_config": 1}


def test_scheduler_defaults_are_checked_at_construction(database: Database) -> None:
    with pytest.raises(ValidationError, match=r"^training_defaults\.max_steps: "):
        Scheduler(database, training_defaults={"max_steps": 0})
    with pytest.raises(ValidationError, match=r"^training_defaults\.rank: 32 is above"):
        Scheduler(database, training_defaults={"rank": 32}, max_rank=16)
