"""The tenant's users: ``GET /v1/users``, one page at a time, each with their live versions, newest feedback time,
and adapter version and feedback record counts (task subjects are never listed); ``DELETE /v1/users/{user_id}``
forgets one of them (``lorafleet.workflows.erasure``) and returns the deletion receipt."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from lorafleet.sdk import schemas as s
from lorafleet.workflows.erasure import forget_user
from services.api import convert
from services.api.deps import CurrentTenant, PageLimit, PageOffset, Services, UserId, actor_of

router = APIRouter(prefix="/v1/users", tags=["users"])

Purge = Annotated[
    bool,
    Query(
        description="Delete the blobs of the erased versions and QA reports now, instead of after the gc grace "
        "period."
    ),
]


@router.get("", response_model=list[s.UserOut])
def list_users(
    services: Services, tenant: CurrentTenant, limit: PageLimit = 100, offset: PageOffset = 0
) -> list[s.UserOut]:
    """The tenant's users by id: ``live_versions`` (adapter name -> live version number, adapters with one
    live), ``last_feedback_at``, ``version_count`` (all their adapters' versions) and ``feedback_count``."""
    found = services.tenants.list_user_summaries(tenant_id=tenant.id, limit=limit, offset=offset)
    return [convert.user_summary(u) for u in found]


@router.delete("/{user_id}", response_model=s.DeletionReceiptOut)
def delete_user(
    services: Services, tenant: CurrentTenant, user_id: UserId, purge: Purge = False
) -> s.DeletionReceiptOut:
    """Forget the user: their feedback, adapters, versions, aliases and history, enrolments, gate settings,
    routing keys, QA reports and stored idempotent responses are erased in one transaction, their active jobs
    cancelled; the receipt (ids and hashes only) stays retrievable. Blobs go after the gc grace period, or now
    with ``purge``. 404 for a user the tenant does not have (nothing changes)."""
    receipt = forget_user(
        services.db,
        services.registry,
        tenant_id=tenant.id,
        external_id=user_id,
        actor=actor_of(tenant),
        purge=purge,
    )
    return convert.deletion_receipt(receipt)
