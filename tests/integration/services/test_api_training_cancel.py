"""A training job on a real trainer actor (local Ray, the tiny backbone), watched and cancelled through the API:
its progress shows up while it trains, and after ``POST /v1/jobs/{id}/cancel`` it stops, ends ``cancelled``
with the tenant as ``cancelled_by``, and leaves no version."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace

from api_helpers import (
    ADMIN_KEY,
    AWS_TEST_ENV,
    SERVING_OPTIONS,
    TINY_TRAINING,
    ApiServer,
    Library,
    count_rows,
)
from services.api.app import create_app
from tests.polling import wait_for

from lorafleet.config import Settings
from lorafleet.jobs import JobQueue
from lorafleet.sdk import Client
from lorafleet.store.sql.models import SqlAdapterVersion
from lorafleet.training.synthetic import make_user_records

NEVER_ENDS = 100_000


def _server_with_a_trainer(settings: Settings) -> ApiServer:
    """A server with one trainer actor (as ``lorafleet serve``) whose jobs would train for ever."""
    options = replace(
        SERVING_OPTIONS,
        run_workers=1,
        training={**TINY_TRAINING, "max_steps": NEVER_ENDS},
        worker_env=AWS_TEST_ENV,
        worker_poll_seconds=0.5,
    )
    return ApiServer(create_app(settings, options=options)).start()


def _never_left_running(library: Library, job_id: int) -> None:
    """A job of this test that would train for ever must not outlive it (the next server would take it over)."""
    if job_id and JobQueue(library.db).get(tenant_id=None, job_id=job_id).state in ("queued", "running"):
        JobQueue(library.db).cancel(tenant_id=None, job_id=job_id, actor="test cleanup")


def test_a_training_job_cancelled_through_the_api_stops_and_registers_nothing(
    api_ray: str, make_api_settings: Callable[..., Settings], library: Library
) -> None:
    server = _server_with_a_trainer(make_api_settings())
    job_id = 0
    try:
        with Client(server.url, ADMIN_KEY) as admin:
            tenant = admin.create_tenant(f"tenant-{uuid.uuid4().hex[:10]}")
        with Client(server.url, tenant.api_key) as client:
            client.submit_feedback("cora", make_user_records("cora", round=1, n_records=10, seed=2))
            job_id = client.train("cora").job.id

            def training() -> bool:
                progress = client.get_job(job_id).progress
                return progress is not None and progress.step >= 1

            wait_for("the job's first training step", training, timeout=120)
            running = client.get_job(job_id)
            assert running.state == "running" and running.progress is not None
            assert (running.progress.phase, running.progress.total_steps) == ("training", NEVER_ENDS)
            assert set(running.progress.losses) == {"cora"}

            requested = client.cancel_job(job_id)
            assert requested.cancel_requested_at is not None
            job = client.wait_for_job(job_id, timeout=120, poll=0.2)
            assert (job.state, job.cancelled_by, job.attempts) == ("cancelled", f"api:{tenant.name}", 1)
            assert job.progress is not None and job.progress.step < NEVER_ENDS
            assert client.list_versions("cora", "personal") == []
            assert client.ready().workers == "running"  # the actor stopped the job, not itself
    finally:
        server.stop()
        _never_left_running(library, job_id)
    assert count_rows(library.db, SqlAdapterVersion, SqlAdapterVersion.job_id == job_id) == 0
