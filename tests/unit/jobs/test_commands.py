"""The functions the CLI and ``services/scheduler`` call, against the configured database."""

from __future__ import annotations

import threading

import pytest

from lorafleet.config import load_settings
from lorafleet.errors import NotFoundError
from lorafleet.jobs.scheduler import SchedulerPolicy
from lorafleet.runtime.job_commands import scheduler_run, scheduler_tick, train_now
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.workflows.feedback import ingest_feedback


def test_tick_run_and_train_now_use_the_configured_database(database_url: str) -> None:
    db = Database(database_url)
    tenant = TenantRepository(db).create_tenant(name="acme")[0]
    for user in ("alice", "bob"):
        records = [{"kind": "sft", "prompt": f"{user} {i}", "completion": "c"} for i in range(2)]
        ingest_feedback(db, tenant_id=tenant.id, user_external_id=user, records=records)
    db.dispose()
    settings = load_settings(database_url=database_url)

    queued = train_now(settings, tenant="acme", user="alice")
    assert queued.created and queued.job.tenant_id == tenant.id
    assert not train_now(settings, tenant=tenant.id, user="alice").created
    with pytest.raises(NotFoundError):
        train_now(settings, tenant="nope", user="alice")

    result = scheduler_tick(settings, policy=SchedulerPolicy(min_new_records=2))
    assert [u["external_id"] for j in result.jobs_created for u in j.payload["users"]] == ["bob"]
    assert result.skipped == {"active_job": 1}

    stop = threading.Event()
    ticks = scheduler_run(settings, interval=0.01, stop_event=stop, on_tick=lambda _result: stop.set())
    assert ticks == 1
