"""JobWorker with progress and cancel, on SQLite and PostgreSQL: progress reaches the job row throttled and
through the lease fence; a cancel requested mid-handler stops it (by the progress write, the heartbeat or the
fence), nothing it would have written is kept, and the job ends ``cancelled`` without a retry."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from tests.unit.jobs.test_progress import Ticks
from tests.unit.jobs.test_queue import _count, _snapshot, _write

from lorafleet.domain import Job
from lorafleet.errors import JobCancelledError, LeaseLostError
from lorafleet.jobs import JobQueue, JobWorker, LeaseContext
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlDatasetSnapshot

LEASE = 30.0


def _worker(queue: JobQueue, handler: Callable[[Job, LeaseContext], Any], **kwargs: Any) -> JobWorker:
    kwargs.setdefault("heartbeat_every", 10.0)
    return JobWorker(queue, worker_id="worker-1", handlers={"train": handler}, lease_seconds=LEASE, **kwargs)


def _submit(queue: JobQueue) -> int:
    return queue.submit(tenant_id=None, kind="train", payload={}, dedupe_key="k", max_attempts=3).job.id


def test_progress_reaches_the_job_row_throttled(queue: JobQueue) -> None:
    job_id = _submit(queue)
    claimed = queue.claim(worker_id="w", lease_seconds=LEASE)
    assert claimed is not None
    ticks = Ticks()
    lease = LeaseContext(queue=queue, job=claimed, worker_id="w", progress_interval=2.0, monotonic=ticks)
    lease.report_phase("training")
    stored: list[int | None] = []
    for step in range(1, 11):
        lease.report_step(step=step, total=10, losses={"ann": 1.0, "task:sql": 2.0}, loss=1.5)
        stored.append(queue.get(tenant_id=None, job_id=job_id).progress["step"])  # type: ignore[index]
        ticks.now += 0.5
    assert stored == [1, 1, 1, 1, 5, 5, 5, 5, 9, 10]
    final = queue.get(tenant_id=None, job_id=job_id).progress
    assert final is not None and final["losses"] == {"ann": 1.0, "task:sql": 2.0}
    assert (final["phase"], final["fraction"], final["total_steps"]) == ("training", 1.0, 10)
    assert "updated_at" in final


def test_a_worker_that_lost_its_lease_writes_no_progress(queue: JobQueue, clock) -> None:
    job_id = _submit(queue)
    stale = queue.claim(worker_id="stale", lease_seconds=LEASE)
    assert stale is not None
    clock.advance(seconds=LEASE + 1)
    assert queue.claim(worker_id="fresh", lease_seconds=LEASE) is not None
    lease = LeaseContext(queue=queue, job=stale, worker_id="stale")
    with pytest.raises(LeaseLostError):
        lease.report_step(step=1, total=4, losses={"ann": 1.0})
    assert lease.lost and not lease.cancel_requested
    assert queue.get(tenant_id=None, job_id=job_id).progress is None


def test_a_cancel_stops_the_handler_at_its_next_progress_report(queue: JobQueue) -> None:
    job_id = _submit(queue)
    steps: list[int] = []

    def handler(job: Job, lease: LeaseContext) -> dict[str, Any]:
        for step in range(1, 11):
            lease.check()
            steps.append(step)
            if step == 3:
                queue.cancel(tenant_id=None, job_id=job.id, actor="api:acme")
            lease.report_step(step=step, total=10, losses={"ann": 1.0})
        return {"versions": [1]}

    done = _worker(queue, handler, progress_interval=0.0).run_once()
    assert done is not None and done.id == job_id
    assert (done.state, done.cancelled_by, done.result) == ("cancelled", "api:acme", None)
    assert steps == [1, 2, 3] and done.progress is not None and done.progress["step"] == 2
    assert done.attempts == 1 and queue.claim(worker_id="other", lease_seconds=LEASE) is None


def test_a_heartbeat_tells_a_handler_that_only_checks(queue: JobQueue) -> None:
    _submit(queue)
    checks: list[int] = []

    def handler(job: Job, lease: LeaseContext) -> dict[str, Any]:
        queue.cancel(tenant_id=None, job_id=job.id, actor="cli")
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            lease.check()  # raises once a heartbeat saw the request
            checks.append(1)
            time.sleep(0.01)
        return {"ok": True}

    done = _worker(queue, handler, heartbeat_every=0.02).run_once()
    assert done is not None and (done.state, done.cancelled_by) == ("cancelled", "cli")
    assert done.result is None


def test_a_handler_without_checks_has_its_outcome_dropped(queue: JobQueue, database: Database) -> None:
    _submit(queue)

    def registers(job: Job, lease: LeaseContext) -> dict[str, Any]:
        queue.cancel(tenant_id=None, job_id=job.id, actor="cli")
        with lease.fenced() as fence:  # refused: the request came first
            _write(database, _snapshot("never"))
            fence.succeed({"versions": [1]})
        return {}

    done = _worker(queue, registers).run_once()
    assert done is not None and done.state == "cancelled" and done.result is None
    assert _count(database, SqlDatasetSnapshot) == 0


def test_a_result_returned_after_a_cancel_request_is_not_recorded(queue: JobQueue) -> None:
    _submit(queue)

    def ignores_checks(job: Job, lease: LeaseContext) -> dict[str, Any]:
        queue.cancel(tenant_id=None, job_id=job.id, actor="cli")
        return {"decision": "promote"}

    done = _worker(queue, ignores_checks).run_once()
    assert done is not None and (done.state, done.result) == ("cancelled", None)


def test_a_crash_after_a_cancel_request_is_not_retried(queue: JobQueue) -> None:
    _submit(queue)

    def crashes(job: Job, lease: LeaseContext) -> dict[str, Any]:
        queue.cancel(tenant_id=None, job_id=job.id, actor="cli")
        raise OSError("disk full")

    done = _worker(queue, crashes).run_once()
    assert done is not None and (done.state, done.attempts) == ("cancelled", 1)


def test_check_raises_the_cancel_error_once_seen(queue: JobQueue) -> None:
    _submit(queue)
    claimed = queue.claim(worker_id="w", lease_seconds=LEASE)
    assert claimed is not None
    lease = LeaseContext(queue=queue, job=claimed, worker_id="w")
    lease.check()
    lease.mark_cancelled("job 1: cancel requested by cli")
    with pytest.raises(JobCancelledError, match="cli"):
        lease.check()
    with pytest.raises(JobCancelledError):
        lease.report_phase("training")  # nothing is written for a cancelled job
    assert queue.get(tenant_id=None, job_id=claimed.id).progress is None
