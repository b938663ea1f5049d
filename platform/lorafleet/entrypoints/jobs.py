"""``lorafleet jobs watch`` and ``lorafleet jobs cancel``: a job's progress as a bar, and cancelling a job.

Like the other admin commands they use the library directly on the configured database (they run where the
database is), scoped to one tenant by name: another tenant's job is "not found", as through the API.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from tqdm import tqdm

from lorafleet.domain import FINISHED_JOB_STATES, Job, JobState
from lorafleet.errors import JobError, ValidationError
from lorafleet.jobs.queue import JobQueue
from lorafleet.platform import Platform


@contextmanager
def _tenant_queue(tenant: str) -> Iterator[tuple[JobQueue, int]]:
    """The job queue on the configured database and the id of the tenant named ``tenant``."""
    with Platform.from_settings() as platform:
        yield platform.queue, platform.tenants.get_tenant(name=tenant).id


def jobs_watch(args: argparse.Namespace) -> int:
    """Show the job's progress until it finishes; exit 0 if it succeeded, 1 if it failed or was cancelled."""
    if args.poll <= 0 or args.timeout < 0:
        raise ValidationError("--poll must be positive and --timeout not negative")
    with _tenant_queue(args.tenant) as (queue, tenant_id):
        bar = ProgressBar(job_id=args.job_id)
        try:
            job = watch_job(
                queue,
                tenant_id=tenant_id,
                job_id=args.job_id,
                poll=args.poll,
                timeout=args.timeout or None,
                on_change=bar.show,
            )
        finally:
            bar.close()
    print(final_line(job))
    return 0 if job.state == JobState.SUCCEEDED else 1


def jobs_cancel(args: argparse.Namespace) -> int:
    """Cancel the job (``--actor`` is recorded as ``cancelled_by``); a finished one is an error (exit 2)."""
    with _tenant_queue(args.tenant) as (queue, tenant_id):
        job = queue.cancel(tenant_id=tenant_id, job_id=args.job_id, actor=args.actor)
    if job.state == JobState.CANCELLED:
        print(f"job {job.id} cancelled (by {job.cancelled_by})")
    else:
        print(f"job {job.id} {job.state}: cancel requested by {job.cancelled_by}; it stops at its next step")
    return 0


def watch_job(
    queue: JobQueue,
    *,
    tenant_id: int,
    job_id: int,
    poll: float,
    timeout: float | None,
    on_change: Callable[[Job], None],
    sleep: Callable[[float], None] = time.sleep,
) -> Job:
    """Poll the job every ``poll`` seconds until it finishes, calling ``on_change`` whenever its state or
    progress changed; ``JobError`` when ``timeout`` seconds pass first (None: no limit)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    last: tuple[str, Any] | None = None
    while True:
        job = queue.get(tenant_id=tenant_id, job_id=job_id)
        if (job.state, job.progress) != last:
            last = (job.state, job.progress)
            on_change(job)
        if job.state in FINISHED_JOB_STATES:
            return job
        if deadline is not None and time.monotonic() >= deadline:
            raise JobError(f"job {job_id} did not finish within {timeout:g} s (still {job.state})")
        sleep(poll)


class ProgressBar:
    """A tqdm bar of a job's training steps, with its state, phase, mean loss and ETA after it."""

    def __init__(self, *, job_id: int, file: IO[str] | None = None) -> None:
        self._bar: tqdm[Any] = tqdm(
            total=None, desc=f"job {job_id}", unit="step", file=file or sys.stderr, dynamic_ncols=True
        )

    def show(self, job: Job) -> None:
        progress = job.progress or {}
        total = progress.get("total_steps")
        if isinstance(total, int) and total != self._bar.total:
            self._bar.total = total
        self._bar.n = int(progress.get("step") or 0)
        self._bar.set_postfix_str(_postfix(job.state, progress))

    def close(self) -> None:
        self._bar.close()


def _postfix(state: str, progress: dict[str, Any]) -> str:
    parts = [state]
    if progress.get("phase"):
        parts.append(str(progress["phase"]))
    if isinstance(progress.get("loss"), int | float):
        parts.append(f"loss {progress['loss']:.4f}")
    if isinstance(progress.get("eta_seconds"), int | float) and state == JobState.RUNNING:
        parts.append(f"eta {progress['eta_seconds']:.0f}s")
    return ", ".join(parts)


def final_line(job: Job) -> str:
    """How the job ended, in one line (with each subject's last loss when it reported any)."""
    losses = (job.progress or {}).get("losses") or {}
    last = ", ".join(f"{k} {v:.4f}" for k, v in losses.items() if isinstance(v, int | float))
    tail = f" (last losses: {last})" if last else ""
    if job.state == JobState.SUCCEEDED:
        versions = (job.result or {}).get("versions")
        count = f": {len(versions)} version(s)" if isinstance(versions, list) else ""
        return f"job {job.id} succeeded{count}{tail}"
    if job.state == JobState.CANCELLED:
        return f"job {job.id} cancelled by {job.cancelled_by or 'unknown'}{tail}"
    return f"job {job.id} {job.state}: {job.error}{tail}"
