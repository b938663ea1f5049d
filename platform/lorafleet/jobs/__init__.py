"""Jobs: the queue (rows with leases, dedupe and retries), the scheduler policy and a generic worker loop.

Nothing here imports torch or ray; the Ray trainer actor wraps ``JobWorker`` and registers a ``train``
handler.

Its room (docs/architecture.md): the job machinery between the ML layer and the workflows: the queue, the
lease-fenced worker loop and the scheduler's policy. Job handlers (what a ``train``, ``qa`` or ``import`` job
does) are workflows; Ray actors are runtime.
"""

from lorafleet.jobs.queue import FencedJob, JobQueue, RetryBackoff, SubmitResult
from lorafleet.jobs.scheduler import (
    SKIP_REASONS,
    TRAIN_JOB_KIND,
    Scheduler,
    SchedulerPolicy,
    TickResult,
    train_dedupe_key,
)
from lorafleet.jobs.worker import NON_RETRYABLE, JobWorker, LeaseContext

__all__ = [
    "NON_RETRYABLE",
    "SKIP_REASONS",
    "TRAIN_JOB_KIND",
    "FencedJob",
    "JobQueue",
    "JobWorker",
    "LeaseContext",
    "RetryBackoff",
    "Scheduler",
    "SchedulerPolicy",
    "SubmitResult",
    "TickResult",
    "train_dedupe_key",
]
