"""Forgetting records: ``DELETE /v1/users/{user_id}/feedback`` and ``DELETE /v1/tasks/{task}/feedback`` (by ids or by
a filter) answer with the deletion's receipt; ``GET /v1/deletions/{receipt_id}`` reads one back with where its
rebuild stands, ``GET /v1/deletions`` lists them (``lorafleet.workflows.deletion``, ``docs/data-rights.md``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from pydantic import AfterValidator

from lorafleet.domain import DeletionReceipt
from lorafleet.domain.subject import TASK_LABEL_PREFIX, Subject
from lorafleet.domain.text import printable_name
from lorafleet.errors import ValidationError
from lorafleet.sdk import schemas as s
from lorafleet.workflows import deletion
from services.api import convert
from services.api.deps import CurrentTenant, PageLimit, Services, TaskName, UserId, actor_of
from services.api.runtime import ApiServices

router = APIRouter(tags=["deletions"])

ReceiptId = Annotated[
    str,
    Path(pattern=r"^del_[0-9a-f]{32}$", description="The receipt's id ('del_' and 32 hex digits)."),
]
SubjectFilter = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=300,
        description="Only this subject's receipts: 'user:<id>' or 'task:<name>'.",
    ),
    AfterValidator(lambda v: None if v is None else printable_name(v)),
]


@router.delete("/v1/users/{user_id}/feedback", response_model=s.DeletionReceiptOut)
def forget_user_records(
    services: Services, tenant: CurrentTenant, user_id: UserId, body: s.ForgetRecordsRequest
) -> s.DeletionReceiptOut:
    """Forget the user's records named by ``ids`` or selected by ``filter``: every adapter version trained on one of
    them (new or replayed) and its lineage descendants are revoked, ``live`` goes back to the newest clean version
    (or the base model), a rebuild job is queued, and the receipt says exactly what changed. Ids that are not this
    user's records are a 404 naming them, and nothing changes."""
    return _forget(
        services, tenant_id=tenant.id, actor=actor_of(tenant), subject=Subject.user(user_id), body=body
    )


@router.delete("/v1/tasks/{task}/feedback", response_model=s.DeletionReceiptOut)
def forget_task_records(
    services: Services, tenant: CurrentTenant, task: TaskName, body: s.ForgetRecordsRequest
) -> s.DeletionReceiptOut:
    """``DELETE /v1/users/{user_id}/feedback`` for a shared task's records and its task adapter."""
    return _forget(
        services, tenant_id=tenant.id, actor=actor_of(tenant), subject=Subject.task(task), body=body
    )


@router.get("/v1/deletions/{receipt_id}", response_model=s.DeletionReceiptOut)
def get_deletion(services: Services, tenant: CurrentTenant, receipt_id: ReceiptId) -> s.DeletionReceiptOut:
    """A deletion's receipt, with where its rebuild stands (the job's state, and the rebuilt versions so far)."""
    receipt = deletion.get_receipt(services.db, tenant_id=tenant.id, receipt_id=receipt_id)
    return _receipt_out(services, receipt)


@router.get("/v1/deletions", response_model=list[s.DeletionReceiptOut])
def list_deletions(
    services: Services, tenant: CurrentTenant, subject: SubjectFilter = None, limit: PageLimit = 100
) -> list[s.DeletionReceiptOut]:
    """The tenant's receipts, newest first (``subject``: only ``user:<id>``'s or ``task:<name>``'s); without the
    rebuild's state (read one receipt for it)."""
    found = deletion.list_receipts(services.db, tenant_id=tenant.id, subject=_subject(subject), limit=limit)
    return [convert.deletion_receipt(r) for r in found]


def _forget(
    services: ApiServices, *, tenant_id: int, actor: str, subject: Subject, body: s.ForgetRecordsRequest
) -> s.DeletionReceiptOut:
    given = body.filter
    selection = deletion.RecordSelection.parse(
        ids=body.ids,
        since=None if given is None else given.since,
        until=None if given is None else given.until,
        metadata=None if given is None else given.metadata,
    )
    receipt = deletion.forget_records(
        services.db,
        services.registry,
        tenant_id=tenant_id,
        subject=subject,
        selection=selection,
        actor=actor,
        purge=body.purge,
        scheduler=services.scheduler,
    )
    return _receipt_out(services, receipt)


def _receipt_out(services: ApiServices, receipt: DeletionReceipt) -> s.DeletionReceiptOut:
    status = deletion.rebuild_status(services.db, services.registry, receipt=receipt, queue=services.queue)
    return convert.deletion_receipt(receipt, rebuild=status)


def _subject(label: str | None) -> Subject | None:
    """``user:<id>`` or ``task:<name>`` as a subject; anything else is a 422 naming ``subject``."""
    if label is None:
        return None
    if label.startswith(TASK_LABEL_PREFIX) and len(label) > len(TASK_LABEL_PREFIX):
        return Subject.task(label.removeprefix(TASK_LABEL_PREFIX))
    if label.startswith("user:") and len(label) > len("user:"):
        return Subject.user(label.removeprefix("user:"))
    raise ValidationError("subject: must be 'user:<id>' or 'task:<name>'")
