"""What the command line and ``services/scheduler`` run: each opens the configured platform
(``lorafleet.platform.Platform``), does one thing through the library, and closes it again; ``run_workers``
runs trainer actors on Ray (``lorafleet workers`` is ``lorafleet.entrypoints.workers``). The scheduler's ticks are
followed by its housekeeping (``scheduler_housekeeping``: the blob scrub and the blob gc).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from lorafleet.config import Settings
from lorafleet.domain import FINISHED_JOB_STATES, AdapterVersion, Job, JobState
from lorafleet.errors import JobError
from lorafleet.jobs.queue import SubmitResult
from lorafleet.jobs.scheduler import Scheduler, SchedulerPolicy, TickResult, run_periodic
from lorafleet.platform import Platform
from lorafleet.registry.gc import PeriodicGc
from lorafleet.runtime.trainer_pool import TrainerPool
from lorafleet.workflows.blob_verify import BlobScrubber

logger = logging.getLogger("lorafleet.workers")


def scheduler_housekeeping(platform: Platform) -> list[Callable[[], object]]:
    """What the scheduler runs after each tick, as its settings ask: the blob scrub (``LORAFLEET_SCRUB_*``; none
    when its budget is 0) and the blob gc (``LORAFLEET_BLOB_GC_INTERVAL_SECONDS``; none when 0)."""
    scrub = BlobScrubber.from_settings(
        platform.settings, platform.db, lambda: platform.registry, queue=platform.queue
    )
    gc = PeriodicGc(
        lambda: platform.registry.gc(), interval_seconds=platform.settings.blob_gc_interval_seconds
    )
    return [task for task in (scrub, gc) if task.enabled]


def scheduler_tick(settings: Settings, *, policy: SchedulerPolicy | None = None) -> TickResult:
    """Run one scheduler tick against the configured database, then its housekeeping once (the blob scrub)."""
    with Platform.from_settings(settings) as platform:
        result = Scheduler(platform.db, policy).tick()
        run_periodic(scheduler_housekeeping(platform))
        return result


def scheduler_run(
    settings: Settings,
    *,
    interval: float,
    stop_event: threading.Event,
    policy: SchedulerPolicy | None = None,
    on_tick: Callable[[TickResult], None] | None = None,
) -> int:
    """Tick every ``interval`` seconds until ``stop_event`` is set, each tick followed by the housekeeping
    (``scheduler_housekeeping``); returns the number of ticks."""
    with Platform.from_settings(settings) as platform:
        return Scheduler(platform.db, policy).run_loop(
            interval_seconds=interval,
            stop_event=stop_event,
            on_tick=on_tick,
            periodic=scheduler_housekeeping(platform),
        )


def train_now(
    settings: Settings, *, tenant: str | int, user: str, training: Mapping[str, Any] | None = None
) -> SubmitResult:
    """Queue a training job for one user now; ``tenant`` is a tenant id (int) or name (str); ``training``:
    the job's overrides on top of the tenant's (a rank above ``LORAFLEET_TRAINER_MAX_RANK`` is refused)."""
    with Platform.from_settings(settings) as platform:
        if isinstance(tenant, int):
            tenant_id = tenant
        else:
            tenant_id = platform.tenants.get_tenant(name=tenant).id
        scheduler = Scheduler(platform.db, max_rank=settings.trainer_max_rank)
        return scheduler.train_now(tenant_id=tenant_id, user_external_id=user, training=training)


def run_workers(
    settings: Settings,
    *,
    n_actors: int = 1,
    until_idle: bool = True,
    stop_event: threading.Event | None = None,
    poll_seconds: float = 5.0,
    training: Mapping[str, Any] | None = None,
    grace_seconds: float = 20.0,
    start_timeout: float | None = None,
) -> list[int]:
    """Start ``n_actors`` trainer actors on Ray (local on loopback, or ``LORAFLEET_RAY_ADDRESS``) and run
    jobs: until none is claimable (``until_idle``), or else until ``stop_event`` is set, each actor polling
    the queue every ``poll_seconds`` when idle and a dead actor replaced (``TrainerPool.run_until_stopped``).
    Returns the ids of the jobs run; the actors are stopped at the end."""
    if until_idle:
        with TrainerPool(settings, n_actors=n_actors, training=training, start_timeout=start_timeout) as pool:
            return pool.drain()
    stop = stop_event or threading.Event()
    with TrainerPool(settings, n_actors=n_actors, training=training, wait_ready=False) as pool:
        return pool.run_until_stopped(
            stop, poll_seconds=poll_seconds, grace_seconds=grace_seconds, start_timeout=start_timeout
        )


def train_user_now_and_wait(
    settings: Settings,
    *,
    tenant: str | int,
    user: str,
    timeout: float,
    pool: TrainerPool | None = None,
    training: Mapping[str, Any] | None = None,
) -> AdapterVersion | None:
    """Queue a job for one user (``train_now``, with ``training`` as the job's overrides), run it on trainer
    actors (``pool``, or a new one-actor pool) and return the version it registered; None when the job skipped
    the user (nothing new to train on). A job that fails, or does not finish within ``timeout`` seconds, raises
    ``JobError``."""
    submitted = train_now(settings, tenant=tenant, user=user, training=training)
    deadline = time.monotonic() + timeout
    if pool is not None:
        job = _drain_until_finished(settings, pool=pool, job_id=submitted.job.id, deadline=deadline)
    else:
        with TrainerPool(settings, training=training) as own:
            job = _drain_until_finished(settings, pool=own, job_id=submitted.job.id, deadline=deadline)
    if job.state != JobState.SUCCEEDED:
        raise JobError(f"job {job.id} {job.state}: {job.error}")
    return _version_of(settings, job=job, user=user)


def _drain_until_finished(settings: Settings, *, pool: TrainerPool, job_id: int, deadline: float) -> Job:
    """Drain the pool until the job is finished (a retry may wait out its backoff) or the deadline passes."""
    with Platform.from_settings(settings) as platform:
        queue = platform.queue
        while True:
            job = queue.get(tenant_id=None, job_id=job_id)
            if job.state in FINISHED_JOB_STATES:
                return job
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobError(f"job {job_id} did not finish in time (still {job.state})")
            if not pool.drain(timeout=left):
                time.sleep(min(1.0, max(left, 0.0)))


def _version_of(settings: Settings, *, job: Job, user: str) -> AdapterVersion | None:
    """The version the job's result names for ``user`` (None: the job skipped them)."""
    entries = [e for e in (job.result or {}).get("versions", []) if e.get("external_id") == user]
    if not entries or job.tenant_id is None:
        return None
    with Platform.from_settings(settings) as platform:
        return platform.registry.get_version_by_id(
            tenant_id=job.tenant_id, version_id=int(entries[0]["version_id"])
        )
