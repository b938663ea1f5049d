"""The scheduler on SQLite and PostgreSQL: who is due, skips, grouping, capacity, failure backoff,
train-now, the loop, and two schedulers ticking at once (PostgreSQL)."""

from __future__ import annotations

import functools
import itertools
import logging
import random
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from lorafleet.errors import NotFoundError, ValidationError
from lorafleet.jobs import JobQueue, Scheduler, SchedulerPolicy, TickResult, train_dedupe_key
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import ACTIVE_JOB_STATES, SqlJob, SqlJobUser
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.training.config import TrainingConfig
from lorafleet.workflows.feedback import ingest_feedback

Feed = Callable[..., list[int]]
UserId = Callable[[int, str], int]


def _scheduler(database: Database, queue: JobQueue, **policy: Any) -> Scheduler:
    return Scheduler(database, SchedulerPolicy(**policy), queue=queue, clock=queue.clock)


def _users(job_payload: dict[str, Any]) -> list[str]:
    return [u["external_id"] for u in job_payload["users"]]


def _finish_all(queue: JobQueue, *, ok: bool = True) -> list[int]:
    """Claim and end every claimable job; their ids."""
    ended = []
    while (job := queue.claim(worker_id="w", lease_seconds=60)) is not None:
        if ok:
            queue.complete(job_id=job.id, worker_id="w", result={})
        else:
            queue.fail(job_id=job.id, worker_id="w", error="boom", retryable=False)
        ended.append(job.id)
    return ended


def test_users_are_due_by_count(
    database: Database, queue: JobQueue, tenant_id: int, feed: Feed, uid: UserId
) -> None:
    alice_ids = feed(tenant_id, "alice", 3)
    feed(tenant_id, "bob", 2)
    result = _scheduler(database, queue, min_new_records=3).tick()

    assert result.due_users == 1 and result.skipped == {"not_due": 1}
    [job] = result.jobs_created
    alice = uid(tenant_id, "alice")
    assert job.kind == "train" and job.tenant_id == tenant_id and job.state == "queued"
    assert job.payload == {
        "users": [
            {
                "user_id": alice,
                "external_id": "alice",
                "kind": "user",
                "watermark": alice_ids[-1],
                "trained_through_id": None,
            }
        ],
        "training": TrainingConfig().model_dump(mode="json"),
    }
    assert job.dedupe_key == train_dedupe_key([(alice, alice_ids[-1])])
    assert queue.job_users(job_id=job.id) == {alice: alice_ids[-1]}


def test_users_are_due_by_staleness(
    database: Database, queue: JobQueue, clock, tenant_id: int, feed: Feed
) -> None:
    feed(tenant_id, "bob", 1)
    scheduler = _scheduler(database, queue, min_new_records=5, max_staleness=timedelta(minutes=30))
    assert scheduler.tick().jobs_created == []
    clock.advance(minutes=29)
    assert scheduler.tick().jobs_created == []
    clock.advance(minutes=2)
    [job] = scheduler.tick().jobs_created
    assert _users(job.payload) == ["bob"]


def test_trained_users_are_not_due_until_new_feedback(
    database: Database, queue: JobQueue, tenant_id: int, feed: Feed, uid: UserId, record_version: Callable
) -> None:
    ids = feed(tenant_id, "alice", 2)
    scheduler = _scheduler(database, queue, min_new_records=2)
    [job] = scheduler.tick().jobs_created
    record_version(tenant_id, uid(tenant_id, "alice"), ids[-1])
    _finish_all(queue)
    assert scheduler.tick().due_users == 0

    newer = feed(tenant_id, "alice", 2)
    [again] = scheduler.tick().jobs_created
    assert again.payload["users"][0]["watermark"] == newer[-1]
    assert again.payload["users"][0]["trained_through_id"] == ids[-1]


def test_users_with_an_active_job_are_skipped(
    database: Database, queue: JobQueue, tenant_id: int, feed: Feed
) -> None:
    feed(tenant_id, "alice", 2)
    scheduler = _scheduler(database, queue, min_new_records=1)
    [job] = scheduler.tick().jobs_created
    feed(tenant_id, "alice", 2)  # a newer watermark does not start a second job while one is active
    queue.claim(worker_id="w", lease_seconds=60)
    result = scheduler.tick()
    assert result.jobs_created == [] and result.skipped == {"active_job": 1}


