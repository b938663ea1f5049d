"""When QA runs: ``qa`` jobs on the same job table (leases, retries, dedupe) as training. Torch-free.

- A **candidate** is registered: ``submit_candidate_qa`` in the registering transaction (the train job's
  fenced transaction when ``promote_rule = "qa"``), dedupe key ``qa:<version id>``; payload ``{"version_id"}``.
- A **bank changes**: its users' live personal adapters are rechecked, one job per adapter, dedupe key
  ``qa-recheck:<adapter id>`` (a queued recheck already covers a later change: it reads the bank when it runs);
  payload ``{"recheck": {"adapter_id", "cause"}}``. Triggered by:

  * QA promoting a shared task adapter's candidate (``QARunner``, inside its fenced transaction), and anyone
    else who moves a task adapter's ``live`` alias: call ``on_task_adapter_changed``;
  * enrolling a user in a task adapter, or removing them from one: call ``enrol_and_recheck`` /
    ``unenrol_and_recheck`` instead of ``routing.enrol`` / ``routing.unenrol`` (the API's routes do), or
    ``on_bank_changed`` after it.

- **Serving saw NaN or infinite logits** from a user's experts (``on_nonfinite_output``, which the services hand to
  the engine): the user's live personal adapter is rechecked, with the task member that served the row as the
  one QA blames first; a user served by task adapters alone has those tasks' enrolled users rechecked.

QA jobs list no users in ``job_users``, so a pending QA job never holds back a user's next training job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lorafleet.domain import Job, JobKind
from lorafleet.domain.jobs import QAPayload
from lorafleet.jobs.queue import JobQueue
from lorafleet.routing.experts import enrol, resolve_user_experts, unenrol
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.qa_repository import QARepository

if TYPE_CHECKING:
    from lorafleet.routing.experts import Enrolment, Expert, ExpertSet

QA_JOB_KIND = JobKind.QA
QA_MAX_ATTEMPTS = 3


def candidate_dedupe_key(version_id: int) -> str:
    return f"qa:{version_id}"


def recheck_dedupe_key(adapter_id: int) -> str:
    return f"qa-recheck:{adapter_id}"


def _submit_qa(queue: JobQueue, *, tenant_id: int, payload: QAPayload, dedupe_key: str) -> Job:
    """Queue one QA job (an active job with the same dedupe key is returned instead), in the open transaction."""
    return queue.submit(
        tenant_id=tenant_id,
        kind=QA_JOB_KIND,
        payload=payload.to_json(),
        dedupe_key=dedupe_key,
        max_attempts=QA_MAX_ATTEMPTS,
    ).job


def submit_candidate_qa(*, queue: JobQueue, tenant_id: int, version_id: int) -> Job:
    """Queue QA of a candidate, in the caller's transaction when one is open (an active job for it is returned
    instead)."""
    return _submit_qa(
        queue,
        tenant_id=tenant_id,
        payload=QAPayload.candidate(version_id),
        dedupe_key=candidate_dedupe_key(version_id),
    )


def submit_rechecks(
    *,
    queue: JobQueue,
    tenant_id: int,
    user_ids: Sequence[int],
    cause: str,
    changed_adapter_id: int | None = None,
) -> list[Job]:
    """Queue a recheck of every live personal adapter of ``user_ids``, in one transaction (the caller's when one
    is open). ``changed_adapter_id``: the task adapter that changed the banks (QA blames it first if a bank
    fails)."""
    repo = QARepository(dialect=queue.db.dialect)
    with queue.db.unit_of_work():
        adapters = queue.db.run(repo.live_personal_adapters, tenant_id=tenant_id, user_ids=list(user_ids))
        return [
            _submit_qa(
                queue,
                tenant_id=tenant_id,
                payload=QAPayload.recheck_of(
                    adapter_id, cause=cause[:500], changed_adapter_id=changed_adapter_id
                ),
                dedupe_key=recheck_dedupe_key(adapter_id),
            )
            for adapter_id, _user in adapters
        ]


def submit_task_rechecks(*, queue: JobQueue, tenant_id: int, adapter_id: int, cause: str) -> list[Job]:
    """Recheck the users enrolled in a task adapter (its live version changed), in one transaction (the caller's
    when one is open)."""
    repo = QARepository(dialect=queue.db.dialect)
    with queue.db.unit_of_work():
        users = queue.db.run(repo.enrolled_user_ids, tenant_id=tenant_id, adapter_id=adapter_id)
        return submit_rechecks(
            queue=queue, tenant_id=tenant_id, user_ids=users, cause=cause, changed_adapter_id=adapter_id
        )


def on_bank_changed(
    db: Database,
    queue: JobQueue | None = None,
    *,
    tenant_id: int,
    user_ids: Sequence[int],
    cause: str,
    changed_adapter_id: int | None = None,
) -> list[Job]:
    """The banks of ``user_ids`` changed: queue rechecks of their live personal adapters (one transaction)."""
    return submit_rechecks(
        queue=queue or JobQueue(db),
        tenant_id=tenant_id,
        user_ids=user_ids,
        cause=cause,
        changed_adapter_id=changed_adapter_id,
    )


def on_task_adapter_changed(
    db: Database, queue: JobQueue | None = None, *, tenant_id: int, adapter_id: int, cause: str
) -> list[Job]:
    """A task adapter's live version moved: queue rechecks for every user enrolled in it (one transaction)."""
    return submit_task_rechecks(
        queue=queue or JobQueue(db), tenant_id=tenant_id, adapter_id=adapter_id, cause=cause
    )


