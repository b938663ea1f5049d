"""Feedback: submit a batch of records for a user (idempotent with a key), list a user's records.

An ``sft`` record is ``prompt`` + ``completion`` or OpenAI-style ``messages`` (its last, assistant, turn is the
target); ``lorafleet.feedback`` validates both and stores the form it was given."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from lorafleet.feedback import IngestResult
from lorafleet.sdk import schemas as s
from lorafleet.workflows.feedback import ingest_feedback, list_feedback
from services.api import convert
from services.api.deps import AfterId, CurrentUser, PageLimit, Services, UserId
from services.api.idempotency import Idempotent, IdempotentCall

router = APIRouter(prefix="/v1/users/{user_id}/feedback", tags=["feedback"])


@router.post("", response_model=s.FeedbackSubmitted, status_code=200)
def submit_feedback(user_id: UserId, batch: s.FeedbackBatch, call: Idempotent) -> JSONResponse:
    """Store the records for the user (created on first sight), all or nothing; a record repeating one already
    stored (same kind and training fields) is not stored again and gets the existing record's id."""

    def ingest() -> IngestResult:
        records = [record.dump(mode="json") for record in batch.records]
        services = call.services
        return ingest_feedback(
            services.db,
            tenant_id=call.tenant.id,
            user_external_id=user_id,
            records=records,
            limits=services.feedback_limits,
        )

    return submit_records(call, batch, ingest)


def submit_records(
    call: IdempotentCall, batch: s.FeedbackBatch, ingest: Callable[[], IngestResult]
) -> JSONResponse:
    """A feedback batch stored by ``ingest`` (a user's or a task's) behind the request's idempotency key."""
    return call.run(lambda: convert.feedback_submitted(ingest()), body=batch)


@router.get("", response_model=list[s.FeedbackRecordOut])
def get_feedback(
    services: Services,
    user: CurrentUser,
    after_id: AfterId = None,
    limit: PageLimit = 100,
) -> list[s.FeedbackRecordOut]:
    """The user's records in id order (page with ``after_id`` = the last id seen)."""
    records = list_feedback(
        services.db,
        tenant_id=user.tenant_id,
        user_external_id=user.external_id,
        after_id=after_id,
        limit=limit,
    )
    return [convert.feedback_record(r) for r in records]
