"""The tenant's shared task adapters (``lorafleet.workflows.tasks``): feedback, import, training, versions, live moves.

A task adapter is an adapter without an owner user, so its versions, lineage and history answer exactly as a
user's adapter's do (the handlers of ``routes.adapters`` are reused); moving its ``live`` alias also queues QA
rechecks of every enrolled user. Users are enrolled through ``/v1/users/{user_id}/enrolments``.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from lorafleet.domain import Adapter, AliasEvent, FeedbackRecord
from lorafleet.domain.subject import Subject
from lorafleet.sdk import schemas as s
from lorafleet.workflows.audit import record_feedback_export
from lorafleet.workflows.feedback import EXPORT_PAGE, all_feedback
from lorafleet.workflows.import_jobs import submit_import
from lorafleet.workflows.tasks import (
    enrolled_users,
    get_task_adapter,
    ingest_task_feedback,
    list_task_feedback,
    list_tasks,
    move_task_live,
)
from services.api import convert
from services.api.deps import (
    AfterId,
    CurrentTenant,
    LineageDepth,
    PageLimit,
    QADocument,
    Services,
    TaskName,
    VersionNumber,
    actor_of,
)
from services.api.idempotency import Idempotent, IdempotentCall
from services.api.routes import adapters as adapter_routes
from services.api.routes.feedback import EXPORT_RESPONSES, jsonl_response, submit_records
from services.api.routes.jobs import submit_training

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])
TaskPath = TaskName


def task_adapter(services: Services, tenant: CurrentTenant, task: TaskPath) -> Adapter:
    """The tenant's task adapter named in the path (404 otherwise, also for another tenant's)."""
    return get_task_adapter(services.registry, tenant_id=tenant.id, task_name=task)


TaskAdapter = Annotated[Adapter, Depends(task_adapter)]


@router.get("", response_model=list[s.TaskOut])
def get_tasks(services: Services, tenant: CurrentTenant) -> list[s.TaskOut]:
    """The tenant's task adapters by name, with live version and counts."""
    return [convert.task(t) for t in list_tasks(services.db, tenant_id=tenant.id)]


@router.post("/{task}/feedback", response_model=s.FeedbackSubmitted, status_code=200)
def submit_task_feedback(task: TaskPath, batch: s.FeedbackBatch, call: Idempotent) -> JSONResponse:
    """Store records for the task (the task adapter is created on first sight), all or nothing, deduplicated
    like a user's feedback; the scheduler trains the task like a user."""
    return submit_records(call, batch, partial(ingest_task_feedback, task_name=task))


@router.get("/{task}/feedback", response_model=list[s.FeedbackRecordOut])
def get_task_feedback(
    services: Services,
    tenant: CurrentTenant,
    task: TaskPath,
    after_id: AfterId = None,
    limit: PageLimit = 100,
) -> list[s.FeedbackRecordOut]:
    """The task's records in id order (page with ``after_id``)."""
    records = list_task_feedback(
        services.db, tenant_id=tenant.id, task_name=task, after_id=after_id, limit=limit
    )
    return [convert.feedback_record(r) for r in records]


@router.get("/{task}/feedback/export", response_class=StreamingResponse, responses=EXPORT_RESPONSES)
def export_task_feedback(services: Services, tenant: CurrentTenant, task: TaskPath) -> StreamingResponse:
    """All of the task's records as JSON Lines, oldest first, as ``GET /v1/users/{user_id}/feedback/export``."""

    def page(after_id: int | None) -> list[FeedbackRecord]:
        return list_task_feedback(
            services.db, tenant_id=tenant.id, task_name=task, after_id=after_id, limit=EXPORT_PAGE
        )

    records = all_feedback(page)  # reads the first page now: an unknown task is a 404 before anything streams
    record_feedback_export(
        services.db, tenant_id=tenant.id, actor=actor_of(tenant), subject=Subject.task(task)
    )
    return jsonl_response(records, filename=f"task-{task}-feedback.jsonl")


@router.post("/{task}/import", response_model=s.TaskImportSubmitted, status_code=202)
def import_task_adapter(
    services: Services, tenant: CurrentTenant, task: TaskPath, body: s.TaskImportRequest, call: Idempotent
) -> JSONResponse:
    """Queue an ``import`` job for an existing PEFT adapter: a trainer checks it (safetensors only, shapes,
    rank, finite values, backbone fingerprint), computes its routing key from the example prompts and registers
    it as a candidate version (lineage ``imported``); QA then decides as for a trained version. 422 for an
    archive that is not base64, and for files refused without a backbone: not a PEFT LoRA adapter, non-finite
    weights, or weights (or ``lora_alpha``) beyond the QA policy's weight bounds (``weights_out_of_bounds``,
    naming the tensor or field); a refusal stores nothing and queues nothing."""

    args = adapter_routes.import_args(services, tenant, body)

    def submit() -> s.TaskImportSubmitted:
        return adapter_routes.import_submitted(submit_import(**args, task_name=task))

    return call.run(submit, body=body, status_code=202)


