"""Training through the API on a real local Ray: the server runs a trainer actor (``ApiOptions.run_workers``,
as ``lorafleet serve`` does). Train -> wait_for_job -> the version with its metrics and lineage -> promote and
roll back through the API -> generation follows the live version. And a restart of the service mid-job: the
job is taken over after its lease and completes once, and every feedback record (and idempotency key) is there.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from api_helpers import ADMIN_KEY, AWS_TEST_ENV, TINY_TRAINING, ApiServer, Library, count_rows
from services.api.app import create_app
from services.api.runtime import ApiOptions
from tests.polling import wait_for

from conftest import SERVING_OPTIONS
from lorafleet.config import Settings
from lorafleet.jobs import JobQueue
from lorafleet.sdk import Client
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlAdapterVersion, SqlJob
from lorafleet.training.synthetic import make_user_records


def _options(**training: Any) -> ApiOptions:
    return replace(
        SERVING_OPTIONS,
        run_workers=1,
        training={**TINY_TRAINING, **training},
        worker_env=AWS_TEST_ENV,
        worker_poll_seconds=0.5,
    )


@contextmanager
def _server(settings: Settings, options: ApiOptions) -> Iterator[ApiServer]:
    server = ApiServer(create_app(settings, options=options)).start()
    try:
        yield server
    finally:
        if server.thread.is_alive():
            server.stop()


def _tenant_key(server: ApiServer) -> str:
    with Client(server.url, ADMIN_KEY) as admin:
        return admin.create_tenant(f"tenant-{uuid.uuid4().hex[:10]}").api_key


def test_train_then_promote_and_rollback_and_generation_follows_the_live_version(
    api_ray: str, make_api_settings: Callable[..., Settings]
) -> None:
    with (
        _server(make_api_settings(), _options()) as server,
        Client(server.url, _tenant_key(server)) as client,
    ):
        records = make_user_records("rosa", round=1, n_records=12, seed=0)
        ids = client.submit_feedback("rosa", records).ids
        submitted = client.train("rosa")
        assert submitted.created and submitted.job.users == ["rosa"]
        assert client.train("rosa").job.id == submitted.job.id  # one active job per user

        job = client.wait_for_job(submitted.job.id, timeout=300, poll=0.5)
        assert job.state == "succeeded", job.error
        assert [j.id for j in client.list_jobs(user="rosa")] == [job.id]

        (version,) = client.list_versions("rosa", "personal")
        assert (version.number, version.status, version.job_id) == (1, "candidate", job.id)
        assert version.metrics["train_loss"] > 0 and "holdout_loss_after" in version.metrics
        assert client.list_adapters("rosa")[0].live_version is None
        lineage = client.lineage("rosa", "personal", 1)
        assert lineage.root.job is not None and lineage.root.job.id == job.id
        snapshot = lineage.root.dataset_snapshot
        assert snapshot is not None and (snapshot.min_record_id, snapshot.max_record_id) == (
            min(ids),
            max(ids),
        )

        assert client.generate("rosa", "Hello", max_tokens=3).versions == {}  # a candidate serves nobody
        client.promote("rosa", "personal", 1, reason="looks good")
        assert client.generate("rosa", "Hello", max_tokens=3).versions == {"personal": 1}
        assert client.list_adapters("rosa")[0].live_version == 1
        client.rollback("rosa", "personal", None, reason="not yet")
        assert client.generate("rosa", "Hello", max_tokens=3).served_by == []
        assert client.ready().workers == "running"


def test_a_restart_mid_job_loses_nothing(
    api_ray: str, make_api_settings: Callable[..., Settings], library: Library
) -> None:
    settings = make_api_settings(lease_seconds=4.0)
    first_batch = make_user_records("sam", round=1, n_records=10, seed=1)
    second_batch = make_user_records("sam", round=2, n_records=6, seed=1)
    queue = JobQueue(library.db)
    with _server(settings, _options(max_steps=100_000)) as before:  # never finishes: stopped mid-job
        key = _tenant_key(before)
        with Client(before.url, key) as client:
            first = client.submit_feedback("sam", first_batch, idempotency_key="batch-1")
            second = client.submit_feedback("sam", second_batch, idempotency_key="batch-2")
            job_id = client.train("sam").job.id
            wait_for(
                "the trainer actor to take the job",
                lambda: client.get_job(job_id).state == "running",
                timeout=120,
            )
        before.stop()
    assert (
        queue.get(tenant_id=None, job_id=job_id).state == "running"
    )  # its worker is gone, its lease not yet
    # as if queued before jobs carried their config: the next server's trainer runs it with its own short one
    _forget_training_config(library.db, job_id)

    with _server(settings, _options()) as after, Client(after.url, key) as client:
        replayed = client.submit_feedback("sam", first_batch, idempotency_key="batch-1")
        assert replayed == first  # the key outlived the restart: the first answer, nothing new
        job = client.wait_for_job(job_id, timeout=300, poll=0.5)
        assert (job.state, job.attempts) == ("succeeded", 2), job.error
        assert [r.id for r in client.list_feedback("sam")] == first.ids + second.ids
        (version,) = client.list_versions("sam", "personal")
        assert version.job_id == job_id
    assert count_rows(library.db, SqlAdapterVersion, SqlAdapterVersion.job_id == job_id) == 1


def test_a_tenants_config_and_a_jobs_own_reach_the_trainer_actor(
    api_ray: str, make_api_settings: Callable[..., Settings]
) -> None:
    with (
        _server(make_api_settings(), _options(max_steps=6)) as server,
        Client(server.url, _tenant_key(server)) as client,
    ):
        assert client.get_training_config().effective.max_steps == 6  # the server's defaults
        client.set_training_config({"max_steps": 3, "rank": 2, "learning_rate": 1e-3})
        client.submit_feedback("tia", make_user_records("tia", round=1, n_records=10, seed=0))
        first = client.wait_for_job(client.train("tia").job.id, timeout=300, poll=0.5)
        assert first.state == "succeeded", first.error
        client.submit_feedback("tia", make_user_records("tia", round=2, n_records=6, seed=0))
        second = client.wait_for_job(
            client.train("tia", training={"max_steps": 2}).job.id, timeout=300, poll=0.5
        )
        assert second.state == "succeeded", second.error

        v1, v2 = client.list_versions("tia", "personal")
        assert (v1.metrics["steps"], v2.metrics["steps"]) == (3, 2)
        shown = second.training
        assert shown is not None and (shown.max_steps, shown.rank, shown.learning_rate) == (2, 2, 1e-3)
        assert client.get_version("tia", "personal", 1).training_config["rank"] == 2


def _forget_training_config(db: Database, job_id: int) -> None:
    """Make the job one queued before jobs carried their config (trainers then use their own default)."""
    with db.session() as session:
        row = session.get(SqlJob, job_id)
        assert row is not None
        row.payload = {k: v for k, v in row.payload.items() if k != "training"}
