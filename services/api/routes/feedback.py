"""Feedback: submit a batch of records for a user (idempotent with a key), list a user's records.

An ``sft`` record is ``prompt`` + ``completion`` or OpenAI-style ``messages`` (its last, assistant, turn is the
target); ``lorafleet.feedback`` validates both and stores the form it was given."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from lorafleet.domain import FeedbackRecord
from lorafleet.domain.subject import Subject
from lorafleet.feedback import IngestResult
from lorafleet.sdk import schemas as s
from lorafleet.workflows.audit import record_feedback_export
from lorafleet.workflows.feedback import EXPORT_PAGE, all_feedback, ingest_feedback, list_feedback
from services.api import convert
from services.api.deps import AfterId, CurrentTenant, CurrentUser, PageLimit, Services, UserId, actor_of
from services.api.idempotency import Idempotent, IdempotentCall

router = APIRouter(prefix="/v1/users/{user_id}/feedback", tags=["feedback"])


@router.post("", response_model=s.FeedbackSubmitted, status_code=200)
def submit_feedback(user_id: UserId, batch: s.FeedbackBatch, call: Idempotent) -> JSONResponse:
    """Store the records for the user (created on first sight), all or nothing; a record repeating one already
    stored (same kind and training fields) is not stored again and gets the existing record's id."""
    return submit_records(call, batch, partial(ingest_feedback, user_external_id=user_id))


def submit_records(
    call: IdempotentCall, batch: s.FeedbackBatch, ingest: Callable[..., IngestResult]
) -> JSONResponse:
    """A feedback batch stored behind the request's idempotency key by ``ingest`` (``ingest_feedback`` or
    ``ingest_task_feedback`` with its subject given), called with the database, the tenant's id, the records and
    the limits."""

    def store() -> s.FeedbackSubmitted:
        records = [record.dump(mode="json") for record in batch.records]
        services = call.services
        result = ingest(
            services.db, tenant_id=call.tenant.id, records=records, limits=services.feedback_limits
        )
        return convert.feedback_submitted(result)

    return call.run(store, body=batch)


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


#: the media type of a feedback export: one JSON object per line
JSONL_MEDIA_TYPE = "application/x-ndjson"
EXPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {JSONL_MEDIA_TYPE: {}}, "description": "One stored record per line, oldest first"},
    404: {"description": "No such user (or task)"},
}


@router.get("/export", response_class=StreamingResponse, responses=EXPORT_RESPONSES)
def export_feedback(services: Services, tenant: CurrentTenant, user: CurrentUser) -> StreamingResponse:
    """All of the user's records as JSON Lines, oldest first: each line is one record as ``GET .../feedback``
    returns it (every page); ``Content-Disposition`` names the file ``<user>-feedback.jsonl``."""

    def page(after_id: int | None) -> list[FeedbackRecord]:
        return list_feedback(
            services.db,
            tenant_id=user.tenant_id,
            user_external_id=user.external_id,
            after_id=after_id,
            limit=EXPORT_PAGE,
        )

    records = all_feedback(page)  # reads the first page now: an unknown user is a 404 before anything streams
    record_feedback_export(
        services.db, tenant_id=tenant.id, actor=actor_of(tenant), subject=Subject.user(user.external_id)
    )
    return jsonl_response(records, filename=f"{user.external_id}-feedback.jsonl")


def jsonl_response(records: Iterator[FeedbackRecord], *, filename: str) -> StreamingResponse:
    """Records streamed as JSON Lines in their API shape (``FeedbackRecordOut``), as an attachment."""

    def lines() -> Iterator[str]:
        for record in records:
            yield (
                json.dumps(convert.feedback_record(record).model_dump(mode="json"), ensure_ascii=False) + "\n"
            )

    return StreamingResponse(
        lines(), media_type=JSONL_MEDIA_TYPE, headers={"Content-Disposition": attachment(filename)}
    )


def attachment(filename: str) -> str:
    """A ``Content-Disposition`` value: the name in ASCII (others as ``_``), in full as RFC 5987's ``filename*``."""
    plain = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return f"attachment; filename=\"{plain}\"; filename*=utf-8''{quote(filename, safe='')}"
