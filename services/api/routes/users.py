"""The tenant's users: ``GET /v1/users``, one page at a time, each with their live versions, newest feedback time,
and adapter version and feedback record counts (task subjects are never listed)."""

from __future__ import annotations

from fastapi import APIRouter

from lorafleet.sdk import schemas as s
from services.api import convert
from services.api.deps import CurrentTenant, PageLimit, PageOffset, Services

router = APIRouter(prefix="/v1/users", tags=["users"])


@router.get("", response_model=list[s.UserOut])
def list_users(
    services: Services, tenant: CurrentTenant, limit: PageLimit = 100, offset: PageOffset = 0
) -> list[s.UserOut]:
    """The tenant's users by id: ``live_versions`` (adapter name -> live version number, adapters with one
    live), ``last_feedback_at``, ``version_count`` (all their adapters' versions) and ``feedback_count``."""
    found = services.tenants.list_user_summaries(tenant_id=tenant.id, limit=limit, offset=offset)
    return [convert.user_summary(u) for u in found]
