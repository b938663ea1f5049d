"""The job queue: jobs are rows, claimed under a lease that a worker keeps alive with heartbeats.

States: ``queued → running → succeeded | failed | cancelled``; a failed attempt with attempts left goes
back to ``queued`` with ``run_after`` set by exponential backoff. A worker that stops heartbeating loses its
lease when it expires, and the next ``claim`` takes the job over (a new attempt). From then on the old
worker is *fenced out*: its ``heartbeat``, ``complete`` and ``fail`` raise ``LeaseLostError``.

Cancel: a queued job is cancelled at once; a running one gets ``cancel_requested_at``, after which its
worker's fenced writes (progress, results) raise ``JobCancelledError``, its heartbeats report the request,
and the worker ends the job ``cancelled`` (``acknowledge_cancel``); it is never retried. A cancelled job whose
worker died is ended by the next ``claim``.

At most one result per job: whatever a job produces (adapter versions) must be written in the same
transaction that marks it succeeded, inside ``JobQueue.fenced``, which row-locks the job and checks the
lease first. A stale or re-run worker then either fails that check and writes nothing, or wins it and
nobody else can; a crash half-way rolls the whole transaction back and leaves no version behind::

    with queue.fenced(job_id=job.id, worker_id=me, attempt=job.attempts) as fence:
        registry.register_version(..., job_id=job.id)  # joins the fenced transaction
        fence.succeed({"versions": [...]})

Timestamps come from ``clock`` (the workers' and schedulers' clocks should agree within a small fraction
of the lease; NTP does that).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from lorafleet.domain import Job
from lorafleet.errors import InvalidStateError, ValidationError
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.jobs_repository import JobsRepository, NewJob
from lorafleet.store.sql.models import JOB_STATES, utcnow
from lorafleet.store.sql.tenants import check_page

Clock = Callable[[], datetime]

MAX_KIND_LENGTH = 32
MAX_ACTOR_LENGTH = 256
MAX_DEDUPE_KEY_LENGTH = 256
MAX_WORKER_ID_LENGTH = 128
MAX_ATTEMPTS_LIMIT = 100
MAX_LEASE_SECONDS = 24 * 3600.0


@dataclass(frozen=True)
class RetryBackoff:
    """Delay before attempt ``n + 1`` after attempt ``n`` failed: ``base * 2 ** (n - 1)``, capped."""

    base_seconds: float = 30.0
    max_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 <= self.base_seconds <= self.max_seconds:
            raise ValidationError("RetryBackoff: need 0 <= base_seconds <= max_seconds")

    def delay(self, *, attempts: int) -> timedelta:
        exponent = min(max(attempts - 1, 0), 62)  # 2**62 seconds already exceeds any cap
        return timedelta(seconds=min(self.base_seconds * 2**exponent, self.max_seconds))


@dataclass(frozen=True)
class SubmitResult:
    """The job, and whether this call created it (False: an active job with the same dedupe key)."""

    job: Job
    created: bool


class FencedJob:
    """An open transaction (``Database.unit_of_work``) in which this worker's lease on ``job`` is verified and
    the job's row is locked.

    Every store call made inside the ``with`` block on this thread (the registry's, the queue's, a
    repository's through ``Database.run``) joins it; write the job's output that way and call ``succeed`` (or
    ``fail``): all of it commits together when the block ends, or none of it does. ``now`` is the time the
    lease was checked at.
    """

    def __init__(self, *, db: Database, job: Job, repo: JobsRepository, now: datetime) -> None:
        self.job = job
        self.now = now
        self.finished: Job | None = None
        self._db = db
        self._repo = repo

    def succeed(self, result: Mapping[str, Any]) -> Job:
        payload = _json_object("result", result)
        self.finished = self._db.run(self._repo.succeed, job_id=self.job.id, result=payload, now=self.now)
        return self.finished

    def fail(self, error: str) -> Job:
        """Fail for good (no retry), in this transaction."""
        self.finished = self._db.run(self._repo.fail, job_id=self.job.id, error=error, now=self.now)
        return self.finished


def _json_object(what: str, value: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON object (string keys, JSON-encodable values, no NaN); stored as given."""
    if not isinstance(value, Mapping):
        raise ValidationError(f"{what}: must be a JSON object")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{what}: not encodable as JSON: {exc}") from None
    return dict(value)


def _check_text(what: str, value: object, *, max_length: int) -> str:
    if not isinstance(value, str) or not value or len(value) > max_length or not value.isprintable():
        raise ValidationError(f"{what}: must be a printable string of 1 to {max_length} characters")
    return value


def _check_lease(lease_seconds: float) -> timedelta:
    if not 0 < lease_seconds <= MAX_LEASE_SECONDS:
        raise ValidationError(f"lease_seconds: must be in (0, {MAX_LEASE_SECONDS:g}]")
    return timedelta(seconds=lease_seconds)


def _check_users(user_ids: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    pairs = tuple((int(user_id), int(watermark)) for user_id, watermark in user_ids)
    if len({user_id for user_id, _ in pairs}) != len(pairs):
        raise ValidationError("user_ids: a user may appear once per job")
    return pairs


class JobQueue:
    """Submit, claim, heartbeat, complete, fail and cancel jobs; each call is one transaction, or joins the
    transaction open on this thread (``Database.unit_of_work``): a workflow queues a job together with its
    other writes that way."""

    def __init__(self, db: Database, *, clock: Clock = utcnow, backoff: RetryBackoff | None = None) -> None:
        self.db = db
        self.clock = clock
        self.backoff = backoff or RetryBackoff()
        self._repo = JobsRepository(dialect=db.dialect)

    def submit(
        self,
        *,
        tenant_id: int | None,
        kind: str,
        payload: Mapping[str, Any],
        user_ids: Sequence[tuple[int, int]] = (),
        dedupe_key: str | None,
        max_attempts: int = 3,
    ) -> SubmitResult:
        """Queue a job for ``user_ids`` (``(user_id, watermark)`` pairs); if an active job has the same
        ``dedupe_key``, return that one instead (race-safe: the partial unique index decides). Inside an open
        transaction, the job commits with it."""
        new = self.new_job(
            tenant_id=tenant_id,
            kind=kind,
            payload=payload,
            user_ids=user_ids,
            dedupe_key=dedupe_key,
            max_attempts=max_attempts,
        )
        job, created = self.db.run(self._repo.insert_job, new=new, now=self.clock())
        return SubmitResult(job=job, created=created)

    def new_job(
        self,
        *,
        tenant_id: int | None,
        kind: str,
        payload: Mapping[str, Any],
        user_ids: Sequence[tuple[int, int]],
        dedupe_key: str | None,
        max_attempts: int,
    ) -> NewJob:
        """Validate a submission without writing it."""
        if dedupe_key is not None:
            _check_text("dedupe_key", dedupe_key, max_length=MAX_DEDUPE_KEY_LENGTH)
        if not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValidationError(f"max_attempts: must be between 1 and {MAX_ATTEMPTS_LIMIT}")
        return NewJob(
            tenant_id=tenant_id,
            kind=_check_text("kind", kind, max_length=MAX_KIND_LENGTH),
            payload=_json_object("payload", payload),
            users=_check_users(user_ids),
            dedupe_key=dedupe_key,
            max_attempts=max_attempts,
        )

    def claim(
        self, *, worker_id: str, kinds: Sequence[str] | None = None, lease_seconds: float
    ) -> Job | None:
        """The oldest claimable job, now running under ``worker_id``'s lease; None if there is none."""
        _check_text("worker_id", worker_id, max_length=MAX_WORKER_ID_LENGTH)
        lease = _check_lease(lease_seconds)
        if kinds is not None and not kinds:
            raise ValidationError("kinds: pass None for every kind, or at least one kind")
        return self.db.run(self._repo.claim, worker_id=worker_id, kinds=kinds, lease=lease, now=self.clock())

    def heartbeat(
        self, *, job_id: int, worker_id: str, lease_seconds: float, attempt: int | None = None
    ) -> Job:
        """Extend the lease to ``now + lease_seconds``; LeaseLostError if the caller no longer holds it. The
        job returned carries ``cancel_requested_at``: the lease is kept while the worker stops."""
        lease = _check_lease(lease_seconds)
        with self._fence(
            job_id=job_id, worker_id=worker_id, attempt=attempt, allow_cancel_requested=True
        ) as fence:
            return self.db.run(self._repo.extend_lease, job_id=job_id, lease=lease, now=fence.now)

    def record_progress(
        self, *, job_id: int, worker_id: str, attempt: int | None, progress: Mapping[str, Any]
    ) -> Job:
        """Store the running job's progress (``updated_at`` added) through the lease fence: LeaseLostError
        when the caller lost the lease, JobCancelledError once a cancel was requested."""
        payload = _json_object("progress", progress)
        with self._fence(job_id=job_id, worker_id=worker_id, attempt=attempt) as fence:
            payload["updated_at"] = fence.now.isoformat()
            return self.db.run(self._repo.set_progress, job_id=job_id, progress=payload)

    @contextmanager
    def fenced(self, *, job_id: int, worker_id: str, attempt: int | None = None) -> Iterator[FencedJob]:
        """A transaction holding the job's row lock, entered only if ``worker_id`` holds the lease
        (``attempt``, the ``Job.attempts`` it claimed, also fences out its own earlier attempts)."""
        with self._fence(job_id=job_id, worker_id=worker_id, attempt=attempt) as fence:
            yield fence

    def complete(
        self, *, job_id: int, worker_id: str, result: Mapping[str, Any], attempt: int | None = None
    ) -> Job:
        """Mark succeeded with ``result``, only if the caller still holds the lease (LeaseLostError)."""
        payload = _json_object("result", result)
        with self.fenced(job_id=job_id, worker_id=worker_id, attempt=attempt) as fence:
            return fence.succeed(payload)

    def release_leases_of(self, worker_id: str, *, reason: str) -> list[int]:
        """End the leases ``worker_id`` holds (it is known to be dead): its jobs are claimable at once; their ids."""
        return self.db.run(self._repo.release_leases_of, worker_id=worker_id, reason=reason, now=self.clock())

    def fail(
        self,
        *,
        job_id: int,
        worker_id: str,
        error: str,
        retryable: bool = True,
        attempt: int | None = None,
    ) -> Job:
        """Record a failed attempt: back to queued after a backoff while attempts remain and the error is
        retryable, otherwise failed for good; cancelled when a cancel was requested (never retried).
        LeaseLostError if the caller no longer holds the lease."""
        with self._fence(
            job_id=job_id, worker_id=worker_id, attempt=attempt, allow_cancel_requested=True
        ) as fence:
            job = fence.job
            if job.cancel_requested_at is not None:
                return self.db.run(self._repo.finish_cancelled, job_id=job_id, now=fence.now)
            if not retryable or job.attempts >= job.max_attempts:
                return fence.fail(error)
            run_after = fence.now + self.backoff.delay(attempts=job.attempts)
            return self.db.run(self._repo.requeue, job_id=job_id, error=error, run_after=run_after)

    def cancel(self, *, tenant_id: int | None, job_id: int, actor: str) -> Job:
        """Cancel a job for ``actor`` (recorded as ``cancelled_by``): a queued one at once, a running one at
        its worker's next step (the job is returned still running, with ``cancel_requested_at``). Repeats
        return the job unchanged; a succeeded or failed job is JobFinishedError."""
        _check_text("actor", actor, max_length=MAX_ACTOR_LENGTH)
        return self.db.run(
            self._repo.request_cancel, tenant_id=tenant_id, job_id=job_id, actor=actor, now=self.clock()
        )

    def acknowledge_cancel(self, *, job_id: int, worker_id: str, attempt: int | None = None) -> Job:
        """The worker stopped for a cancel request: the job ends ``cancelled``. LeaseLostError if the caller
        no longer holds the lease (the next ``claim`` then ends it)."""
        with self._fence(
            job_id=job_id, worker_id=worker_id, attempt=attempt, allow_cancel_requested=True
        ) as fence:
            if fence.job.cancel_requested_at is None:
                raise InvalidStateError(f"job {job_id}: no cancel was requested")
            return self.db.run(self._repo.finish_cancelled, job_id=job_id, now=fence.now)

    @contextmanager
    def _fence(
        self, *, job_id: int, worker_id: str, attempt: int | None, allow_cancel_requested: bool = False
    ) -> Iterator[FencedJob]:
        """``fenced``, and with ``allow_cancel_requested`` also for a job whose cancel was requested (a
        heartbeat, a failed attempt, the worker ending the job cancelled); otherwise that is JobCancelledError."""
        with self.db.unit_of_work():
            now = self.clock()
            job = self.db.run(
                self._repo.lock_owned,
                job_id=job_id,
                worker_id=worker_id,
                now=now,
                attempt=attempt,
                allow_cancel_requested=allow_cancel_requested,
            )
            yield FencedJob(db=self.db, job=job, repo=self._repo, now=now)

    def get(self, *, tenant_id: int | None, job_id: int) -> Job:
        """The job; NotFoundError if missing or another tenant's (``tenant_id`` None: any, internal use)."""
        return self.db.run(self._repo.get, tenant_id=tenant_id, job_id=job_id)

    def list_jobs(
        self,
        *,
        tenant_id: int | None,
        user_external_id: str | None = None,
        state: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """The tenant's jobs, newest first; optionally only those training one user, or in one state."""
        check_page(limit=limit)
        if state is not None and state not in JOB_STATES:
            raise ValidationError(f"state: must be one of {', '.join(JOB_STATES)}")
        if user_external_id is not None and tenant_id is None:
            raise ValidationError("user_external_id: needs tenant_id (external ids are per tenant)")
        return self.db.run(
            self._repo.list_jobs,
            tenant_id=tenant_id,
            user_external_id=user_external_id,
            state=state,
            limit=limit,
        )

    def job_users(self, *, job_id: int) -> dict[int, int]:
        """``user_id → watermark`` of the users a job trains."""
        return self.db.run(self._repo.job_user_ids, job_id=job_id)

    def active_user_ids(self, *, tenant_id: int | None = None) -> set[int]:
        """Users that are in a queued or running job."""
        return self.db.run(self._repo.active_user_ids, tenant_id=tenant_id)

    def counts_by_state(self) -> dict[str, int]:
        """Jobs per state, every state present (for metrics)."""
        found = self.db.run(self._repo.counts_by_state)
        return {state: found.get(state, 0) for state in JOB_STATES}
