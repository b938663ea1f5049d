"""Moving a ``live`` alias, and what must follow it.

``Registry.promote`` / ``Registry.rollback`` move one adapter's alias and nothing else. A shared task adapter's
alias is part of the bank of every user enrolled in it, so moving it changes what those users are served: each
of their live personal adapters must be rechecked by QA. ``move_live`` is that rule in code: every workflow
that moves an alias (QA's promotions and rollbacks, ``tasks.move_task_live``) goes through it, and the
rechecks are queued in the same transaction as the move.

``queue_candidate_qa`` is the other half: with the promote rule ``qa``, each newly registered candidate gets its
QA job in the registering transaction (train jobs and import jobs both call it).

``promote_manually`` is a person's promote (the API, the SDK, the CLI). Under the promote rule ``qa`` no version
goes live without a decision: a version QA has not passed (no report yet, or its latest decision is not
``promote``/``keep``) needs ``force``, and without it the promote is refused (``QAUndecidedError``, a 409) and
changes nothing. A forced promote is recorded so in the history (``AliasEvent.forced``, with actor and reason)
and queues the version's QA job in the same transaction (an active one is kept): QA then evaluates the live
version as a candidate and rolls it back if it fails (``lorafleet.workflows.qa_runner``). Rollbacks need no
force: moving back is how a person undoes a bad release, and every version they go back to was live before.

Both are audited (``lorafleet.workflows.audit``) in the transaction of the move: each forced promote
(``promote.forced``) and each rollback through ``move_live`` (``rollback``: a person's, QA's, a blob repair's;
the actor tells them apart).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from lorafleet.domain import (
    UNSERVABLE_STATUSES,
    Adapter,
    AdapterVersion,
    AliasEvent,
    AuditAction,
    PromoteRule,
    QADecision,
    VersionStatus,
)
from lorafleet.domain.subject import Subject
from lorafleet.errors import QAUndecidedError, ValidationError
from lorafleet.jobs.queue import JobQueue
from lorafleet.registry import Registry
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.qa_repository import QAReport, QARepository
from lorafleet.workflows.audit import adapter_target, record_event
from lorafleet.workflows.qa_triggers import submit_candidate_qa, submit_task_rechecks

LiveMove = Literal["promote", "rollback"]
LIVE_MOVES: tuple[str, ...] = ("promote", "rollback")
#: the QA decisions after which a version may go live without ``force`` (its latest report's decision)
PASSING_DECISIONS = frozenset({QADecision.PROMOTE, QADecision.KEEP})


def move_live(
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
    forced: bool = False,
) -> AliasEvent:
    """Promote (to version ``number``) or roll back (to an earlier ``number``, or None for the base model) the
    adapter's ``live`` alias; for a shared task adapter, also queue a recheck of every enrolled user's live
    adapters (``cause`` says why; by default the move itself). Both in one transaction: the caller's when one
    is open (``Database.unit_of_work``, e.g. a job's fenced block). ``forced`` (a promote only) is recorded in
    the history; ``promote_manually`` decides it."""
    if action not in LIVE_MOVES:
        raise ValidationError("action: must be 'promote' or 'rollback'")
    with queue.db.unit_of_work():
        if action == "promote":
            if number is None:
                raise ValidationError("version: promote needs a version number")
            event = registry.promote(
                tenant_id=tenant_id,
                adapter_id=adapter.id,
                number=number,
                actor=actor,
                reason=reason,
                forced=forced,
            )
        else:
            event = registry.rollback(
                tenant_id=tenant_id, adapter_id=adapter.id, to_number=number, actor=actor, reason=reason
            )
            audit_move(queue.db, tenant_id=tenant_id, adapter=adapter, event=event, number=number)
        if adapter.is_task_adapter:
            if cause is None:
                to = "none" if event.to_version_id is None else f"version id {event.to_version_id}"
                cause = f"task adapter {adapter.name!r}: {action} to {to} by {actor}"
            submit_task_rechecks(queue=queue, tenant_id=tenant_id, adapter_id=adapter.id, cause=cause)
        return event


def earlier_live_versions(
    registry: Registry, *, tenant_id: int, adapter_id: int, below: int, excluding: Collection[int] = ()
) -> list[AdapterVersion]:
    """Where ``live`` may roll back to from version ``below``: the adapter's versions that were live before it
    (``archived``) and are numbered below it, newest first, less those whose ids are in ``excluding``. In the
    caller's transaction when one is open (under the adapter's lock, it is the answer as of the lock)."""
    archived = registry.list_versions(
        tenant_id=tenant_id, adapter_id=adapter_id, status=VersionStatus.ARCHIVED
    )
    earlier = (v for v in archived if v.number < below and v.id not in excluding)
    return sorted(earlier, key=lambda v: -v.number)


def qa_decision(db: Database, *, tenant_id: int, version: AdapterVersion) -> QADecision | None:
    """The latest QA decision on a version (None: QA has not decided it)."""
    found = _reports(db, tenant_id=tenant_id, version_ids=[version.id]).get(version.id)
    return None if not found else QADecision(found[-1].decision)


@dataclass(frozen=True)
class VersionQA:
    """A version's QA state as listings show it: the latest decision, and whether it went live by force."""

    decision: QADecision | None = None
    forced_live: bool = False

    @property
    def state(self) -> str:
        """``passed`` (promote/keep), ``failed`` (reject/rollback) or ``undecided`` (no decision yet, or ``hold``:
        QA had no evidence to decide by)."""
        if self.decision is None or self.decision == QADecision.HOLD:
            return "undecided"
        return "passed" if self.decision in PASSING_DECISIONS else "failed"


