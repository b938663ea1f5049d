"""Moving a ``live`` alias, and what must follow it.

``Registry.promote`` / ``Registry.rollback`` move one adapter's alias and nothing else. A shared task adapter's
alias is part of the bank of every user enrolled in it, so moving it changes what those users are served: each
of their live personal adapters must be rechecked by QA. ``move_live`` is that rule in code: every workflow
that moves an alias (QA's promotions and rollbacks, ``tasks.move_task_live``) goes through it, and the
rechecks are queued in the same transaction as the move.

``queue_candidate_qa`` is the other half: with the promote rule ``qa``, each newly registered candidate gets its
QA job in the registering transaction (train jobs and import jobs both call it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from lorafleet.domain import Adapter, AliasEvent
from lorafleet.errors import ValidationError
from lorafleet.jobs.queue import JobQueue
from lorafleet.registry import Registry
from lorafleet.workflows.qa_triggers import submit_candidate_qa, submit_task_rechecks

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

LiveMove = Literal["promote", "rollback"]
LIVE_MOVES: tuple[str, ...] = ("promote", "rollback")


def move_live(
    session: Session,
    *,
    registry: Registry,
    queue: JobQueue,
    tenant_id: int,
    adapter: Adapter,
    action: str,
    number: int | None,
    actor: str,
    reason: str,
    cause: str | None = None,
) -> AliasEvent:
    """Promote (to version ``number``) or roll back (to an earlier ``number``, or None for the base model) the
    adapter's ``live`` alias in the caller's transaction; for a shared task adapter, also queue a recheck of
    every enrolled user's live adapters there (``cause`` says why; by default the move itself)."""
    if action not in LIVE_MOVES:
        raise ValidationError("action: must be 'promote' or 'rollback'")
    if action == "promote":
        if number is None:
            raise ValidationError("version: promote needs a version number")
        event = registry.promote(
            tenant_id=tenant_id,
            adapter_id=adapter.id,
            number=number,
            actor=actor,
            reason=reason,
            session=session,
        )
    else:
        event = registry.rollback(
            tenant_id=tenant_id,
            adapter_id=adapter.id,
            to_number=number,
            actor=actor,
            reason=reason,
            session=session,
        )
    if adapter.is_task_adapter:
        if cause is None:
            to = "none" if event.to_version_id is None else f"version id {event.to_version_id}"
            cause = f"task adapter {adapter.name!r}: {action} to {to} by {actor}"
        submit_task_rechecks(session, queue=queue, tenant_id=tenant_id, adapter_id=adapter.id, cause=cause)
    return event


def queue_candidate_qa(
    session: Session, *, queue: JobQueue, promote_rule: str, tenant_id: int, version_ids: Sequence[int]
) -> list[int] | None:
    """With ``promote_rule`` ``qa``, queue one QA job per new candidate in the caller's (registering)
    transaction and return the jobs' ids; with any other rule None: the caller decides promotion itself."""
    if promote_rule != "qa":
        return None
    return [
        submit_candidate_qa(session, queue=queue, tenant_id=tenant_id, version_id=version_id).id
        for version_id in version_ids
    ]


__all__ = ["LIVE_MOVES", "LiveMove", "move_live", "queue_candidate_qa"]