@router.post("/{task}/train", response_model=s.TrainSubmitted, status_code=202)
def train_task(
    services: Services,
    tenant: CurrentTenant,
    task: TaskPath,
    call: Idempotent,
    body: s.TrainRequest | None = None,
) -> JSONResponse:
    """Queue a training job for the task on its feedback so far (a task in an active job gets that job);
    ``training`` overrides the tenant's training config for this job, as for a user's."""
    train = partial(services.scheduler.train_task_now, tenant_id=tenant.id, task_name=task)
    return submit_training(call, body, train)


@router.get("/{task}/enrolments", response_model=s.TaskEnrolledOut)
def get_task_enrolments(services: Services, adapter: TaskAdapter) -> s.TaskEnrolledOut:
    """The users enrolled in the task, by external id."""
    users = enrolled_users(services.db, tenant_id=adapter.tenant_id, task_name=adapter.name)
    return s.TaskEnrolledOut(task=adapter.name, users=users)


@router.get("/{task}/versions", response_model=list[s.VersionOut])
def list_task_versions(services: Services, adapter: TaskAdapter) -> list[s.VersionOut]:
    """Every version of the task adapter by number, with status and metrics."""
    return adapter_routes.list_versions(services, adapter)


@router.get("/{task}/versions/{n}", response_model=s.VersionDetail)
def get_task_version(
    services: Services,
    adapter: TaskAdapter,
    n: VersionNumber,
    qa_document: QADocument = False,
) -> s.VersionDetail:
    """One version with its QA (for a task: evaluated alone and in enrolled users' experts)."""
    return adapter_routes.get_version(services, adapter, n, qa_document)


@router.get(
    "/{task}/versions/{n}/download",
    response_class=FileResponse,
    responses=adapter_routes.DOWNLOAD_RESPONSES,
)
def download_task_version(
    services: Services, tenant: CurrentTenant, adapter: TaskAdapter, n: VersionNumber
) -> FileResponse:
    """The task version as a PEFT folder archive, as for a user's version (same headers, 404, 409, audit)."""
    return adapter_routes.exported_version_response(services, adapter, n, owner=None, actor=actor_of(tenant))


@router.get("/{task}/versions/{n}/lineage", response_model=s.LineageOut)
def get_task_lineage(
    services: Services,
    adapter: TaskAdapter,
    n: VersionNumber,
    depth: LineageDepth = None,
) -> s.LineageOut:
    """Ancestors and descendants of a version (``imported`` edges point at the version an import replaced)."""
    return adapter_routes.get_lineage(services, adapter, n, depth)


@router.get("/{task}/history", response_model=list[s.AliasEventOut])
def task_alias_history(services: Services, adapter: TaskAdapter) -> list[s.AliasEventOut]:
    """Every move of the task's ``live`` alias, oldest first."""
    return adapter_routes.alias_history(services, adapter)


@router.post("/{task}/promote", response_model=s.AliasEventOut)
def promote_task(adapter: TaskAdapter, body: s.PromoteRequest, call: Idempotent) -> JSONResponse:
    """Make a task version live; enrolled users' live adapters are rechecked by QA in their changed banks. Under
    the promote rule ``qa`` a version QA has not passed needs ``force`` (else 409 ``qa_undecided``)."""
    return _move_live(call, adapter, body, "promote", body.version)


@router.post("/{task}/rollback", response_model=s.AliasEventOut)
def rollback_task(adapter: TaskAdapter, body: s.RollbackRequest, call: Idempotent) -> JSONResponse:
    """Move the task's ``live`` back to an earlier version or to none; every enrolled user's next request is
    served by it, and their live adapters are rechecked."""
    return _move_live(call, adapter, body, "rollback", body.to_version)


def _move_live(
    call: IdempotentCall,
    adapter: Adapter,
    body: s.PromoteRequest | s.RollbackRequest,
    action: str,
    to_number: int | None,
) -> JSONResponse:
    """``move_task_live`` as ``routes.adapters.move_live`` (behind the idempotency key, answered as the event)."""
    services = call.services

    def move(actor: str) -> AliasEvent:
        return move_task_live(
            services.db,
            services.registry,
            tenant_id=call.tenant.id,
            task_name=adapter.name,
            to_number=to_number,
            action=action,
            actor=actor,
            reason=body.reason,
            promote_rule=services.settings.promote_rule,
            force=isinstance(body, s.PromoteRequest) and body.force,
        )

    return adapter_routes.move_live(call, adapter, body, move)
