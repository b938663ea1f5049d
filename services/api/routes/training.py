"""The tenant's training settings: ``TrainingConfig`` overrides under every training job of the tenant.

``GET`` answers the overrides and the effective config (the defaults with the overrides on top); ``PUT`` replaces
the overrides (``{}`` resets them). A job's own overrides (``POST .../train`` with ``training``) go on top of these
when it is queued (``lorafleet.training.overrides``). An invalid field is 422 naming it, and changes nothing.
"""

from __future__ import annotations

from fastapi import APIRouter

from lorafleet.sdk import schemas as s
from lorafleet.training.overrides import TenantTraining, get_tenant_training, set_tenant_training
from services.api.deps import CurrentTenant, Services
from services.api.runtime import ApiServices

router = APIRouter(prefix="/v1/training-config", tags=["training"])


@router.get("", response_model=s.TrainingConfigOut)
def get_training_config(services: Services, tenant: CurrentTenant) -> s.TrainingConfigOut:
    """The tenant's overrides and the config its next jobs get."""
    found = get_tenant_training(services.db, tenant_id=tenant.id, defaults=services.options.training)
    return _out(services, found)


@router.put("", response_model=s.TrainingConfigOut)
def put_training_config(
    services: Services, tenant: CurrentTenant, body: s.TrainingOverrides
) -> s.TrainingConfigOut:
    """Replace the tenant's overrides (``{}``: back to the defaults); jobs already queued keep their config."""
    stored = set_tenant_training(
        services.db,
        tenant_id=tenant.id,
        overrides=body.given(),
        defaults=services.options.training,
        max_rank=services.settings.trainer_max_rank,
    )
    return _out(services, stored)


def _out(services: ApiServices, found: TenantTraining) -> s.TrainingConfigOut:
    return s.TrainingConfigOut(
        overrides=found.overrides,
        effective=s.TrainingValues.model_validate(found.effective.model_dump(mode="json")),
        max_rank=services.settings.trainer_max_rank,
    )
