"""The continual-learning scheduler: every tick, find the users that are due and queue training jobs.

A user is *due* with at least ``min_new_records`` feedback records newer than their adapters were trained
on, or with any such record that has waited longer than ``max_staleness``. Due users already in a queued or
running job are skipped, and so are users whose last ``failure_threshold`` jobs failed in a row, for a
backoff that doubles with every further failure. The rest are grouped **per tenant** (so every job row
keeps its ``tenant_id`` and stays visible to that tenant; the shared backbone still trains a whole job in
one batch) into jobs of at most ``users_per_job`` users, longest-waiting first, while fewer than
``max_active_jobs`` training jobs are active.

A tick reads, decides and inserts in one transaction under a lock (a PostgreSQL transaction-scoped advisory
lock; SQLite's ``BEGIN IMMEDIATE``), so two schedulers ticking at once never queue the same user twice. The
job's dedupe key (its users and their watermarks) is a second guard.

Every train job's payload carries its effective ``TrainingConfig`` (``payload["training"]``: the defaults, the
scheduler's ``training_defaults``, the tenant's overrides, then the job's own; ``lorafleet.training.overrides``),
resolved in the queuing transaction. A job holds one tenant's users, so tenants' configs never mix.

After every tick, ``run_loop`` runs its ``periodic`` housekeeping: the runtime passes the blob scrub there
(``lorafleet.workflows.blob_verify.BlobScrubber``, budgeted by the ``LORAFLEET_SCRUB_*`` settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import groupby
from typing import Any

from lorafleet.domain import Job, JobKind, SubjectKind
from lorafleet.domain.jobs import TrainPayload, TrainSubject
from lorafleet.domain.subject import Subject
from lorafleet.errors import NotFoundError, ValidationError
from lorafleet.jobs.queue import Clock, JobQueue, SubmitResult
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.feedback import FeedbackBacklog, read_backlog
from lorafleet.store.sql.jobs_repository import FailureStreak, JobsRepository, NewJob
from lorafleet.store.sql.models import utcnow
from lorafleet.store.sql.tenants import TenantRepository, validate_external_id
from lorafleet.training.overrides import job_training, validate_overrides

logger = logging.getLogger(__name__)

TRAIN_JOB_KIND = JobKind.TRAIN
#: Why a user with new feedback got no job this tick (``invalid_config``: the tenant's stored training config no
#: longer validates; the error is logged).
SKIP_REASONS = ("not_due", "active_job", "backoff", "capacity", "duplicate", "invalid_config")
_BACKLOG_PAGE = 1000


@dataclass(frozen=True)
class SchedulerPolicy:
    """When a user is due, how users are grouped, and how hard to back off from failing users."""

    min_new_records: int = 8
    max_staleness: timedelta = timedelta(hours=1)
    users_per_job: int = 8
    max_active_jobs: int = 4
    #: this many failed jobs in a row (for a user) start a backoff of ``failure_backoff``
    failure_threshold: int = 3
    failure_backoff: timedelta = timedelta(hours=1)
    #: the backoff doubles with each further failure, up to this
    max_failure_backoff: timedelta = timedelta(hours=24)
    #: attempts per job (retries with backoff happen inside one job, see ``JobQueue.fail``)
    max_attempts: int = 3
    #: users with new feedback examined per tick at most (paged, in user id order)
    max_scanned_users: int = 100_000

    def __post_init__(self) -> None:
        _require(self.min_new_records >= 1, "min_new_records: must be at least 1")
        _require(self.max_staleness > timedelta(0), "max_staleness: must be positive")
        _require(1 <= self.users_per_job <= 64, "users_per_job: must be between 1 and 64")
        _require(self.max_active_jobs >= 1, "max_active_jobs: must be at least 1")
        _require(self.failure_threshold >= 1, "failure_threshold: must be at least 1")
        _require(self.failure_backoff > timedelta(0), "failure_backoff: must be positive")
        _require(
            self.max_failure_backoff >= self.failure_backoff,
            "max_failure_backoff: must be at least failure_backoff",
        )
        _require(1 <= self.max_attempts <= 100, "max_attempts: must be between 1 and 100")
        _require(self.max_scanned_users >= 1, "max_scanned_users: must be at least 1")

    def is_due(self, *, new_records: int, oldest_new_at: datetime, now: datetime) -> bool:
        return new_records >= self.min_new_records or now - oldest_new_at >= self.max_staleness

    def backoff_until(self, streak: FailureStreak) -> datetime | None:
        """Until when a user with this failure streak is skipped; None if they are not backed off."""
        if streak.failures < self.failure_threshold:
            return None
        doublings = min(streak.failures - self.failure_threshold, 64)
        seconds = self.failure_backoff.total_seconds() * 2.0**doublings
        return streak.last_failed_at + timedelta(
            seconds=min(seconds, self.max_failure_backoff.total_seconds())
        )

    @property
    def streak_depth(self) -> int:
        """How many of a user's newest finished jobs can change their backoff (more cannot: it is capped)."""
        ratio = self.max_failure_backoff / self.failure_backoff
        return self.failure_threshold + math.ceil(math.log2(ratio)) + 1


