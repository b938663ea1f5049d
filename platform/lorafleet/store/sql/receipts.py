"""Deletion receipts: what each deletion did (``lorafleet.domain.DeletionReceipt``), and the blobs they hold.

A receipt is inserted in the transaction of the deletion it describes (``lorafleet.workflows.deletion``), so the
two commit together or not at all. Its ``blobs`` are *held* from the registry's gc until ``purge_after`` (the gc
grace period, or at once with ``purge``): the gc deletes them once that moment has passed, however young the
blobs are, unless a servable version still uses the same digest, and then sets ``blobs_deleted_at``.

Every function runs in a session the caller opened (``Database.run``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lorafleet.domain import DeletionKind, DeletionReceipt
from lorafleet.errors import NotFoundError, ValidationError
from lorafleet.store.sql.models import SqlDeletionReceipt, utcnow
from lorafleet.store.sql.rows import check_page, from_row

#: a receipt id: ``del_`` and 32 hex digits (random: ids are not guessable across tenants)
RECEIPT_PREFIX = "del_"


def new_receipt_id() -> str:
    return RECEIPT_PREFIX + secrets.token_hex(16)


def to_receipt(row: SqlDeletionReceipt) -> DeletionReceipt:
    return from_row(
        DeletionReceipt,
        row,
        request=dict(row.request or {}),
        record_hashes=tuple(row.record_hashes or ()),
        revoked_versions=tuple(dict(v) for v in row.revoked_versions or ()),
        erased={str(k): int(v) for k, v in (row.erased or {}).items()},
        blobs=tuple(row.blobs or ()),
        adapter_ids=tuple(int(a) for a in row.adapter_ids or ()),
    )


def insert_receipt(
    session: Session,
    *,
    tenant_id: int,
    kind: DeletionKind,
    subject: str,
    actor: str,
    request: Mapping[str, Any],
    record_hashes: Sequence[str],
    revoked_versions: Sequence[Mapping[str, Any]] = (),
    erased: Mapping[str, int] | None = None,
    blobs: Iterable[str] = (),
    purge_after: datetime,
    rebuild_job_id: int | None = None,
    adapter_ids: Iterable[int] = (),
    receipt_id: str | None = None,
) -> DeletionReceipt:
    """Insert one receipt in the caller's transaction; ``blobs`` are deduplicated and sorted."""
    row = SqlDeletionReceipt(
        id=receipt_id or new_receipt_id(),
        tenant_id=tenant_id,
        kind=DeletionKind(kind).value,
        subject=subject,
        actor=actor[:256],
        created_at=utcnow(),
        request=dict(request),
        record_hashes=sorted(set(record_hashes)),
        revoked_versions=[dict(v) for v in revoked_versions],
        erased=dict(erased or {}),
        blobs=sorted(set(blobs)),
        purge_after=purge_after,
        blobs_deleted_at=None,
        rebuild_job_id=rebuild_job_id,
        adapter_ids=sorted(set(adapter_ids)),
    )
    session.add(row)
    session.flush()
    return to_receipt(row)


def get_receipt(session: Session, *, tenant_id: int, receipt_id: str) -> DeletionReceipt:
    """The tenant's receipt; another tenant's id is ``NotFoundError`` like an unknown one."""
    row = session.get(SqlDeletionReceipt, receipt_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFoundError(f"deletion receipt {receipt_id!r} not found")
    return to_receipt(row)


def list_receipts(
    session: Session, *, tenant_id: int, limit: int = 100, subject: str | None = None
) -> list[DeletionReceipt]:
    """The tenant's receipts, newest first (optionally one subject's: ``user:<id>`` or ``task:<name>``)."""
    check_page(limit=limit)
    query = select(SqlDeletionReceipt).where(SqlDeletionReceipt.tenant_id == tenant_id)
    if subject is not None:
        query = query.where(SqlDeletionReceipt.subject == subject)
    rows = session.scalars(query.order_by(SqlDeletionReceipt.created_at.desc()).limit(limit))
    return [to_receipt(row) for row in rows]


def set_rebuild_job(session: Session, *, receipt_id: str, job_id: int) -> None:
    """Record the rebuild job of a receipt (queued after the deletion committed)."""
    row = session.get(SqlDeletionReceipt, receipt_id)
    if row is None:
        raise NotFoundError(f"deletion receipt {receipt_id!r} not found")
    row.rebuild_job_id = job_id
    session.flush()


@dataclass(frozen=True)
class BlobHolds:
    """Digests that pending receipts hold from the gc (``held``), and those whose hold has ended (``due``:
    receipt id -> its digests), at one moment."""

    held: frozenset[str]
    due: dict[str, tuple[str, ...]]


def blob_holds(session: Session, *, now: datetime) -> BlobHolds:
    """The blobs of receipts whose blobs are not deleted yet, split by ``purge_after`` against ``now``."""
    query = select(SqlDeletionReceipt.id, SqlDeletionReceipt.blobs, SqlDeletionReceipt.purge_after).where(
        SqlDeletionReceipt.blobs_deleted_at.is_(None)
    )
    held: set[str] = set()
    due: dict[str, tuple[str, ...]] = {}
    for receipt_id, blobs, purge_after in session.execute(query):
        digests = tuple(blobs or ())
        if _aware(purge_after) > now:
            held.update(digests)
        else:
            due[receipt_id] = digests
    return BlobHolds(held=frozenset(held), due=due)


def mark_blobs_deleted(session: Session, *, receipt_ids: Iterable[str], at: datetime) -> None:
    """Record that the receipts' blobs are gone (deleted, or kept only because a servable version uses them)."""
    for receipt_id in receipt_ids:
        row = session.get(SqlDeletionReceipt, receipt_id)
        if row is not None and row.blobs_deleted_at is None:
            row.blobs_deleted_at = at
    session.flush()


def check_receipt_id(value: object) -> str:
    """A well-formed receipt id, else ``ValidationError`` naming the field."""
    if (
        not isinstance(value, str)
        or not value.startswith(RECEIPT_PREFIX)
        or len(value) != len(RECEIPT_PREFIX) + 32
        or any(c not in "0123456789abcdef" for c in value[len(RECEIPT_PREFIX) :])
    ):
        raise ValidationError("receipt_id: must be 'del_' followed by 32 lowercase hex digits")
    return value


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


__all__ = [
    "RECEIPT_PREFIX",
    "BlobHolds",
    "blob_holds",
    "check_receipt_id",
    "get_receipt",
    "insert_receipt",
    "list_receipts",
    "mark_blobs_deleted",
    "new_receipt_id",
    "set_rebuild_job",
    "to_receipt",
]
