"""A generic pull loop over the job queue: claim a job, run its handler under a heartbeated lease, record
the outcome. The Ray trainer actor wraps one of these; nothing here imports torch or ray.

A handler is ``handler(job, lease) -> dict``: the dict becomes the job's result. Long handlers should call
``lease.check()`` between steps: once a heartbeat finds the lease lost (expired and taken over), ``check``
raises ``LeaseLostError`` and the handler must stop without writing anything. A handler that writes rows
(adapter versions) does so inside ``lease.fenced()`` and calls ``succeed`` there, so its writes and the job's
success commit together or not at all (see ``lorafleet.jobs.queue``).

Progress: ``lease.report_phase`` and ``lease.report_step`` (every step is fine: ``lorafleet.jobs.progress``
throttles) store the job's progress through the same fence. Cancel: once a cancel was requested, a heartbeat
or a progress write notices, ``check`` raises ``JobCancelledError`` (a ``LeaseLostError``), fenced writes are
refused, and the worker ends the job ``cancelled`` without a retry, whatever the handler returned.

Failures: ``ValidationError`` (bad input, non-finite tensors), ``TrainingError`` (e.g. a non-finite loss)
and ``NotFoundError`` (the user or adapter is gone) fail the job for good, since retrying cannot help;
any other exception is retried with backoff while attempts remain.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from lorafleet.domain import Job
from lorafleet.errors import (
    InvalidStateError,
    JobCancelledError,
    LeaseLostError,
    LorafleetError,
    NotFoundError,
    TrainingError,
    ValidationError,
)
from lorafleet.jobs.progress import DEFAULT_MIN_INTERVAL, ProgressReporter
from lorafleet.jobs.queue import FencedJob, JobQueue

logger = logging.getLogger(__name__)

#: Exceptions that fail a job without a retry.
NON_RETRYABLE: tuple[type[BaseException], ...] = (ValidationError, TrainingError, NotFoundError)

#: what one ``run_once`` reports of a job it ran (the job, or its id)
_Ran = TypeVar("_Ran")


def run_until_idle(run_once: Callable[[], _Ran | None], *, max_jobs: int | None = None) -> list[_Ran]:
    """Call ``run_once`` (claim and run one job) until it returns None, no job being claimable, or ``max_jobs``
    jobs ran; what each call returned, in order."""
    done: list[_Ran] = []
    while max_jobs is None or len(done) < max_jobs:
        ran = run_once()
        if ran is None:
            break
        done.append(ran)
    return done


class LeaseContext:
    """What a handler knows about its lease: whether it is still held (or the job cancelled), a fenced
    transaction, and where to report progress (``progress_interval``: seconds between progress writes)."""

    def __init__(
        self,
        *,
        queue: JobQueue,
        job: Job,
        worker_id: str,
        progress_interval: float = DEFAULT_MIN_INTERVAL,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.queue = queue
        self.job = job
        self.worker_id = worker_id
        self.completed = False
        self._lost = threading.Event()
        self._cancelled = threading.Event()
        self._reason = ""
        self._progress = ProgressReporter(
            write=self._write_progress, min_interval=progress_interval, clock=monotonic
        )
        #: ``ProgressReporter.step``: step ``step`` of ``total`` is done; written when due (throttled). Raises
        #: like ``check`` when the write finds the job cancelled or the lease lost.
        self.report_step = self._progress.step

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancelled.is_set()

    def mark_lost(self, reason: str) -> None:
        self._reason = reason
        self._lost.set()

    def mark_cancelled(self, reason: str) -> None:
        self._reason = reason
        self._cancelled.set()

    def check(self) -> None:
        """Raise ``JobCancelledError`` once a cancel was seen, ``LeaseLostError`` once the lease was lost."""
        if self._cancelled.is_set():
            raise JobCancelledError(self._reason or f"job {self.job.id}: cancel requested")
        if self._lost.is_set():
            raise LeaseLostError(self._reason or f"job {self.job.id}: lease lost")

    @contextmanager
    def fenced(self) -> Iterator[FencedJob]:
        """``JobQueue.fenced`` for this job and attempt; after a ``succeed`` inside it commits, the worker
        does not complete the job again."""
        self.check()
        with (
            self._noting_cancel(),
            self.queue.fenced(job_id=self.job.id, worker_id=self.worker_id, attempt=self.job.attempts) as f,
        ):
            yield f
        if f.finished is not None:
            self.completed = True

    def report_phase(self, name: str) -> None:
        """The job enters phase ``name`` (``lorafleet.jobs.progress``); written at once."""
        self._progress.phase(name)

    def _write_progress(self, progress: dict[str, Any]) -> None:
        self.check()
        try:
            with self._noting_cancel():
                self.queue.record_progress(
                    job_id=self.job.id, worker_id=self.worker_id, attempt=self.job.attempts, progress=progress
                )
        except LeaseLostError as exc:
            if not self.cancel_requested:
                self.mark_lost(str(exc))
            raise
        except LorafleetError as exc:  # progress is best effort: the database may be briefly away
            logger.warning("job %d: progress not recorded: %s", self.job.id, exc)

    @contextmanager
    def _noting_cancel(self) -> Iterator[None]:
        """Remember a ``JobCancelledError`` that passes through (the worker then ends the job cancelled)."""
        try:
            yield
        except JobCancelledError as exc:
            self.mark_cancelled(str(exc))
            raise


Handler = Callable[[Job, LeaseContext], Mapping[str, Any] | None]


class _Heartbeat:
    """A daemon thread extending the lease every ``every`` seconds until stopped or the lease is lost."""

    def __init__(self, *, context: LeaseContext, lease_seconds: float, every: float) -> None:
        self._context = context
        self._lease_seconds = lease_seconds
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-job-{context.job.id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        ctx = self._context
        while not self._stop.wait(self._every):
            if (
                ctx.completed
            ):  # the handler's fenced transaction ended the job: there is no lease left to extend
                return
            try:
                beat = ctx.queue.heartbeat(
                    job_id=ctx.job.id,
                    worker_id=ctx.worker_id,
                    lease_seconds=self._lease_seconds,
                    attempt=ctx.job.attempts,
                )
            except LeaseLostError as exc:
                if ctx.completed:  # it ended while this beat was on its way: not a lost lease
                    return
                logger.warning("job %d: %s", ctx.job.id, exc)
                ctx.mark_lost(str(exc))
                return
            except LorafleetError as exc:  # e.g. the database is briefly away: try again next beat
                logger.warning("job %d: heartbeat failed: %s", ctx.job.id, exc)
                continue
            if beat.cancel_requested_at is not None and not ctx.cancel_requested:
                logger.info("job %d: cancel requested by %s; stopping", ctx.job.id, beat.cancelled_by)
                ctx.mark_cancelled(f"job {ctx.job.id}: cancel requested by {beat.cancelled_by}")


class JobWorker:
    """Claims jobs of the kinds it has handlers for and runs them one at a time."""

    def __init__(
        self,
        queue: JobQueue,
        *,
        worker_id: str,
        handlers: Mapping[str, Handler],
        lease_seconds: float = 30.0,
        heartbeat_every: float | None = None,
        non_retryable: tuple[type[BaseException], ...] = NON_RETRYABLE,
        progress_interval: float = DEFAULT_MIN_INTERVAL,
    ) -> None:
        if not handlers:
            raise ValidationError("handlers: at least one job kind is needed")
        every = lease_seconds / 3 if heartbeat_every is None else heartbeat_every
        if not 0 < every < lease_seconds:
            raise ValidationError("heartbeat_every: must be positive and shorter than lease_seconds")
        self.queue = queue
        self.worker_id = worker_id
        self.handlers = dict(handlers)
        self.lease_seconds = lease_seconds
        self.heartbeat_every = every
        self.non_retryable = non_retryable
        self.progress_interval = progress_interval

    def run_once(self) -> Job | None:
        """Claim one job and run it to an outcome; the job as it ended up, or None if none was claimable."""
        job = self.queue.claim(
            worker_id=self.worker_id, kinds=list(self.handlers), lease_seconds=self.lease_seconds
        )
        if job is None:
            return None
        context = LeaseContext(
            queue=self.queue, job=job, worker_id=self.worker_id, progress_interval=self.progress_interval
        )
        with _Heartbeat(context=context, lease_seconds=self.lease_seconds, every=self.heartbeat_every):
            result, error = self._run_handler(job, context)
        self._settle(context, result=result, error=error)
        return self.queue.get(tenant_id=None, job_id=job.id)

    def run_until_idle(self, *, max_jobs: int | None = None) -> list[Job]:
        """Run jobs until none is claimable (or ``max_jobs`` ran); the jobs as they ended up."""
        return run_until_idle(self.run_once, max_jobs=max_jobs)

    def _run_handler(self, job: Job, context: LeaseContext) -> tuple[Mapping[str, Any], Exception | None]:
        logger.info(
            "job %d (%s) attempt %d/%d started by %s",
            job.id,
            job.kind,
            job.attempts,
            job.max_attempts,
            self.worker_id,
        )
        try:
            return self.handlers[job.kind](job, context) or {}, None
        except Exception as exc:  # recorded on the job; BaseException (interrupts) leaves it to the lease
            return {}, exc

    def _settle(self, context: LeaseContext, *, result: Mapping[str, Any], error: Exception | None) -> None:
        job = context.job
        if context.completed:
            logger.info("job %d succeeded (completed inside its fenced transaction)", job.id)
            return
        if context.cancel_requested or isinstance(error, JobCancelledError):
            self._cancelled(job)
            return
        if context.lost or isinstance(error, LeaseLostError):
            logger.warning("job %d: lease lost; the handler's outcome is dropped", job.id)
            return
        try:
            if error is None:
                self._complete(job, result)
            else:
                self._fail(job, error)
        except JobCancelledError:  # requested after the handler's last check: its outcome is dropped
            self._cancelled(job)
        except LeaseLostError as exc:
            logger.warning("job %d: %s; the handler's outcome is dropped", job.id, exc)

    def _cancelled(self, job: Job) -> None:
        """End the job cancelled; a lease lost meanwhile leaves that to the next claim."""
        try:
            ended = self.queue.acknowledge_cancel(
                job_id=job.id, worker_id=self.worker_id, attempt=job.attempts
            )
        except (LeaseLostError, InvalidStateError) as exc:
            logger.warning("job %d: not marked cancelled (%s); its lease decides", job.id, exc)
            return
        logger.info("job %d cancelled by %s; nothing was registered", job.id, ended.cancelled_by)

    def _complete(self, job: Job, result: Mapping[str, Any]) -> None:
        try:
            self.queue.complete(job_id=job.id, worker_id=self.worker_id, result=result, attempt=job.attempts)
        except ValidationError as exc:  # the result itself is unusable (not JSON): a bug, not transient
            self._fail(job, exc)
            return
        logger.info("job %d succeeded", job.id)

    def _fail(self, job: Job, error: Exception) -> None:
        retryable = not isinstance(error, self.non_retryable)
        message = f"{type(error).__name__}: {error}"
        ended = self.queue.fail(
            job_id=job.id, worker_id=self.worker_id, error=message, retryable=retryable, attempt=job.attempts
        )
        logger.warning("job %d attempt %d failed (%s); now %s", job.id, job.attempts, message, ended.state)