def test_users_are_grouped_per_tenant_into_jobs_of_at_most_k(
    database: Database, queue: JobQueue, make_tenant: Callable[[str], int], feed: Feed
) -> None:
    a, b = make_tenant("a"), make_tenant("b")
    for i in range(7):
        feed(a, f"a{i}", 1)
    for i in range(2):
        feed(b, f"b{i}", 1)
    result = _scheduler(database, queue, min_new_records=1, users_per_job=3, max_active_jobs=10).tick()

    sizes = sorted((job.tenant_id, len(job.payload["users"])) for job in result.jobs_created)
    assert sizes == sorted([(a, 3), (a, 3), (a, 1), (b, 2)])
    users = [u for job in result.jobs_created for u in _users(job.payload)]
    assert sorted(users) == sorted([f"a{i}" for i in range(7)] + ["b0", "b1"])
    for job in result.jobs_created:
        assert {u[0] for u in _users(job.payload)} == {"a" if job.tenant_id == a else "b"}


def test_max_active_jobs_is_respected(
    database: Database, queue: JobQueue, tenant_id: int, feed: Feed
) -> None:
    for name in ("u0", "u1", "u2", "u3"):
        feed(tenant_id, name, 1)
    queue.submit(tenant_id=None, kind="qa", payload={}, dedupe_key="other-kind")  # not a training job
    scheduler = _scheduler(database, queue, min_new_records=1, users_per_job=1, max_active_jobs=2)

    first = scheduler.tick()
    assert [_users(j.payload) for j in first.jobs_created] == [["u0"], ["u1"]]  # longest-waiting first
    assert first.skipped == {"capacity": 2}
    assert scheduler.tick().skipped == {"active_job": 2, "capacity": 2}

    job = queue.claim(worker_id="w", kinds=["train"], lease_seconds=60)
    assert job is not None
    queue.complete(job_id=job.id, worker_id="w", result={})
    [third] = scheduler.tick().jobs_created
    assert _users(third.payload) == ["u0"]  # no version was recorded, so u0 waits longest still
    assert queue.counts_by_state()["queued"] == 3  # two training jobs and the qa job


def test_users_whose_jobs_keep_failing_are_backed_off(
    database: Database, queue: JobQueue, clock, tenant_id: int, feed: Feed
) -> None:
    feed(tenant_id, "alice", 1)
    scheduler = _scheduler(
        database,
        queue,
        min_new_records=1,
        failure_threshold=2,
        failure_backoff=timedelta(minutes=10),
        max_failure_backoff=timedelta(minutes=15),
    )

    def fails_then(ok: bool) -> TickResult:
        assert len(scheduler.tick().jobs_created) == 1
        _finish_all(queue, ok=ok)
        return scheduler.tick()

    assert len(fails_then(ok=False).jobs_created) == 1  # one failure: no backoff yet
    _finish_all(queue, ok=False)
    assert scheduler.tick().skipped == {"backoff": 1}  # two in a row: 10 minutes
    clock.advance(minutes=9, seconds=59)
    assert scheduler.tick().jobs_created == []
    clock.advance(seconds=1)
    assert fails_then(ok=False).skipped == {"backoff": 1}  # three: doubled to 20, capped at 15 minutes
    clock.advance(minutes=14)
    assert scheduler.tick().jobs_created == []
    clock.advance(minutes=1)
    assert len(fails_then(ok=True).jobs_created) == 1  # a success resets the streak


def test_train_now(
    database: Database, queue: JobQueue, tenant_id: int, feed: Feed, uid: UserId, record_version: Callable
) -> None:
    scheduler = _scheduler(database, queue, min_new_records=100)
    with pytest.raises(NotFoundError):
        scheduler.train_now(tenant_id=tenant_id, user_external_id="nobody")
    ids = feed(tenant_id, "alice", 1)
    first = scheduler.train_now(tenant_id=tenant_id, user_external_id="alice")
    again = scheduler.train_now(tenant_id=tenant_id, user_external_id="alice")
    assert first.created and not again.created and again.job.id == first.job.id
    assert first.job.dedupe_key == train_dedupe_key([(uid(tenant_id, "alice"), ids[0])])

    record_version(tenant_id, uid(tenant_id, "alice"), ids[0])
    _finish_all(queue)
    with pytest.raises(ValidationError, match="no feedback newer"):
        scheduler.train_now(tenant_id=tenant_id, user_external_id="alice")

    feed(tenant_id, "bob", 1)
    feed(tenant_id, "carol", 1)
    [group] = _scheduler(database, queue, min_new_records=1).tick().jobs_created
    joined = scheduler.train_now(tenant_id=tenant_id, user_external_id="carol")
    assert not joined.created and joined.job.id == group.id  # never two active jobs for one user


