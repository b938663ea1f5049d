"""The audit log, read by a tenant: ``GET /v1/audit`` lists the tenant's own events only (the admin reads every
tenant's at ``GET /v1/admin/audit``). Events are ids and hashes only, never personal content."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from lorafleet.sdk import schemas as s
from lorafleet.workflows.audit import list_events
from services.api import convert
from services.api.deps import CurrentTenant, PageLimit, PageOffset, Services

router = APIRouter(prefix="/v1/audit", tags=["audit"])

#: ``action``: one of the audit actions (anything else is 422 naming it)
ActionFilter = Annotated[s.AuditAction | None, Query(description="Only events of this action.")]


@router.get("", response_model=list[s.AuditEventOut])
def list_audit(
    services: Services,
    tenant: CurrentTenant,
    action: ActionFilter = None,
    limit: PageLimit = 100,
    offset: PageOffset = 0,
) -> list[s.AuditEventOut]:
    """The tenant's audit events, oldest first: forced promotes, rollbacks, key changes, exports, deletions."""
    events = list_events(services.db, tenant_id=tenant.id, action=action, limit=limit, offset=offset)
    return [convert.audit_event(e, tenant_names={tenant.id: tenant.name}) for e in events]