def enrol_and_recheck(
    db: Database, *, tenant_id: int, user_external_id: str, task_name: str, actor: str
) -> tuple[Enrolment, list[Job]]:
    """``routing.enrol`` followed by a recheck of the user's live adapters in their grown bank."""
    enrolment = enrol(
        db, tenant_id=tenant_id, user_external_id=user_external_id, task_name=task_name, actor=actor
    )
    jobs = on_bank_changed(
        db,
        tenant_id=tenant_id,
        user_ids=[enrolment.user_id],
        cause=f"enrolled in task adapter {task_name!r}",
        changed_adapter_id=enrolment.adapter_id,
    )
    return enrolment, jobs


def unenrol_and_recheck(
    db: Database, *, tenant_id: int, user_external_id: str, task_name: str, actor: str
) -> list[Job]:
    """``routing.unenrol`` followed by a recheck of the user's live adapters in their smaller bank (a personal
    adapter that relied on the task's help may now do worse than the base)."""
    unenrol(db, tenant_id=tenant_id, user_external_id=user_external_id, task_name=task_name, actor=actor)
    user_id = resolve_user_experts(db, tenant_id=tenant_id, user_external_id=user_external_id).user_id
    if user_id is None:  # cannot happen: unenrol found the user
        return []
    cause = f"unenrolled from task adapter {task_name!r}"
    return on_bank_changed(db, tenant_id=tenant_id, user_ids=[user_id], cause=cause)


__all__ = [
    "QA_JOB_KIND",
    "candidate_dedupe_key",
    "enrol_and_recheck",
    "on_bank_changed",
    "on_task_adapter_changed",
    "recheck_dedupe_key",
    "unenrol_and_recheck",
    "submit_candidate_qa",
    "submit_rechecks",
    "submit_task_rechecks",
]


def on_nonfinite_output(
    db: Database, queue: JobQueue | None = None, *, bank: ExpertSet, members: Sequence[Expert]
) -> list[Job]:
    """Serving decoded NaN or infinite logits for a request of ``bank``'s user through ``members``: queue the
    rechecks that will find and act on the broken version (the ``finite-outputs`` rule), in one transaction."""
    queue = queue or JobQueue(db)
    served = ", ".join(f"{m.adapter_name} v{m.version_number}" for m in members)
    cause = f"serving: non-finite logits through {served}"
    tasks = [m for m in members if m.kind == "task"]
    personal = [m for m in members if m.kind != "task"]
    with db.unit_of_work():
        if personal and bank.user_id is not None:
            return submit_rechecks(
                queue=queue,
                tenant_id=bank.tenant_id,
                user_ids=[bank.user_id],
                cause=cause,
                changed_adapter_id=tasks[0].adapter_id if tasks else None,
            )
        jobs: list[Job] = []
        for task in tasks:
            jobs += submit_task_rechecks(
                queue=queue, tenant_id=bank.tenant_id, adapter_id=task.adapter_id, cause=cause
            )
        return jobs
