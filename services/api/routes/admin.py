"""Operator routes, with the admin key: ``POST /v1/admin/verify`` re-hashes the blob of every version (every
tenant's, or one tenant's) and, with ``repair``, quarantines the corrupt and missing ones
(``lorafleet.workflows.blob_verify``); ``GET /v1/admin/audit`` reads the audit log of every tenant. A tenant key is 403 here: a tenant never sees another tenant's versions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from lorafleet.sdk import schemas as s
from lorafleet.workflows.audit import list_events
from lorafleet.workflows.blob_verify import verify_blobs
from services.api import convert
from services.api.deps import Admin, PageLimit, PageOffset, Printable, Services
from services.api.routes.audit import ActionFilter

router = APIRouter(prefix="/v1/admin", tags=["admin"])

#: who a repair is in the alias history
ADMIN_ACTOR = "api:admin"


@router.post("/verify", response_model=s.VerifyReportOut)
def verify(services: Services, _admin: Admin, body: s.VerifyRequest) -> s.VerifyReportOut:
    """Re-hash the blob of every version (``tenant``: only that tenant's; an unknown name is 404) and report each
    one ``ok``, ``corrupt``, ``missing``, ``unreadable`` (the object store failed: unknown, never repaired) or
    ``quarantined`` (already ``corrupt``), with counts. With ``repair``, each corrupt or missing version is
    quarantined in its own transaction: a live one is first rolled back to the newest healthy earlier version (or
    none), recorded in the history with reason ``blob-corrupt``; healthy versions are never touched, and running
    it again finds nothing new. It reads every blob: on a large fleet prefer the scheduler's scrub."""
    tenant_id = None if body.tenant is None else services.tenants.get_tenant(name=body.tenant).id
    report = verify_blobs(
        services.db,
        services.registry,
        tenant_id=tenant_id,
        repair=body.repair,
        actor=ADMIN_ACTOR,
        queue=services.queue,
    )
    return s.VerifyReportOut.model_validate(report.to_json(only_bad=body.only_bad))


TenantFilter = Annotated[
    str | None, Query(min_length=1, max_length=128, description="Only this tenant's events."), Printable
]


@router.get("/audit", response_model=list[s.AuditEventOut])
def audit(
    services: Services,
    _admin: Admin,
    tenant: TenantFilter = None,
    action: ActionFilter = None,
    limit: PageLimit = 100,
    offset: PageOffset = 0,
) -> list[s.AuditEventOut]:
    """The audit log, oldest first: every tenant's events and the admin-wide ones, or one tenant's (``tenant``: an
    unknown name is 404), optionally of one ``action``."""
    tenant_id = None if tenant is None else services.tenants.get_tenant(name=tenant).id
    events = list_events(services.db, tenant_id=tenant_id, action=action, limit=limit, offset=offset)
    names = services.tenants.tenant_names(tenant_ids=[e.tenant_id for e in events if e.tenant_id is not None])
    return [convert.audit_event(e, tenant_names=names) for e in events]