def run_periodic(tasks: Sequence[Callable[[], object]], *, stop_event: threading.Event | None = None) -> None:
    """Run each housekeeping task once (skipped once ``stop_event`` is set); a failure is logged, not raised."""
    for task in tasks:
        if stop_event is not None and stop_event.is_set():
            return
        try:
            task()
        except Exception:
            logger.exception(
                "scheduler housekeeping %s failed", getattr(task, "__name__", type(task).__name__)
            )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValidationError(f"SchedulerPolicy.{message}")


@dataclass(frozen=True)
class TickResult:
    """What one tick did: the jobs it queued, how many users were due, and users skipped by reason
    (``SKIP_REASONS``; ``not_due`` counts users with some new feedback that are not due yet)."""

    jobs_created: list[Job]
    due_users: int
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def users_queued(self) -> int:
        return sum(len(job.payload.get("users", [])) for job in self.jobs_created)


@dataclass(frozen=True)
class _Candidate:
    backlog: FeedbackBacklog
    oldest_new_at: datetime

    @property
    def user_id(self) -> int:
        return self.backlog.user_id


def train_dedupe_key(users: Sequence[tuple[int, int]]) -> str:
    """``train:`` + sha256 of the sorted ``(user_id, watermark)`` pairs: the same users at the same data
    are the same work."""
    encoded = json.dumps(sorted([int(u), int(w)] for u, w in users), separators=(",", ":"))
    return "train:" + hashlib.sha256(encoded.encode("ascii")).hexdigest()


def _train_payload(users: Sequence[FeedbackBacklog], *, training: Mapping[str, Any]) -> dict[str, object]:
    """``watermark``: the newest feedback id to train through; ``trained_through_id``: where the
    user's versions stood when the job was queued (None: never trained); ``training``: the job's config."""
    return TrainPayload(
        training=dict(training),
        users=[
            TrainSubject(
                user_id=u.user_id,
                external_id=u.external_id,
                kind=SubjectKind(u.kind),
                watermark=u.last_record_id,
                trained_through_id=u.trained_through_id,
            )
            for u in users
        ],
    ).to_json()