def versions_qa(
    db: Database, registry: Registry, *, tenant_id: int, adapter_id: int, version_ids: Sequence[int]
) -> dict[int, VersionQA]:
    """Each version's ``VersionQA``: the latest report's decision, and whether the latest move of ``live`` onto it
    was forced (so a live version QA has not decided, served by a person's choice, is told apart)."""
    reports = _reports(db, tenant_id=tenant_id, version_ids=version_ids)
    forced: dict[int, bool] = {}
    for event in registry.alias_history(tenant_id=tenant_id, adapter_id=adapter_id):
        if event.to_version_id is not None:
            forced[event.to_version_id] = event.forced  # oldest first: the latest move wins
    return {
        vid: VersionQA(
            decision=QADecision(reports[vid][-1].decision) if reports.get(vid) else None,
            forced_live=forced.get(vid, False),
        )
        for vid in version_ids
    }


def promote_manually(
    db: Database,
    registry: Registry,
    *,
    tenant_id: int,
    adapter: Adapter,
    number: int,
    actor: str,
    reason: str,
    promote_rule: str,
    force: bool = False,
    queue: JobQueue | None = None,
) -> AliasEvent:
    """A person's promote of version ``number`` (see the module docstring): under the promote rule ``qa`` a
    version QA has not passed needs ``force``; a forced move is recorded as such and queues the version's QA
    job with the move. For a task adapter, enrolled users' rechecks are queued as for any move."""
    version = registry.get_version(tenant_id=tenant_id, adapter_id=adapter.id, number=number)
    forced = False
    if promote_rule == PromoteRule.QA and version.status not in (*UNSERVABLE_STATUSES, VersionStatus.LIVE):
        decision = qa_decision(db, tenant_id=tenant_id, version=version)
        if decision not in PASSING_DECISIONS:
            if not force:
                state = (
                    "QA has not decided it yet"
                    if decision is None
                    else f"its latest QA decision is {decision}"
                )
                raise QAUndecidedError(
                    f"version {number} of {adapter.name!r} has no passing QA decision ({state}); the promote rule "
                    "is 'qa': wait for its QA job, or promote with force=true (recorded in the history; QA "
                    "still evaluates the version and rolls it back if it fails)"
                )
            forced = True
    queue = queue or JobQueue(db)
    with db.unit_of_work():
        event = move_live(
            registry=registry,
            queue=queue,
            tenant_id=tenant_id,
            adapter=adapter,
            action="promote",
            number=number,
            actor=actor,
            reason=reason,
            forced=forced,
        )
        if forced:
            submit_candidate_qa(queue=queue, tenant_id=tenant_id, version_id=version.id)
            audit_move(db, tenant_id=tenant_id, adapter=adapter, event=event, number=number)
    return event


def audit_move(
    db: Database, *, tenant_id: int, adapter: Adapter, event: AliasEvent, number: int | None
) -> None:
    """The audit event of a move of ``live`` to version ``number`` (None: the base model): ``promote.forced`` for
    a forced promote, ``rollback`` for a rollback, by the move's actor, in the caller's transaction. Its details
    are ids only (the person's reason stays in the alias history)."""
    owner = None
    if adapter.owner_user_id is not None:
        repo = QARepository(dialect=db.dialect)
        owner = Subject.user(
            db.run(repo.user_external_id, tenant_id=tenant_id, user_id=adapter.owner_user_id)
        )
    record_event(
        db,
        tenant_id=tenant_id,
        actor=event.actor,
        action=AuditAction.PROMOTE_FORCED if event.forced else AuditAction.ROLLBACK,
        target=adapter_target(adapter, owner=owner, number=number),
        details={
            "adapter_id": adapter.id,
            "alias_event_id": event.id,
            "from_version_id": event.from_version_id,
            "to_version_id": event.to_version_id,
        },
    )


def queue_candidate_qa(
    *, queue: JobQueue, promote_rule: str, tenant_id: int, version_ids: Sequence[int]
) -> list[int] | None:
    """With ``promote_rule`` ``qa``, queue one QA job per new candidate in the caller's (registering)
    transaction and return the jobs' ids; with any other rule None: the caller decides promotion itself."""
    if promote_rule != "qa":
        return None
    return [
        submit_candidate_qa(queue=queue, tenant_id=tenant_id, version_id=version_id).id
        for version_id in version_ids
    ]


def _reports(db: Database, *, tenant_id: int, version_ids: Sequence[int]) -> dict[int, list[QAReport]]:
    """Each version's QA reports, oldest first."""
    return db.run(
        QARepository(dialect=db.dialect).reports_for_versions, tenant_id=tenant_id, version_ids=version_ids
    )


__all__ = [
    "LIVE_MOVES",
    "audit_move",
    "earlier_live_versions",
    "PASSING_DECISIONS",
    "LiveMove",
    "VersionQA",
    "move_live",
    "promote_manually",
    "qa_decision",
    "queue_candidate_qa",
    "versions_qa",
]
