"""SQL side of the job queue and the scheduler: job rows, their users, leases and the queries behind them.

Every method runs inside a session the caller (``lorafleet.jobs``) opened with ``Database.session()``, so
the scheduler can read, decide and insert in one transaction. ORM rows never leave this module; methods
return the frozen ``lorafleet.domain.Job``.

Concurrency: on PostgreSQL a claim is ``SELECT ... FOR UPDATE SKIP LOCKED``, a lease check is
``SELECT ... FOR UPDATE`` and the scheduler serialises on a transaction-scoped advisory lock. On SQLite every
transaction starts with ``BEGIN IMMEDIATE`` (see ``database.py``), which serialises writers the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, or_, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lorafleet.domain import Job, JobState
from lorafleet.errors import JobCancelledError, JobFinishedError, LeaseLostError, NotFoundError, StoreError
from lorafleet.store.sql.models import (
    ACTIVE_JOB_STATES,
    SqlFeedback,
    SqlJob,
    SqlJobUser,
    SqlUser,
)
from lorafleet.store.sql.rows import DialectRepository, chunks, from_row

#: PostgreSQL advisory-lock key held (per transaction) while a scheduler reads, decides and inserts jobs.
SCHEDULER_LOCK_KEY = 0x6C6F7261_73636801
#: ``(user_id, since)`` pairs per query: two bound parameters each, well under every backend's limit.
_PAIR_CHUNK = 250
#: How many expired, exhausted jobs one claim may fail on its way to a claimable one.
_MAX_EXHAUSTED_PER_CLAIM = 100
#: A submit that lost a dedupe race re-reads the winner; if the winner already finished, it tries again.
_SUBMIT_TRIES = 3


@dataclass(frozen=True)
class NewJob:
    """A job about to be inserted; ``users`` are ``(user_id, watermark)`` pairs written to ``job_users``."""

    tenant_id: int | None
    kind: str
    payload: dict[str, Any]
    users: tuple[tuple[int, int], ...]
    dedupe_key: str | None
    max_attempts: int


@dataclass(frozen=True)
class FailureStreak:
    """A user's consecutive failed jobs (newest first, up to the last success) and when the newest ended."""

    failures: int
    last_failed_at: datetime


def to_job(row: SqlJob) -> Job:
    return from_row(
        Job,
        row,
        payload=dict(row.payload or {}),
        result=None if row.result is None else dict(row.result),
        progress=None if row.progress is None else dict(row.progress),
    )


def lease_problem(row: SqlJob, *, worker_id: str, now: datetime, attempt: int | None) -> str | None:
    """Why ``worker_id`` does not hold the lease on ``row`` now, or None when it does.

    A lease is held while the job is running, owned by the worker, not expired, and (when the caller
    passes the attempt it claimed) not re-claimed since: the attempt number is the fencing token.
    """
    if row.state != JobState.RUNNING:
        return f"job is {row.state}"
    if row.lease_owner != worker_id:
        return f"lease is held by {row.lease_owner!r}"
    if attempt is not None and row.attempts != attempt:
        return f"attempt {attempt} was superseded by attempt {row.attempts}"
    if row.lease_expires_at is None or row.lease_expires_at <= now:
        return f"lease expired at {row.lease_expires_at}"
    return None