class Scheduler:
    """Turns feedback backlogs into training jobs according to a ``SchedulerPolicy``.

    ``training_defaults``: ``TrainingConfig`` fields under every tenant's overrides (the deployment's defaults);
    ``max_rank``: the trainers' largest rank (``LORAFLEET_TRAINER_MAX_RANK``) when known here, so an on-demand
    job with a higher rank is refused when queued (otherwise its trainer refuses it).
    """

    def __init__(
        self,
        db: Database,
        policy: SchedulerPolicy | None = None,
        *,
        queue: JobQueue | None = None,
        clock: Clock | None = None,
        training_defaults: Mapping[str, Any] | None = None,
        max_rank: int | None = None,
    ) -> None:
        self.db = db
        self.policy = policy or SchedulerPolicy()
        self.queue = queue or JobQueue(db, clock=clock or utcnow)
        self.clock = clock or self.queue.clock
        self._repo = JobsRepository(dialect=db.dialect)
        self.max_rank = max_rank
        self.training_defaults = validate_overrides(
            training_defaults, field="training_defaults", max_rank=max_rank
        )

    # --- one tick -----------------------------------------------------------------------------------------
    def tick(self) -> TickResult:
        """Queue jobs for the users due now; safe to run from several processes at once."""
        skipped: Counter[str] = Counter()
        with self.db.unit_of_work():
            self.db.run(self._repo.lock_scheduler)
            now = self.clock()  # after the lock: a tick that waited for another decides on fresh time
            due = self._due(now=now, skipped=skipped)
            ready = self._ready(due=due, now=now, skipped=skipped)
            groups = self._groups(ready=ready, skipped=skipped)
            created = self._insert(groups=groups, now=now, skipped=skipped)
        return TickResult(jobs_created=created, due_users=len(due), skipped=dict(+skipped))

    def _backlog(self) -> list[FeedbackBacklog]:
        """Every user with at least one new record, paged by user id (up to ``max_scanned_users``)."""
        found: list[FeedbackBacklog] = []
        after: int | None = None
        while len(found) < self.policy.max_scanned_users:
            page = self.db.run(read_backlog, min_new_records=1, limit=_BACKLOG_PAGE, after_user_id=after)
            found.extend(page)
            if len(page) < _BACKLOG_PAGE:
                break
            after = page[-1].user_id
        return found[: self.policy.max_scanned_users]

    def _due(self, *, now: datetime, skipped: Counter[str]) -> list[_Candidate]:
        backlog = self._backlog()
        through = {b.user_id: b.trained_through_id for b in backlog}
        oldest = self.db.run(self._repo.oldest_new_feedback_at, trained_through=through)
        due: list[_Candidate] = []
        for entry in backlog:
            at = oldest.get(entry.user_id)
            if at is not None and self.policy.is_due(
                new_records=entry.new_records, oldest_new_at=at, now=now
            ):
                due.append(_Candidate(backlog=entry, oldest_new_at=at))
            else:
                skipped["not_due"] += 1
        return due

    def _ready(self, *, due: list[_Candidate], now: datetime, skipped: Counter[str]) -> list[_Candidate]:
        """Due users minus those in an active job and those backed off after repeated failures."""
        active = self.db.run(self._repo.active_user_ids)
        free = [c for c in due if c.user_id not in active]
        skipped["active_job"] += len(due) - len(free)
        streaks = self.db.run(
            self._repo.failure_streaks,
            user_ids=[c.user_id for c in free],
            kind=TRAIN_JOB_KIND,
            depth=self.policy.streak_depth,
        )
        ready = [c for c in free if not self._backed_off(streaks.get(c.user_id), now=now)]
        skipped["backoff"] += len(free) - len(ready)
        return ready

    def _backed_off(self, streak: FailureStreak | None, *, now: datetime) -> bool:
        until = None if streak is None else self.policy.backoff_until(streak)
        return until is not None and now < until

    def _groups(self, *, ready: list[_Candidate], skipped: Counter[str]) -> list[list[_Candidate]]:
        """Per tenant, longest-waiting first, chunks of ``users_per_job``; the longest-waiting chunks get
        the free capacity (``max_active_jobs`` minus active training jobs)."""
        size = self.policy.users_per_job
        by_tenant = sorted(ready, key=lambda c: (c.backlog.tenant_id, c.oldest_new_at, c.user_id))
        groups: list[list[_Candidate]] = []
        for _tenant, members in groupby(by_tenant, key=lambda c: c.backlog.tenant_id):
            users = list(members)
            groups.extend(users[i : i + size] for i in range(0, len(users), size))
        groups.sort(key=lambda g: (g[0].oldest_new_at, g[0].user_id))
        active = self.db.run(self._repo.count_active, kind=TRAIN_JOB_KIND)
        capacity = max(self.policy.max_active_jobs - active, 0)
        skipped["capacity"] += sum(len(g) for g in groups[capacity:])
        return groups[:capacity]

    def _insert(self, *, groups: list[list[_Candidate]], now: datetime, skipped: Counter[str]) -> list[Job]:
        created: list[Job] = []
        configs: dict[int, dict[str, Any] | None] = {}
        for group in groups:
            tenant_id = group[0].backlog.tenant_id
            if tenant_id not in configs:
                configs[tenant_id] = self._tenant_training(tenant_id=tenant_id)
            training = configs[tenant_id]
            if training is None:
                skipped["invalid_config"] += len(group)
                continue
            new = self._new_job([c.backlog for c in group], training=training)
            job, is_new = self.db.run(self._repo.insert_job, new=new, now=now)
            if is_new:
                created.append(job)
            else:
                skipped["duplicate"] += len(group)
        return created

    def _tenant_training(self, *, tenant_id: int) -> dict[str, Any] | None:
        """The tenant's effective config for this tick's jobs; None (logged) when its stored overrides no longer
        validate, so one tenant's bad row does not stop the tick for the others."""
        try:
            return job_training(self.db, tenant_id=tenant_id, defaults=self.training_defaults)
        except ValidationError as exc:
            logger.error(
                "tenant %d: training config is invalid, its users are not queued: %s", tenant_id, exc
            )
            return None

    def _new_job(self, group: Sequence[FeedbackBacklog], *, training: Mapping[str, Any]) -> NewJob:
        """One tenant's users at their current watermarks, with the tenant's effective training config."""
        users = [(u.user_id, u.last_record_id) for u in group]
        return self.queue.new_job(
            tenant_id=group[0].tenant_id,
            kind=TRAIN_JOB_KIND,
            payload=_train_payload(group, training=training),
            user_ids=users,
            dedupe_key=train_dedupe_key(users),
            max_attempts=self.policy.max_attempts,
        )

    # --- one user, now ------------------------------------------------------------------------------------
    def train_now(
        self, *, tenant_id: int, user_external_id: str, training: Mapping[str, Any] | None = None
    ) -> SubmitResult:
        """Queue a job for one user at their current watermark, ignoring due-ness, capacity and backoff.

        The user needs feedback newer than their last version (a user with no version yet: any feedback),
        else ValidationError; an unknown user is NotFoundError. A user already in an active job gets that
        job back (``created=False``, with that job's config): a user is never in two active jobs.
        ``training``: this job's ``TrainingConfig`` overrides, on top of the tenant's (errors name
        ``training.<field>``).
        """
        external_id = validate_external_id(user_external_id)
        return self._train_subject_now(
            tenant_id=tenant_id, external_id=external_id, kind=SubjectKind.USER, training=training
        )

    def train_task_now(
        self, *, tenant_id: int, task_name: str, training: Mapping[str, Any] | None = None
    ) -> SubmitResult:
        """``train_now`` for a shared task's dataset (``lorafleet.workflows.tasks``): same rules, the task's feedback."""
        return self._train_subject_now(
            tenant_id=tenant_id,
            external_id=Subject.task(task_name).external_id,
            kind=SubjectKind.TASK,
            training=training,
        )

    def _train_subject_now(
        self, *, tenant_id: int, external_id: str, kind: SubjectKind, training: Mapping[str, Any] | None
    ) -> SubmitResult:
        overrides = validate_overrides(training, field="training", max_rank=self.max_rank)
        with self.db.unit_of_work():
            self.db.run(self._repo.lock_scheduler)
            user = TenantRepository(self.db).find_subject(
                tenant_id=tenant_id, external_id=external_id, kind=kind
            )
            if user is None:
                name = Subject.from_row(kind, external_id).name
                problem = (
                    f"user {name!r} not found"
                    if kind == SubjectKind.USER
                    else f"task {name!r} has no feedback"
                )
                raise NotFoundError(problem)
            active = self.db.run(self._repo.active_job_for_user, user_id=user.id)
            if active is not None:
                return SubmitResult(job=active, created=False)
            entry = self._user_backlog(tenant_id=tenant_id, user_id=user.id)
            config = job_training(
                self.db,
                tenant_id=tenant_id,
                defaults=self.training_defaults,
                job=overrides,
                max_rank=self.max_rank,
            )
            new = self._new_job([entry], training=config)
            job, created = self.db.run(self._repo.insert_job, new=new, now=self.clock())
            return SubmitResult(job=job, created=created)

    def _user_backlog(self, *, tenant_id: int, user_id: int) -> FeedbackBacklog:
        page = self.db.run(read_backlog, tenant_id=tenant_id, limit=1, after_user_id=user_id - 1)
        if not page or page[0].user_id != user_id:
            raise ValidationError("no feedback newer than the last version: nothing to train on")
        return page[0]

    # --- the loop -----------------------------------------------------------------------------------------
    def run_loop(
        self,
        *,
        interval_seconds: float,
        stop_event: threading.Event,
        on_tick: Callable[[TickResult], None] | None = None,
        periodic: Sequence[Callable[[], object]] = (),
    ) -> int:
        """Tick every ``interval_seconds`` until ``stop_event`` is set; returns the number of ticks. A tick
        that fails is logged and the loop goes on (the database may be back by the next one).

        ``periodic``: housekeeping run after every tick, each within its own budget (the blob scrub,
        ``lorafleet.workflows.blob_verify.BlobScrubber``, is composed in by the runtime); one that fails is logged
        and neither the tick nor the others are affected."""
        if interval_seconds <= 0:
            raise ValidationError("interval_seconds: must be positive")
        ticks = 0
        while not stop_event.is_set():
            self._tick_and_log(on_tick=on_tick)
            run_periodic(periodic, stop_event=stop_event)
            ticks += 1
            stop_event.wait(interval_seconds)
        return ticks

    def _tick_and_log(self, *, on_tick: Callable[[TickResult], None] | None) -> None:
        started = time.monotonic()
        try:
            result = self.tick()
        except Exception:
            logger.exception("scheduler tick failed")
            return
        logger.info(
            "scheduler tick: due=%d created=%d jobs (%d users) skipped=%s in %.2fs",
            result.due_users,
            len(result.jobs_created),
            result.users_queued,
            dict(sorted(result.skipped.items())),
            time.monotonic() - started,
        )
        if on_tick is not None:
            on_tick(result)
