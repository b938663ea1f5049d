"""The append-only audit log: insert an event, list events. Nothing here updates or deletes a row, and the
database refuses both (triggers of migration 0013), so an event, once committed, stays as written.

Both operations run in a session the caller opened (``Database.run``): an event is inserted in the transaction of
the action it records (``lorafleet.workflows.audit.record_event``), so the two commit together or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lorafleet.domain import AuditAction, AuditEvent
from lorafleet.errors import ValidationError
from lorafleet.store.sql.models import SqlAuditEvent, utcnow
from lorafleet.store.sql.rows import check_page, from_row

MAX_ACTOR_LENGTH = 256


def to_audit_event(row: SqlAuditEvent) -> AuditEvent:
    return from_row(AuditEvent, row, details=dict(row.details or {}))


def insert_event(
    session: Session,
    *,
    tenant_id: int | None,
    actor: str,
    action: AuditAction | str,
    target: str,
    details: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """Append one event (``action`` one of ``AuditAction``; ``details`` JSON of ids and hashes only)."""
    try:
        action = AuditAction(action)
    except ValueError:
        raise ValidationError(f"action: unknown audit action {action!r}") from None
    row = SqlAuditEvent(
        tenant_id=tenant_id,
        at=utcnow(),
        actor=actor[:MAX_ACTOR_LENGTH],
        action=action.value,
        target=target,
        details=dict(details or {}),
    )
    session.add(row)
    session.flush()
    return to_audit_event(row)


def list_events(
    session: Session,
    *,
    tenant_id: int | None = None,
    action: AuditAction | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[AuditEvent]:
    """Events oldest first (by id), one page: only the tenant's when ``tenant_id`` is given (else every tenant's
    and the admin-wide ones), only one ``action`` when given."""
    check_page(limit=limit, offset=offset)
    query = select(SqlAuditEvent)
    if tenant_id is not None:
        query = query.where(SqlAuditEvent.tenant_id == tenant_id)
    if action is not None:
        query = query.where(SqlAuditEvent.action == AuditAction(action).value)
    rows = session.scalars(query.order_by(SqlAuditEvent.id).limit(limit).offset(offset))
    return [to_audit_event(row) for row in rows]


__all__ = ["MAX_ACTOR_LENGTH", "insert_event", "list_events", "to_audit_event"]
