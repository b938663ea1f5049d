"""Enrolments of a user in the tenant's shared task adapters (they join the user's experts)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from lorafleet.routing.experts import list_enrolments
from lorafleet.sdk import schemas as s
from lorafleet.workflows.qa_triggers import enrol_and_recheck, unenrol_and_recheck
from services.api import convert
from services.api.deps import CurrentTenant, CurrentUser, Services, TaskName, UserId, actor_of
from services.api.idempotency import Idempotent

router = APIRouter(prefix="/v1/users/{user_id}/enrolments", tags=["enrolments"])


@router.get("", response_model=list[s.EnrolmentOut])
def get_enrolments(services: Services, user: CurrentUser) -> list[s.EnrolmentOut]:
    """The task adapters the user is enrolled in, by name."""
    found = list_enrolments(services.db, tenant_id=user.tenant_id, user_external_id=user.external_id)
    return [convert.enrolment(e) for e in found]


@router.post("", response_model=s.EnrolmentOut, status_code=201)
def post_enrolment(
    services: Services, tenant: CurrentTenant, user_id: UserId, body: s.EnrolRequest, call: Idempotent
) -> JSONResponse:
    """Enrol the user (created on first sight) in a task adapter; 404 for an unknown task, 409 if enrolled."""

    def run() -> s.EnrolmentOut:
        found, _rechecks = enrol_and_recheck(  # QA rechecks the user's live adapters in the grown bank
            services.db,
            tenant_id=tenant.id,
            user_external_id=user_id,
            task_name=body.task,
            actor=actor_of(tenant),
        )
        return convert.enrolment(found)

    return call.run(run, body=body, status_code=201)


@router.delete("/{task}", status_code=204, response_class=Response)
def delete_enrolment(services: Services, tenant: CurrentTenant, user_id: UserId, task: TaskName) -> Response:
    """Remove the user from the task adapter (their next request is served without it; QA rechecks their live
    adapters in the smaller bank); 404 if they were not enrolled."""
    unenrol_and_recheck(
        services.db, tenant_id=tenant.id, user_external_id=user_id, task_name=task, actor=actor_of(tenant)
    )
    return Response(status_code=204)
