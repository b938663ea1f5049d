"""Shared task adapters: the tenant's adapters without an owner user (``summarize``, ``support-tone``, ``sql``).

A task adapter is not a second system. It is an ``adapters`` row with ``owner_user_id`` NULL, versioned, promoted
and rolled back by the same registry as a user's adapter, and it joins the banks of the users enrolled in it
(``lorafleet.routing.experts``). What makes it a *task* is where its data comes from:

- **Feedback** submitted to the task (``ingest_task_feedback``) is stored under the task's *subject* row: a
  ``users`` row of kind ``task`` (see ``SqlUser``). So the scheduler's backlog, jobs, leases, replay and
  dataset snapshots treat a task exactly like a user, and one training job may mix users' and tasks' adapters.
  The first batch also creates the task adapter, so users can be enrolled at once (it serves nothing until a
  version is live).
- **Import** of an existing PEFT adapter (``lorafleet.workflows.adapter_import``) registers a version directly.
- **QA** evaluates a task candidate alone and in the banks of a sample of enrolled users
  (``lorafleet.workflows.qa_runner``); promoting it, or moving its ``live`` alias by hand (``move_task_live``), queues
  rechecks of every enrolled user's live adapters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafleet.domain import Adapter, AliasEvent, FeedbackRecord, PromoteRule, SubjectKind
from lorafleet.domain.subject import task_subject_id
from lorafleet.errors import NotFoundError, ValidationError
from lorafleet.feedback import DEFAULT_LIMITS, FeedbackLimits, IngestResult, validate_feedback_batch
from lorafleet.jobs.queue import JobQueue
from lorafleet.store.sql import feedback as feedback_store
from lorafleet.store.sql.routing_repository import RoutingRepository
from lorafleet.workflows.live_alias import LIVE_MOVES, move_live, promote_manually

if TYPE_CHECKING:
    from lorafleet.registry import Registry
    from lorafleet.store.sql.database import Database

MAX_TASK_NAME_LENGTH = 128


@dataclass(frozen=True)
class TaskInfo:
    """A task adapter at a glance: its live version, how many versions, users enrolled and feedback records."""

    name: str
    adapter_id: int
    live_version: int | None
    versions: int
    enrolled_users: int
    feedback_records: int


def validate_task_name(name: object) -> str:
    """A task's name: 1-128 printable characters, no surrounding spaces, no ``/`` (it is a URL path segment)."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValidationError("task: must be a non-empty name without surrounding spaces")
    if len(name) > MAX_TASK_NAME_LENGTH or not name.isprintable() or "/" in name:
        raise ValidationError(
            f"task: must be printable, without '/', at most {MAX_TASK_NAME_LENGTH} characters"
        )
    return name


def ingest_task_feedback(
    db: Database,
    *,
    tenant_id: int,
    task_name: str,
    records: Sequence[Mapping[str, Any]],
    limits: FeedbackLimits = DEFAULT_LIMITS,
) -> IngestResult:
    """Validate a batch, then store it all-or-nothing for the task (its subject row and its task adapter are
    created on first sight, in the same transaction), deduplicated like a user's feedback."""
    name = validate_task_name(task_name)
    prepared = validate_feedback_batch(records, limits=limits)
    ids, created = feedback_store.insert_feedback(
        db,
        tenant_id=tenant_id,
        external_id=task_subject_id(name),
        records=prepared,
        kind=SubjectKind.TASK,
        task_adapter=name,
    )
    return IngestResult(ids=ids, created=created, duplicates=len(ids) - created)


def list_task_feedback(
    db: Database, *, tenant_id: int, task_name: str, after_id: int | None = None, limit: int = 100
) -> list[FeedbackRecord]:
    """The task's records in id order after ``after_id``; a task without feedback is ``NotFoundError``."""
    name = validate_task_name(task_name)
    return feedback_store.list_feedback(
        db,
        tenant_id=tenant_id,
        external_id=task_subject_id(name),
        after_id=after_id,
        limit=limit,
        kind=SubjectKind.TASK,
    )


def get_task_adapter(registry: Registry, *, tenant_id: int, task_name: str) -> Adapter:
    """The tenant's task adapter of that name; ``NotFoundError`` if there is none (or another tenant's)."""
    name = validate_task_name(task_name)
    adapter = registry.find_adapter(tenant_id=tenant_id, owner_user_id=None, name=name)
    if adapter is None:  # owner-less adapters are task adapters only (a learned gate belongs to its user)
        raise NotFoundError(f"task {name!r} not found")
    return adapter


def list_tasks(db: Database, *, tenant_id: int) -> list[TaskInfo]:
    """The tenant's task adapters by name, with live version, counts of versions, enrolled users and records."""
    rows = db.run(RoutingRepository(dialect=db.dialect).task_overview, tenant_id=tenant_id)
    return [TaskInfo(**row) for row in rows]


def enrolled_users(db: Database, *, tenant_id: int, task_name: str) -> list[str]:
    """External ids of the users enrolled in the task, sorted; ``NotFoundError`` for an unknown task."""
    name = validate_task_name(task_name)
    repo = RoutingRepository(dialect=db.dialect)
    with db.unit_of_work():
        adapter_id = db.run(repo.find_task_adapter, tenant_id=tenant_id, name=name)
        if adapter_id is None:
            raise NotFoundError(f"task {name!r} not found")
        return db.run(repo.enrolled_external_ids, tenant_id=tenant_id, adapter_id=adapter_id)


def move_task_live(
    db: Database,
    registry: Registry,
    *,
    tenant_id: int,
    task_name: str,
    to_number: int | None,
    action: str,
    actor: str,
    reason: str,
    promote_rule: str = PromoteRule.QA,
    force: bool = False,
) -> AliasEvent:
    """Promote (``action="promote"``, to a version number) or roll back (``"rollback"``, to an earlier number or
    None) the task's ``live`` alias, and queue rechecks of every enrolled user's live adapters in the same
    transaction: their banks changed. Serving follows on the next request (banks are resolved per batch).

    A promote is a person's (``live_alias.promote_manually``): under ``promote_rule`` ``qa`` a version QA has
    not passed needs ``force``."""
    adapter = get_task_adapter(registry, tenant_id=tenant_id, task_name=task_name)
    if action not in LIVE_MOVES:
        raise ValidationError("action: must be 'promote' or 'rollback'")
    queue = JobQueue(db)
    if action == "promote":
        if to_number is None:
            raise ValidationError("version: promote needs a version number")
        return promote_manually(
            db,
            registry,
            tenant_id=tenant_id,
            adapter=adapter,
            number=to_number,
            actor=actor,
            reason=reason,
            promote_rule=promote_rule,
            force=force,
            queue=queue,
        )
    return move_live(
        registry=registry,
        queue=queue,
        tenant_id=tenant_id,
        adapter=adapter,
        action=action,
        number=to_number,
        actor=actor,
        reason=reason,
    )


__all__ = [
    "TaskInfo",
    "enrolled_users",
    "get_task_adapter",
    "ingest_task_feedback",
    "list_task_feedback",
    "list_tasks",
    "move_task_live",
    "validate_task_name",
]