def test_policy_is_validated() -> None:
    for bad in ({"users_per_job": 65}, {"min_new_records": 0}, {"max_active_jobs": 0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            SchedulerPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="max_failure_backoff"):
        SchedulerPolicy(failure_backoff=timedelta(hours=2), max_failure_backoff=timedelta(hours=1))


def test_run_loop_ticks_until_stopped(
    database: Database, queue: JobQueue, tenant_id: int, feed: Feed, caplog: pytest.LogCaptureFixture
) -> None:
    feed(tenant_id, "alice", 1)
    stop = threading.Event()
    results: list[TickResult] = []

    def on_tick(result: TickResult) -> None:
        results.append(result)
        if len(results) == 2:
            stop.set()

    caplog.set_level(logging.INFO, logger="lorafleet.jobs.scheduler")
    scheduler = _scheduler(database, queue, min_new_records=1)
    assert scheduler.run_loop(interval_seconds=0.01, stop_event=stop, on_tick=on_tick) == 2
    assert [len(r.jobs_created) for r in results] == [1, 0]
    assert "scheduler tick: due=1 created=1 jobs (1 users)" in caplog.text


def _active_jobs_per_user(db: Database) -> dict[int, int]:
    with db.session() as s:
        query = (
            select(SqlJobUser.user_id, func.count())
            .join(SqlJob, SqlJob.id == SqlJobUser.job_id)
            .where(SqlJob.state.in_(ACTIVE_JOB_STATES))
            .group_by(SqlJobUser.user_id)
        )
        return {user_id: count for user_id, count in s.execute(query)}


def _feed_each(feed: Callable[[int, str, int], None], users: list[tuple[int, str]]) -> None:
    for tenant, name in users:
        feed(tenant, name, 1)


def _tick_together(schedulers: list[Scheduler], *, meanwhile: Callable[[], None]) -> list[TickResult]:
    """Every scheduler ticks in its own thread while ``meanwhile`` runs, all released at once."""
    barrier = threading.Barrier(len(schedulers) + 1)
    results: list[TickResult] = []

    def tick(scheduler: Scheduler) -> None:
        barrier.wait()
        results.append(scheduler.tick())

    threads = [threading.Thread(target=tick, args=(s,)) for s in schedulers]
    for thread in threads:
        thread.start()
    barrier.wait()
    meanwhile()
    for thread in threads:
        thread.join()
    assert len(results) == len(schedulers)
    return results


def test_two_schedulers_ticking_at_once_never_duplicate_work(pg_database: Database, pg_url: str) -> None:
    tenants = [TenantRepository(pg_database).create_tenant(name=n)[0].id for n in ("a", "b")]
    names = [(t, f"u{i}") for t in tenants for i in range(6)]
    prompts = itertools.count()

    def feed(tenant: int, name: str, count: int) -> None:
        records = [{"kind": "sft", "prompt": f"p{next(prompts)}", "completion": "c"} for _ in range(count)]
        ingest_feedback(pg_database, tenant_id=tenant, user_external_id=name, records=records)

    policy = SchedulerPolicy(min_new_records=1, users_per_job=3, max_active_jobs=100)
    dbs = [Database(pg_url), Database(pg_url)]
    schedulers = [Scheduler(db, policy) for db in dbs]
    rng = random.Random(7)
    queue = JobQueue(pg_database)
    total = 0
    try:
        for _round in range(20):
            for tenant, name in rng.sample(names, 5):
                feed(tenant, name, 1)
            # feedback keeps arriving while they tick, so the two may read different watermarks
            arriving = rng.sample(names, 4)
            results = _tick_together(schedulers, meanwhile=functools.partial(_feed_each, feed, arriving))
            created = [job for r in results for job in r.jobs_created]
            total += len(created)
            users = [u["user_id"] for job in created for u in job.payload["users"]]
            assert len(users) == len(set(users))  # nobody queued by both schedulers
            assert all(count == 1 for count in _active_jobs_per_user(pg_database).values())
            if _round % 3 == 2:  # let some jobs finish so users come due again
                _finish_all(queue)
    finally:
        for db in dbs:
            db.dispose()
    with pg_database.session() as s:
        keys = s.scalars(select(SqlJob.dedupe_key).where(SqlJob.state.in_(ACTIVE_JOB_STATES))).all()
    assert len(keys) == len(set(keys)) > 0
    assert total > 20  # users came due again and again
