"""The audit log above the store: ``record_event`` appends one event in the caller's transaction, ``list_events``
reads them.

Every action that must be audited calls ``record_event`` inside the ``Database.unit_of_work()`` that performs
it, so the event and the action commit together, and a failed action leaves no event. Already audited: forced
promotes and every rollback of a ``live`` alias (``workflows.live_alias``), API-key creation and revocation and
tenant creation (``store.sql.tenants``), version and feedback exports (``record_version_export``,
``record_feedback_export``, by the API and ``lorafleet export``). Deletions will call ``record_event`` the same way.

``details`` hold ids and content hashes only, never personal content (no feedback text, no reasons typed by a
person): the log must outlive a user's deletion without keeping what was deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorafleet.domain import Adapter, AdapterVersion, AuditAction, AuditEvent
from lorafleet.domain.subject import Subject
from lorafleet.store.sql import audit_repository
from lorafleet.store.sql.database import Database


def record_event(
    db: Database,
    *,
    tenant_id: int | None,
    actor: str,
    action: AuditAction | str,
    target: str,
    details: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Append one audit event, in the open unit of work when there is one (else in a transaction of its own).
    ``tenant_id`` None is an admin-wide event; ``details`` ids and hashes only."""
    return db.run(
        audit_repository.insert_event,
        tenant_id=tenant_id,
        actor=actor,
        action=action,
        target=target,
        details=details,
    )


def list_events(
    db: Database,
    *,
    tenant_id: int | None = None,
    action: AuditAction | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[AuditEvent]:
    """One page of events, oldest first: a tenant's (``tenant_id``), or every tenant's and the admin-wide ones
    (None), optionally of one ``action``."""
    return db.run(
        audit_repository.list_events, tenant_id=tenant_id, action=action, limit=limit, offset=offset
    )


def record_version_export(
    db: Database,
    *,
    actor: str,
    adapter: Adapter,
    owner: Subject | None,
    version: AdapterVersion,
    archive_sha256: str,
) -> AuditEvent:
    """An ``export.version`` event: who downloaded which version, and the digests of what they got."""
    return record_event(
        db,
        tenant_id=adapter.tenant_id,
        actor=actor,
        action=AuditAction.EXPORT_VERSION,
        target=adapter_target(adapter, owner=owner, number=version.number),
        details={
            "adapter_id": adapter.id,
            "version_id": version.id,
            "version_sha256": version.sha256,
            "archive_sha256": archive_sha256,
        },
    )


def record_feedback_export(db: Database, *, tenant_id: int, actor: str, subject: Subject) -> AuditEvent:
    """An ``export.feedback`` event: who took a user's (or a task's) records out (``user:<id>`` / ``task:<name>``)."""
    return record_event(
        db,
        tenant_id=tenant_id,
        actor=actor,
        action=AuditAction.EXPORT_FEEDBACK,
        target=f"{subject.kind}:{subject.name}",
    )


def adapter_target(adapter: Adapter, *, owner: Subject | None, number: int | None) -> str:
    """How an event names a version of an adapter: ``user:<id>/<adapter>@<n>`` for a user's adapter,
    ``task:<name>@<n>`` for a task adapter (``@none``: no version, the base model)."""
    at = "none" if number is None else str(number)
    if owner is None or owner.is_task:
        return f"task:{adapter.name}@{at}"
    return f"user:{owner.name}/{adapter.name}@{at}"


__all__ = ["adapter_target", "list_events", "record_event", "record_feedback_export", "record_version_export"]