class JobsRepository(DialectRepository):
    """SQL for jobs; stateless apart from the dialect (row locks and advisory locks differ)."""

    # --- submit -------------------------------------------------------------------------------------------
    def active_by_dedupe_key(self, session: Session, *, dedupe_key: str) -> Job | None:
        row = session.scalar(
            select(SqlJob).where(SqlJob.dedupe_key == dedupe_key, SqlJob.state.in_(ACTIVE_JOB_STATES))
        )
        return None if row is None else to_job(row)

    def insert_job(self, session: Session, *, new: NewJob, now: datetime) -> tuple[Job, bool]:
        """Insert the job and its users unless an active job has the same dedupe key; ``(job, created)``.

        The insert runs in a savepoint: losing a race on the partial unique index (a concurrent submit
        committed first; PostgreSQL makes this insert wait for it) rolls back only the savepoint, and the
        winner is read back under READ COMMITTED.
        """
        self._require_users(session, user_ids=[user_id for user_id, _ in new.users])
        for attempt in range(1, _SUBMIT_TRIES + 1):
            if new.dedupe_key is not None:
                existing = self.active_by_dedupe_key(session, dedupe_key=new.dedupe_key)
                if existing is not None:
                    return existing, False
            try:
                with session.begin_nested():
                    return self._insert(session, new=new, now=now), True
            except IntegrityError:
                # the next round reads the winner; any other integrity error repeats and is re-raised
                if new.dedupe_key is None or attempt == _SUBMIT_TRIES:
                    raise
        raise StoreError("unreachable: the last submit attempt returns or raises")

    def _require_users(self, session: Session, *, user_ids: Sequence[int]) -> None:
        found: set[int] = set()
        for chunk in chunks(sorted(set(user_ids))):
            found.update(session.scalars(select(SqlUser.id).where(SqlUser.id.in_(list(chunk)))))
        missing = sorted(set(user_ids) - found)
        if missing:
            raise NotFoundError(f"user {missing[0]} not found")

    def _insert(self, session: Session, *, new: NewJob, now: datetime) -> Job:
        row = SqlJob(
            tenant_id=new.tenant_id,
            kind=new.kind,
            state=JobState.QUEUED,
            payload=new.payload,
            dedupe_key=new.dedupe_key,
            attempts=0,
            max_attempts=new.max_attempts,
            created_at=now,
        )
        session.add(row)
        session.flush()
        session.add_all(SqlJobUser(job_id=row.id, user_id=u, watermark=w) for u, w in new.users)
        session.flush()
        return to_job(row)

    # --- claim and leases ---------------------------------------------------------------------------------
    def _claimable(self, *, kinds: Sequence[str] | None, now: datetime) -> Select[SqlJob]:
        due = or_(
            and_(SqlJob.state == JobState.QUEUED, or_(SqlJob.run_after.is_(None), SqlJob.run_after <= now)),
            and_(SqlJob.state == JobState.RUNNING, SqlJob.lease_expires_at <= now),
        )
        query = select(SqlJob).where(due)
        if kinds is not None:
            query = query.where(SqlJob.kind.in_(list(kinds)))
        # SKIP LOCKED: concurrent claimers each take a different row instead of queueing on one
        return query.order_by(SqlJob.id).limit(1).with_for_update(skip_locked=True)

    def claim(
        self,
        session: Session,
        *,
        worker_id: str,
        kinds: Sequence[str] | None,
        lease: timedelta,
        now: datetime,
    ) -> Job | None:
        """Take the oldest claimable job: queued and due, or running with an expired lease (a takeover,
        which fences the previous owner out). An expired job out of attempts is failed and skipped."""
        for _ in range(_MAX_EXHAUSTED_PER_CLAIM):
            row = session.scalars(self._claimable(kinds=kinds, now=now)).first()
            if row is None:
                return None
            if row.state == JobState.RUNNING and row.cancel_requested_at is not None:
                self._cancelled(row, now=now)  # its worker is gone before it could stop: nothing to take over
                session.flush()
                continue
            if row.state == JobState.RUNNING and row.attempts >= row.max_attempts:
                self._finish(
                    row, state=JobState.FAILED, now=now, error=f"lease expired after {row.attempts} attempts"
                )
                session.flush()
                continue
            self._take(row, worker_id=worker_id, lease=lease, now=now)
            session.flush()
            return to_job(row)
        return None

    def _take(self, row: SqlJob, *, worker_id: str, lease: timedelta, now: datetime) -> None:
        if row.state == JobState.RUNNING:
            row.error = f"lease of {row.lease_owner!r} expired at {row.lease_expires_at}; taken over"
        row.state = JobState.RUNNING
        row.lease_owner = worker_id
        row.lease_expires_at = now + lease
        row.heartbeat_at = now
        row.started_at = now
        row.run_after = None
        row.attempts += 1

    def _locked_row(self, session: Session, *, job_id: int, tenant_id: int | None = None) -> SqlJob:
        """The job row under a row lock (PostgreSQL ``FOR UPDATE``; SQLite holds the write lock already)."""
        query = select(SqlJob).where(SqlJob.id == job_id).with_for_update()
        if tenant_id is not None:
            query = query.where(SqlJob.tenant_id == tenant_id)
        row = session.scalar(query.execution_options(populate_existing=True))
        if row is None:
            raise NotFoundError(f"job {job_id} not found")
        return row

    def lock_owned(
        self,
        session: Session,
        *,
        job_id: int,
        worker_id: str,
        now: datetime,
        attempt: int | None,
        allow_cancel_requested: bool = False,
    ) -> Job:
        """Lock the job's row and check ``worker_id`` holds its lease; LeaseLostError otherwise, and
        JobCancelledError once a cancel was requested (unless ``allow_cancel_requested``: heartbeats, and the
        worker ending the job cancelled). The lock lasts until the transaction ends, so nobody can take the
        job over (or request a cancel) while the caller writes."""
        row = self._locked_row(session, job_id=job_id)
        problem = lease_problem(row, worker_id=worker_id, now=now, attempt=attempt)
        if problem is not None:
            raise LeaseLostError(f"job {job_id}: {problem}; worker {worker_id!r} must stop")
        if row.cancel_requested_at is not None and not allow_cancel_requested:
            raise JobCancelledError(
                f"job {job_id}: cancel requested by {row.cancelled_by}; worker {worker_id!r} must stop"
            )
        return to_job(row)

    def extend_lease(self, session: Session, *, job_id: int, lease: timedelta, now: datetime) -> Job:
        row = self._locked_row(session, job_id=job_id)
        row.lease_expires_at = now + lease
        row.heartbeat_at = now
        session.flush()
        return to_job(row)

    def succeed(self, session: Session, *, job_id: int, result: dict[str, Any], now: datetime) -> Job:
        row = self._locked_row(session, job_id=job_id)
        row.result = result
        row.error = None
        self._finish(row, state=JobState.SUCCEEDED, now=now)
        session.flush()
        return to_job(row)

    def fail(self, session: Session, *, job_id: int, error: str, now: datetime) -> Job:
        row = self._locked_row(session, job_id=job_id)
        self._finish(row, state=JobState.FAILED, now=now, error=error)
        session.flush()
        return to_job(row)

    def release_leases_of(self, session: Session, *, worker_id: str, reason: str, now: datetime) -> list[int]:
        """End now the unexpired leases of ``worker_id`` (a worker known to be dead): its running jobs become
        claimable at once instead of when their leases run out. The takeover still fences the old owner out (a
        claim moves ``lease_owner``), so a worker wrongly thought dead cannot finish a job taken from it."""
        rows = session.scalars(
            select(SqlJob)
            .where(
                SqlJob.state == JobState.RUNNING,
                SqlJob.lease_owner == worker_id,
                SqlJob.lease_expires_at > now,
            )
            .with_for_update()
        ).all()
        for row in rows:
            row.lease_expires_at = now
            row.error = reason
        session.flush()
        return [row.id for row in rows]

    def requeue(self, session: Session, *, job_id: int, error: str, run_after: datetime) -> Job:
        """Back to queued after a failed attempt; claimable again from ``run_after``."""
        row = self._locked_row(session, job_id=job_id)
        row.state = JobState.QUEUED
        row.error = error
        row.run_after = run_after
        row.lease_expires_at = None
        session.flush()
        return to_job(row)

    def request_cancel(
        self, session: Session, *, tenant_id: int | None, job_id: int, actor: str, now: datetime
    ) -> Job:
        """A queued job (or a running one whose lease expired) is cancelled at once; a running one gets a
        cancel request its worker acts on at its next step. Repeats change nothing; a finished job is
        JobFinishedError."""
        row = self._locked_row(session, job_id=job_id, tenant_id=tenant_id)
        if row.state == JobState.CANCELLED:
            return to_job(row)
        if row.state not in ACTIVE_JOB_STATES:
            raise JobFinishedError(
                f"job {job_id} is {row.state}: only a queued or running job can be cancelled", state=row.state
            )
        if row.cancel_requested_at is None:
            row.cancel_requested_at, row.cancelled_by = now, actor
        if row.state == JobState.QUEUED or row.lease_expires_at is None or row.lease_expires_at <= now:
            self._cancelled(row, now=now)
        session.flush()
        return to_job(row)

    def finish_cancelled(self, session: Session, *, job_id: int, now: datetime) -> Job:
        """End a job ``cancelled`` (its worker stopped for a cancel request; the caller checked the lease)."""
        row = self._locked_row(session, job_id=job_id)
        self._cancelled(row, now=now)
        session.flush()
        return to_job(row)

    def set_progress(self, session: Session, *, job_id: int, progress: dict[str, Any]) -> Job:
        """Store the running job's progress (the caller checked the lease: ``lock_owned``, which also raises
        JobCancelledError once a cancel was requested: the report is how a training loop hears of it between
        heartbeats)."""
        row = self._locked_row(session, job_id=job_id)
        row.progress = progress
        session.flush()
        return to_job(row)

    def _cancelled(self, row: SqlJob, *, now: datetime) -> None:
        if row.cancel_requested_at is None:
            row.cancel_requested_at = now
        self._finish(
            row, state=JobState.CANCELLED, now=now, error=f"cancelled by {row.cancelled_by or 'unknown'}"
        )

    @staticmethod
    def _finish(row: SqlJob, *, state: JobState, now: datetime, error: str | None = None) -> None:
        """A terminal state; ``lease_owner`` is kept as the record of who ran it last."""
        row.state = state
        row.finished_at = now
        row.lease_expires_at = None
        if error is not None:
            row.error = error

    # --- reads --------------------------------------------------------------------------------------------
    def get(self, session: Session, *, tenant_id: int | None, job_id: int) -> Job:
        row = session.get(SqlJob, job_id)
        if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
            raise NotFoundError(f"job {job_id} not found")
        return to_job(row)

    def list_jobs(
        self,
        session: Session,
        *,
        tenant_id: int | None,
        user_external_id: str | None,
        state: str | None,
        limit: int,
    ) -> list[Job]:
        """Newest first; with ``user_external_id``, the jobs that train that user of the tenant."""
        query = select(SqlJob)
        if tenant_id is not None:
            query = query.where(SqlJob.tenant_id == tenant_id)
        if user_external_id is not None:
            users = select(SqlJobUser.job_id).join(SqlUser, SqlUser.id == SqlJobUser.user_id)
            users = users.where(SqlUser.external_id == user_external_id, SqlUser.tenant_id == tenant_id)
            query = query.where(SqlJob.id.in_(users))
        if state is not None:
            query = query.where(SqlJob.state == state)
        return [to_job(row) for row in session.scalars(query.order_by(SqlJob.id.desc()).limit(limit))]

    def job_user_ids(self, session: Session, *, job_id: int) -> dict[int, int]:
        """``user_id → watermark`` of the job's users."""
        rows = session.execute(
            select(SqlJobUser.user_id, SqlJobUser.watermark).where(SqlJobUser.job_id == job_id)
        )
        return {user_id: watermark for user_id, watermark in rows}

    def counts_by_state(self, session: Session) -> dict[str, int]:
        rows = session.execute(select(SqlJob.state, func.count()).group_by(SqlJob.state))
        return {state: count for state, count in rows}

    # --- what the scheduler asks --------------------------------------------------------------------------
    def lock_scheduler(self, session: Session) -> None:
        """Serialise schedulers for the rest of this transaction: a PostgreSQL transaction-level advisory
        lock; on SQLite the first statement starts the ``BEGIN IMMEDIATE`` that holds the write lock."""
        if self._postgres:
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEDULER_LOCK_KEY})
        else:
            session.execute(text("SELECT 1"))

    def active_user_ids(self, session: Session, *, tenant_id: int | None = None) -> set[int]:
        """Users in a queued or running job (of any tenant unless ``tenant_id``)."""
        query = (
            select(SqlJobUser.user_id)
            .join(SqlJob, SqlJob.id == SqlJobUser.job_id)
            .where(SqlJob.state.in_(ACTIVE_JOB_STATES))
            .distinct()
        )
        if tenant_id is not None:
            query = query.join(SqlUser, SqlUser.id == SqlJobUser.user_id).where(
                SqlUser.tenant_id == tenant_id
            )
        return set(session.scalars(query))

    def active_job_for_user(self, session: Session, *, user_id: int) -> Job | None:
        query = (
            select(SqlJob)
            .join(SqlJobUser, SqlJobUser.job_id == SqlJob.id)
            .where(SqlJobUser.user_id == user_id, SqlJob.state.in_(ACTIVE_JOB_STATES))
            .order_by(SqlJob.id)
        )
        row = session.scalars(query).first()
        return None if row is None else to_job(row)

    def count_active(self, session: Session, *, kind: str) -> int:
        query = select(func.count()).where(SqlJob.kind == kind, SqlJob.state.in_(ACTIVE_JOB_STATES))
        return int(session.scalar(query) or 0)

    def failure_streaks(
        self, session: Session, *, user_ids: Sequence[int], kind: str, depth: int
    ) -> dict[int, FailureStreak]:
        """Per user with at least one: how many of their newest finished ``kind`` jobs (at most ``depth``)
        failed in a row, and when the newest failure ended. Cancelled jobs neither count nor reset."""
        streaks: dict[int, FailureStreak] = {}
        for chunk in chunks(sorted(set(user_ids))):
            for user_id, outcomes in self._recent_outcomes(session, user_ids=chunk, kind=kind, depth=depth):
                streak = _streak(outcomes)
                if streak is not None:
                    streaks[user_id] = streak
        return streaks

    def _recent_outcomes(
        self, session: Session, *, user_ids: Sequence[int], kind: str, depth: int
    ) -> Iterator[tuple[int, list[tuple[str, datetime]]]]:
        rank = func.row_number().over(partition_by=SqlJobUser.user_id, order_by=SqlJob.id.desc())
        recent = (
            select(SqlJobUser.user_id, SqlJob.state, SqlJob.finished_at, rank.label("rank"))
            .join(SqlJob, SqlJob.id == SqlJobUser.job_id)
            .where(
                SqlJobUser.user_id.in_(list(user_ids)),
                SqlJob.kind == kind,
                SqlJob.state.in_((JobState.FAILED, JobState.SUCCEEDED)),
            )
            .subquery()
        )
        query = select(recent.c.user_id, recent.c.state, recent.c.finished_at).where(recent.c.rank <= depth)
        by_user: dict[int, list[tuple[str, datetime]]] = {}
        for user_id, state, finished_at in session.execute(query.order_by(recent.c.user_id, recent.c.rank)):
            by_user.setdefault(user_id, []).append((state, finished_at))
        yield from by_user.items()

    def oldest_new_feedback_at(
        self, session: Session, *, trained_through: Mapping[int, int | None]
    ) -> dict[int, datetime]:
        """Per user: when their oldest record newer than ``trained_through[user]`` (None: any) arrived."""
        found: dict[int, datetime] = {}
        for chunk in chunks(sorted(trained_through.items()), _PAIR_CHUNK):
            newer = or_(*(and_(SqlFeedback.user_id == u, SqlFeedback.id > (t or 0)) for u, t in chunk))
            query = select(SqlFeedback.user_id, func.min(SqlFeedback.created_at)).where(newer)
            for user_id, oldest in session.execute(query.group_by(SqlFeedback.user_id)):
                found[user_id] = oldest
        return found


def _streak(outcomes: Sequence[tuple[str, datetime]]) -> FailureStreak | None:
    """Leading failures of a newest-first list of (state, finished_at)."""
    failures = 0
    for state, _finished_at in outcomes:
        if state != JobState.FAILED:
            break
        failures += 1
    if failures == 0:
        return None
    return FailureStreak(failures=failures, last_failed_at=outcomes[0][1])
