"""Entry points for the command line and ``services/scheduler``: each opens the configured database, does
one thing through the library, and closes it again; ``lorafleet workers`` (``workers_command``) runs trainer
actors on Ray until it is stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

from lorafleet.config import Settings, load_settings
from lorafleet.domain import AdapterVersion, Job
from lorafleet.errors import JobError, ValidationError
from lorafleet.jobs.queue import JobQueue, SubmitResult
from lorafleet.jobs.scheduler import Scheduler, SchedulerPolicy, TickResult
from lorafleet.runtime.ray_runtime import init_ray
from lorafleet.runtime.trainer_pool import TrainerPool
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.training.config import TrainingConfig

if TYPE_CHECKING:
    from lorafleet.runtime.trainer_pool import TrainerPool

logger = logging.getLogger("lorafleet.workers")

#: job states after which nothing more happens to a job
FINISHED_STATES = ("succeeded", "failed", "cancelled")


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


def train_now(
    settings: Settings, *, tenant: str | int, user: str, training: Mapping[str, Any] | None = None
) -> SubmitResult:
    """Queue a training job for one user now; ``tenant`` is a tenant id (int) or name (str); ``training``:
    the job's overrides on top of the tenant's (a rank above ``LORAFLEET_TRAINER_MAX_RANK`` is refused)."""
    with _database(settings) as db:
        if isinstance(tenant, int):
            tenant_id = tenant
        else:
            tenant_id = TenantRepository(db).get_tenant(name=tenant).id
        scheduler = Scheduler(db, max_rank=settings.trainer_max_rank)
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


def workers_command(args: argparse.Namespace) -> int:
    """``lorafleet workers``: trainer actors on the configured Ray, draining the job queue until SIGTERM or
    SIGINT (a second signal stops at once; a job cut short is retried once its lease expires)."""
    if args.poll_seconds <= 0 or args.grace_seconds < 0:
        raise ValidationError("--poll-seconds must be positive and --grace-seconds not negative")
    settings = load_settings()
    training = _json_object("--training", args.training)
    TrainingConfig.from_mapping(training)  # refuse bad overrides here, not in every actor
    init_ray(settings)  # first: Ray installs its own SIGTERM handler, which the next line replaces
    stop = threading.Event()
    _stop_on_signals(stop)
    logger.info(
        "trainer workers: %d actor(s) on %s, database %s, object store %s, device %s, resource %s",
        args.count,
        f"the Ray cluster at {settings.ray_address}" if settings.ray_address else "a local Ray (loopback)",
        settings.resolved_database_url.split("@")[-1],
        settings.resolved_object_store_url,
        settings.device,
        settings.trainer_resource or "(none)",
    )
    try:
        ran = run_workers(
            settings,
            n_actors=args.count,
            until_idle=args.until_idle,
            stop_event=stop,
            poll_seconds=args.poll_seconds,
            training=training,
            grace_seconds=args.grace_seconds,
            start_timeout=args.start_timeout,
        )
    except KeyboardInterrupt:
        logger.warning("trainer workers stopped at once (jobs cut short are retried after their leases)")
        return 130
    logger.info("trainer workers stopped after %d job(s): %s", len(ran), ran)
    return 0


def _json_object(option: str, text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{option}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValidationError(f"{option}: must be a JSON object")
    return value


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGTERM/SIGINT set ``stop`` (jobs in flight get their grace period); a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handle(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logger.info("signal %d: stopping the trainer workers (send it again to stop at once)", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)


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
    if job.state != "succeeded":
        raise JobError(f"job {job.id} {job.state}: {job.error}")
    return _version_of(settings, job=job, user=user)


def _drain_until_finished(settings: Settings, *, pool: TrainerPool, job_id: int, deadline: float) -> Job:
    """Drain the pool until the job is finished (a retry may wait out its backoff) or the deadline passes."""
    with _database(settings) as db:
        queue = JobQueue(db)
        while True:
            job = queue.get(tenant_id=None, job_id=job_id)
            if job.state in FINISHED_STATES:
                return job
            left = deadline - time.monotonic()
            if left <= 0:
                raise JobError(f"job {job_id} did not finish in time (still {job.state})")
            if not pool.drain(timeout=left):
                time.sleep(min(1.0, max(left, 0.0)))


def _version_of(settings: Settings, *, job: Job, user: str) -> AdapterVersion | None:
    """The version the job's result names for ``user`` (None: the job skipped them)."""
    from lorafleet.registry import Registry
    from lorafleet.store.blob import open_blob_store_from_settings

    entries = [e for e in (job.result or {}).get("versions", []) if e.get("external_id") == user]
    if not entries or job.tenant_id is None:
        return None
    with _database(settings) as db:
        registry = Registry(db, open_blob_store_from_settings(settings))
        return registry.get_version_by_id(tenant_id=job.tenant_id, version_id=int(entries[0]["version_id"]))
