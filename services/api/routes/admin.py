"""Operator routes, with the admin key: ``POST /v1/admin/verify`` re-hashes the blob of every version (every
tenant's, or one tenant's) and, with ``repair``, quarantines the corrupt and missing ones
(``lorafleet.workflows.blob_verify``). A tenant key is 403 here: a tenant never sees another tenant's versions."""

from __future__ import annotations

from fastapi import APIRouter

from lorafleet.sdk import schemas as s
from lorafleet.workflows.blob_verify import verify_blobs
from services.api.deps import Admin, Services

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
