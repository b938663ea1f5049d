"""JobWorker on SQLite and PostgreSQL: success, retries, non-retryable errors, heartbeats, and a lease lost
mid-handler (the handler's outcome is never recorded)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from tests.polling import wait_for
from tests.unit.jobs.test_queue import _write

from lorafleet.domain import Job
from lorafleet.errors import LeaseLostError, TrainingError, ValidationError
from lorafleet.jobs import JobQueue, JobWorker, LeaseContext
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlDatasetSnapshot

LEASE = 30.0


def _worker(queue: JobQueue, handler: Callable[[Job, LeaseContext], Any], **kwargs: Any) -> JobWorker:
    kwargs.setdefault("heartbeat_every", 0.02)
    return JobWorker(queue, worker_id="worker-1", handlers={"train": handler}, lease_seconds=LEASE, **kwargs)


def _submit(queue: JobQueue, **kwargs: Any) -> int:
    return queue.submit(tenant_id=None, kind="train", payload={"x": 1}, dedupe_key="k", **kwargs).job.id


def test_a_handler_result_completes_the_job(queue: JobQueue) -> None:
    job_id = _submit(queue)
    seen: list[tuple[int, int]] = []

    def handler(job: Job, lease: LeaseContext) -> dict[str, Any]:
        lease.check()
        seen.append((job.id, job.attempts))
        return {"loss": 0.5}

    worker = _worker(queue, handler)
    done = worker.run_once()
    assert done is not None and done.state == "succeeded" and done.result == {"loss": 0.5}
    assert seen == [(job_id, 1)] and done.lease_owner == "worker-1"
    assert worker.run_once() is None


def test_a_failing_handler_is_retried_after_backoff(queue: JobQueue, clock) -> None:
    job_id = _submit(queue)
    calls: list[int] = []

    def flaky(job: Job, lease: LeaseContext) -> dict[str, Any]:
        calls.append(job.attempts)
        if len(calls) == 1:
            raise OSError("disk full")
        return {"ok": True}

    worker = _worker(queue, flaky)
    first = worker.run_once()
    assert first is not None and first.state == "queued" and first.error == "OSError: disk full"
    assert worker.run_once() is None  # backing off (10 s)
    clock.advance(seconds=10)
    assert worker.run_until_idle() == [queue.get(tenant_id=None, job_id=job_id)]
    assert calls == [1, 2] and queue.get(tenant_id=None, job_id=job_id).state == "succeeded"


@pytest.mark.parametrize("error", [TrainingError("loss is nan"), ValidationError("bad record")])
def test_training_and_validation_errors_are_not_retried(queue: JobQueue, error: Exception) -> None:
    _submit(queue)

    def broken(job: Job, lease: LeaseContext) -> dict[str, Any]:
        raise error

    done = _worker(queue, broken).run_once()
    assert done is not None and done.state == "failed" and done.attempts == 1
    assert done.error == f"{type(error).__name__}: {error}"


def test_heartbeats_keep_a_long_handler_s_lease(queue: JobQueue, database: Database, clock) -> None:
    job_id = _submit(queue)
    thief = JobQueue(database, clock=clock)

    def slow(job: Job, lease: LeaseContext) -> dict[str, Any]:
        for _ in range(2):  # 50 s of fake time under a 30 s lease
            clock.advance(seconds=25)
            wait_for(
                "a heartbeat",
                lambda: queue.get(tenant_id=None, job_id=job_id).heartbeat_at == clock(),
                timeout=5.0,
                every=0.01,
            )
            assert thief.claim(worker_id="thief", lease_seconds=LEASE) is None
        lease.check()
        return {"ok": True}

    done = _worker(queue, slow).run_once()
    assert done is not None and done.state == "succeeded" and done.attempts == 1


def test_heartbeats_after_a_fenced_success_do_not_report_a_lost_lease(
    queue: JobQueue, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that completes its job in its fenced transaction and then tidies up (a train job removing its
    work folders): the heartbeats meanwhile found "job is succeeded; worker must stop" and logged a lost lease
    (seen in the soak with training beside serving, ``bench_soak.py --train``)."""
    _submit(queue)
    beats = []

    def completes_then_tidies(job: Job, lease: LeaseContext) -> dict[str, Any]:
        with lease.fenced() as fenced:
            fenced.succeed({"ok": True})
        real = queue.heartbeat
        queue.heartbeat = lambda **kw: beats.append(kw) or real(**kw)  # type: ignore[method-assign]
        try:
            time.sleep(0.2)  # ten heartbeat periods
        finally:
            queue.heartbeat = real  # type: ignore[method-assign]
        lease.check()
        return {}

    with caplog.at_level("WARNING", logger="lorafleet.jobs.worker"):
        done = _worker(queue, completes_then_tidies).run_once()
    assert done is not None and done.state == "succeeded" and done.result == {"ok": True}
    assert beats == [] and caplog.records == []


