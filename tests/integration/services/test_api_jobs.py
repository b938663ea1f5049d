"""Job progress and cancel through the API and the SDK, on the session's server (PostgreSQL): the typed
``progress`` of ``GET /v1/jobs/{id}`` and the listing, ``wait_for_job(on_progress=...)`` (sync and async) seeing
every step, ``POST /v1/jobs/{id}/cancel`` on queued, running and finished jobs and across tenants. A stand-in
worker (the library's own queue and lease) moves the jobs; a test of its own kind keeps real workers away."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import httpx
import pytest
from api_helpers import ApiServer, Library, TenantHandle

from lorafleet.domain import Job
from lorafleet.errors import JobCancelledError
from lorafleet.jobs import JobQueue, LeaseContext
from lorafleet.sdk import AsyncClient, errors
from lorafleet.sdk import schemas as s
from lorafleet.store.sql.tenants import task_subject_id

LEASE = 60.0
TOTAL = 5


class StandIn:
    """A worker of one job of a kind only this test queues: claims it, reports steps, finishes it."""

    def __init__(self, library: Library, tenant: TenantHandle) -> None:
        self.queue = JobQueue(library.db)
        self.kind = f"test-{uuid.uuid4().hex[:12]}"
        users = [
            {"external_id": "ann", "kind": "user"},
            {"external_id": task_subject_id("sql"), "kind": "task"},
        ]
        self.job = self.queue.submit(
            tenant_id=tenant.id, kind=self.kind, payload={"users": users}, dedupe_key=None
        ).job
        self.lease: LeaseContext | None = None

    @classmethod
    def running(cls, library: Library, tenant: TenantHandle) -> StandIn:
        """A stand-in that has claimed its job and reported step 1: a running job with progress."""
        worker = cls(library, tenant)
        worker.claim()
        worker.step(1)
        return worker

    def claim(self) -> LeaseContext:
        claimed = self.queue.claim(worker_id=self.kind, kinds=[self.kind], lease_seconds=LEASE)
        assert claimed is not None and claimed.id == self.job.id
        self.lease = LeaseContext(queue=self.queue, job=claimed, worker_id=self.kind, progress_interval=0)
        self.lease.report_phase("training")
        return self.lease

    def step(self, step: int) -> None:
        assert self.lease is not None
        losses = {"ann": 2.0 / step, "task:sql": 3.0 / step}
        self.lease.report_step(step=step, total=TOTAL, losses=losses, loss=2.5 / step)

    def succeed(self) -> Job:
        return self.queue.complete(job_id=self.job.id, worker_id=self.kind, result={}, attempt=1)


def test_a_jobs_progress_is_typed_in_get_and_list(tenant: TenantHandle, library: Library) -> None:
    worker = StandIn(library, tenant)
    assert tenant.client.get_job(worker.job.id).progress is None
    worker.claim()
    worker.step(1)
    worker.step(2)

    job = tenant.client.get_job(worker.job.id)
    assert job.state == "running" and job.users == ["ann", "task:sql"]
    progress = job.progress
    assert isinstance(progress, s.JobProgressOut)
    assert (progress.phase, progress.step, progress.total_steps, progress.fraction) == (
        "training",
        2,
        TOTAL,
        0.4,
    )
    assert progress.losses == {"ann": 1.0, "task:sql": 1.5} and progress.loss == 1.25
    assert progress.curves == {"ann": [[1, 2.0], [2, 1.0]], "task:sql": [[1, 3.0], [2, 1.5]]}
    assert progress.eta_seconds is not None and progress.eta_seconds >= 0
    assert progress.updated_at is not None and progress.updated_at.tzinfo is not None
    [listed] = [j for j in tenant.client.list_jobs() if j.id == job.id]
    assert listed.progress == progress
    worker.succeed()


def test_wait_for_job_calls_on_progress_with_every_new_step(tenant: TenantHandle, library: Library) -> None:
    worker = StandIn.running(library, tenant)
    seen: list[s.JobProgressOut] = []

    def on_progress(progress: s.JobProgressOut) -> None:
        seen.append(progress)  # each report moves the stand-in one step on: no timing involved
        if progress.step < TOTAL:
            worker.step(progress.step + 1)
        else:
            worker.succeed()

    job = tenant.client.wait_for_job(worker.job.id, timeout=60, poll=0.01, on_progress=on_progress)
    assert job.state == "succeeded"
    assert [p.step for p in seen] == list(range(1, TOTAL + 1))
    assert seen[-1].fraction == 1.0 and seen[-1].eta_seconds == 0.0


def test_the_async_client_waits_with_on_progress_and_cancels(
    api: ApiServer, tenant: TenantHandle, library: Library
) -> None:
    worker = StandIn.running(library, tenant)
    steps: list[int] = []

    async def run() -> s.JobOut:
        async with AsyncClient(api.url, tenant.api_key) as client:

            def on_progress(progress: s.JobProgressOut) -> None:
                steps.append(progress.step)
                if progress.step < 3:
                    worker.step(progress.step + 1)
                else:  # the worker's next step finds the request and it stops
                    worker.queue.cancel(tenant_id=tenant.id, job_id=worker.job.id, actor="test")
                    with pytest.raises(JobCancelledError):
                        worker.step(4)
                    worker.queue.acknowledge_cancel(job_id=worker.job.id, worker_id=worker.kind)

            ended = await client.wait_for_job(worker.job.id, timeout=60, poll=0.01, on_progress=on_progress)
            assert (await client.cancel_job(worker.job.id)).state == "cancelled"  # idempotent
            return ended

    ended = asyncio.run(run())
    assert steps == [1, 2, 3] and (ended.state, ended.cancelled_by) == ("cancelled", "test")


def test_cancel_a_queued_job_at_once(tenant: TenantHandle, library: Library) -> None:
    worker = StandIn(library, tenant)
    cancelled = tenant.client.cancel_job(worker.job.id)
    assert cancelled.state == "cancelled" and cancelled.cancelled_by == f"api:{tenant.name}"
    assert cancelled.cancel_requested_at is not None and cancelled.finished_at is not None
    again = tenant.client.cancel_job(worker.job.id)
    assert again.model_dump() == cancelled.model_dump()
    assert worker.queue.claim(worker_id="w", kinds=[worker.kind], lease_seconds=LEASE) is None


def test_cancel_a_running_job_asks_its_worker_to_stop(tenant: TenantHandle, library: Library) -> None:
    worker = StandIn.running(library, tenant)
    requested = tenant.client.cancel_job(worker.job.id)
    assert requested.state == "running" and requested.cancel_requested_at is not None
    assert requested.cancelled_by == f"api:{tenant.name}"
    with pytest.raises(JobCancelledError):
        worker.step(2)
    worker.queue.acknowledge_cancel(job_id=worker.job.id, worker_id=worker.kind)
    ended = tenant.client.get_job(worker.job.id)
    assert (ended.state, ended.progress.step if ended.progress else None) == ("cancelled", 1)


def test_another_tenants_job_is_404_and_untouched(
    make_tenant: Callable[[], TenantHandle], library: Library
) -> None:
    mine, theirs = make_tenant(), make_tenant()
    worker = StandIn(library, mine)
    with pytest.raises(errors.NotFound):
        theirs.client.cancel_job(worker.job.id)
    with pytest.raises(errors.NotFound):
        theirs.client.cancel_job(10**12)
    assert mine.client.get_job(worker.job.id).state == "queued"
    mine.client.cancel_job(worker.job.id)


def test_cancelling_a_finished_job_is_409_naming_its_state(
    api: ApiServer, tenant: TenantHandle, library: Library
) -> None:
    worker = StandIn(library, tenant)
    worker.claim()
    worker.succeed()
    with pytest.raises(errors.JobFinished) as refused:
        tenant.client.cancel_job(worker.job.id)
    assert (refused.value.status, refused.value.state) == (409, "succeeded")
    assert isinstance(refused.value, errors.InvalidState)
    raw = httpx.post(
        f"{api.url}/v1/jobs/{worker.job.id}/cancel", headers={"Authorization": f"Bearer {tenant.api_key}"}
    )
    assert raw.status_code == 409
    assert raw.json()["error"]["code"] == "job_finished" and raw.json()["error"]["state"] == "succeeded"
    job = tenant.client.get_job(worker.job.id)
    assert (job.state, job.cancel_requested_at, job.cancelled_by) == ("succeeded", None, None)


def test_a_bad_job_id_is_422_naming_it(api: ApiServer, tenant: TenantHandle) -> None:
    raw = httpx.post(f"{api.url}/v1/jobs/0/cancel", headers={"Authorization": f"Bearer {tenant.api_key}"})
    assert raw.status_code == 422 and raw.json()["error"]["field"] == "job_id"
