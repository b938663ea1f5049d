"""Storing and reading a subject's feedback: validation (``lorafleet.feedback``) then the SQL store, all or
nothing. The API's feedback routes, the CLI and the tests call these."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from lorafleet.domain import FeedbackRecord
from lorafleet.feedback import DEFAULT_LIMITS, FeedbackLimits, IngestResult, validate_feedback_batch
from lorafleet.store.sql import feedback as feedback_store
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.feedback import FeedbackBacklog
from lorafleet.store.sql.tenants import validate_external_id


def ingest_feedback(
    db: Database,
    *,
    tenant_id: int,
    user_external_id: str,
    records: Sequence[Mapping[str, Any]],
    limits: FeedbackLimits = DEFAULT_LIMITS,
) -> IngestResult:
    """Validate a batch, then store it all-or-nothing for the user (created if absent), deduplicated by
    content hash within the batch and against the user's stored records."""
    validate_external_id(user_external_id)
    prepared = validate_feedback_batch(records, limits=limits)
    ids, created = feedback_store.insert_feedback(
        db, tenant_id=tenant_id, external_id=user_external_id, records=prepared
    )
    return IngestResult(ids=ids, created=created, duplicates=len(ids) - created)


def list_feedback(
    db: Database, *, tenant_id: int, user_external_id: str, after_id: int | None = None, limit: int = 100
) -> list[FeedbackRecord]:
    """A user's records in id order after ``after_id``; an unknown user (or another tenant's) is NotFoundError."""
    validate_external_id(user_external_id)
    return feedback_store.list_feedback(
        db, tenant_id=tenant_id, external_id=user_external_id, after_id=after_id, limit=limit
    )


#: records read per query when a subject's feedback is exported
EXPORT_PAGE = 500
#: one page of a subject's records after an id (``None``: from the first)
FeedbackPage = Callable[[int | None], list[FeedbackRecord]]


def all_feedback(page: FeedbackPage) -> Iterator[FeedbackRecord]:
    """Every record ``page`` reaches, oldest first, one page at a time (the export of a user's or a task's
    feedback). The first page is read at once, so that an unknown subject fails before anything is yielded."""
    records = page(None)

    def pages() -> Iterator[FeedbackRecord]:
        current = records
        while current:
            yield from current
            current = page(current[-1].id)

    return pages()


def users_with_new_feedback(
    db: Database, *, tenant_id: int | None = None, min_new_records: int = 1, limit: int = 1000
) -> list[FeedbackBacklog]:
    """Users whose newest feedback is past what their adapters were trained on (``read_backlog``)."""
    return db.run(
        feedback_store.read_backlog, tenant_id=tenant_id, min_new_records=min_new_records, limit=limit
    )