def test_lease_lost_mid_handler_drops_its_result(queue: JobQueue, database: Database, clock) -> None:
    job_id = _submit(queue)
    thief = JobQueue(database, clock=clock)
    raised: list[Exception] = []

    def overtaken(job: Job, lease: LeaseContext) -> dict[str, Any]:
        clock.advance(seconds=LEASE + 1)  # this worker stalled; another took over
        assert thief.claim(worker_id="thief", lease_seconds=LEASE) is not None
        wait_for(
            "the lease to be lost", lambda: lease.lost, timeout=5.0, every=0.01
        )  # the next heartbeat notices
        try:
            lease.check()
        except LeaseLostError as exc:
            raised.append(exc)
        return {"stale": True}  # a careless handler returns anyway

    done = _worker(queue, overtaken).run_once()
    assert len(raised) == 1
    assert (
        done is not None and done.state == "running" and done.lease_owner == "thief" and done.result is None
    )
    finished = thief.complete(job_id=job_id, worker_id="thief", result={"by": "thief"})
    assert finished.result == {"by": "thief"}


def test_a_stale_result_is_fenced_out_even_before_a_heartbeat(
    queue: JobQueue, database: Database, clock
) -> None:
    job_id = _submit(queue)
    thief = JobQueue(database, clock=clock)

    def overtaken(job: Job, lease: LeaseContext) -> dict[str, Any]:
        clock.advance(seconds=LEASE + 1)
        thief.claim(worker_id="thief", lease_seconds=LEASE)
        return {"stale": True}

    done = _worker(queue, overtaken, heartbeat_every=10.0).run_once()
    assert done is not None and done.state == "running" and done.result is None
    assert queue.get(tenant_id=None, job_id=job_id).lease_owner == "thief"


def test_a_handler_can_write_and_succeed_in_one_fenced_transaction(
    queue: JobQueue, database: Database
) -> None:
    _submit(queue)

    def atomic(job: Job, lease: LeaseContext) -> None:
        with lease.fenced() as fence:
            _write(
                database, SqlDatasetSnapshot(user_id=None, record_count=0, content_hash="f" * 64, details={})
            )
            fence.succeed({"snapshot": "written"})

    done = _worker(queue, atomic).run_once()
    assert done is not None and done.state == "succeeded" and done.result == {"snapshot": "written"}
    with database.session() as s:
        assert s.scalar(select(func.count()).select_from(SqlDatasetSnapshot)) == 1


def test_worker_settings_are_validated(queue: JobQueue) -> None:
    with pytest.raises(ValidationError, match="handlers"):
        JobWorker(queue, worker_id="w", handlers={})
    with pytest.raises(ValidationError, match="heartbeat_every"):
        JobWorker(
            queue, worker_id="w", handlers={"train": lambda j, c: {}}, lease_seconds=1, heartbeat_every=2
        )
