"""Entry points for the command line and ``services/scheduler``: each opens the configured database, does
one thing through the library, and closes it again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lorafleet.config import Settings
from lorafleet.jobs.queue import SubmitResult
from lorafleet.jobs.scheduler import Scheduler, SchedulerPolicy, TickResult
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.tenants import TenantRepository


@contextmanager
def _database(settings: Settings) -> Iterator[Database]:
    db = Database(settings.resolved_database_url)
    try:
        yield db
    finally:
        db.dispose()


def scheduler_tick(settings: Settings, *, policy: SchedulerPolicy | None = None) -> TickResult:
    """Run one scheduler tick against the configured database."""
    with _database(settings) as db:
        return Scheduler(db, policy).tick()


def scheduler_run(
    settings: Settings,
    *,
    interval: float,
    stop_event: threading.Event,
    policy: SchedulerPolicy | None = None,
    on_tick: Callable[[TickResult], None] | None = None,
) -> int:
    """Tick every ``interval`` seconds until ``stop_event`` is set; returns the number of ticks."""
    with _database(settings) as db:
        return Scheduler(db, policy).run_loop(
            interval_seconds=interval, stop_event=stop_event, on_tick=on_tick
        )


def train_now(settings: Settings, *, tenant: str | int, user: str) -> SubmitResult:
    """Queue a training job for one user now; ``tenant`` is a tenant id (int) or name (str)."""
    with _database(settings) as db:
        if isinstance(tenant, int):
            tenant_id = tenant
        else:
            tenant_id = TenantRepository(db).get_tenant(name=tenant).id
        return Scheduler(db).train_now(tenant_id=tenant_id, user_external_id=user)
