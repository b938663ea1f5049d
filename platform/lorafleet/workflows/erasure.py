"""Forgetting a user (``DELETE /v1/users/{id}``, ``lorafleet forget user``): everything of theirs erased, with a
receipt.

One unit of work holds the erasure of their rows (``lorafleet.store.sql.erasure``: feedback, snapshots, adapters,
versions, aliases and history, lineage, QA reports, enrolments, gate settings, routing keys, the user row), the
stored idempotent responses of requests about them, the receipt and the ``delete.user`` audit event: all commit
together, or nothing does. The receipt outlives the user (``store.sql.receipts``; ids and hashes only) and holds
the blobs of the erased versions and of their QA reports from the gc until ``purge_after``: the gc grace period
after the erasure, or now with ``purge``, and then they are deleted right after the commit.

Serving needs no signal: it resolves a user's experts from the database on every request, and a user the tenant
no longer has gets the base model, whatever a warm adapter cache still holds (it is keyed by content hash and
only ever asked for what the resolution names).
"""

from __future__ import annotations

from datetime import UTC, datetime

from lorafleet.domain import AuditAction, DeletionKind, DeletionReceipt
from lorafleet.registry import Registry
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.erasure import erase_user
from lorafleet.store.sql.idempotency import IdempotencyRepository
from lorafleet.store.sql.receipts import get_receipt, insert_receipt, mark_blobs_deleted
from lorafleet.store.sql.tenants import validate_external_id
from lorafleet.workflows.audit import record_event


def forget_user(
    db: Database,
    registry: Registry,
    *,
    tenant_id: int,
    external_id: str,
    actor: str,
    purge: bool = False,
    now: datetime | None = None,
) -> DeletionReceipt:
    """Erase the tenant's user ``external_id`` and return the receipt (see the module). ``NotFoundError`` for a
    user the tenant does not have, ``ValidationError`` for an id that cannot be one: nothing changes then.
    With ``purge`` the blobs are deleted at once (each unless a version still in use shares it), and the
    receipt's ``blobs_deleted_at`` is set when all of them went."""
    external_id = validate_external_id(external_id)
    now = now or datetime.now(UTC)
    subject = f"user:{external_id}"
    with db.unit_of_work():
        erased = db.run(erase_user, tenant_id=tenant_id, external_id=external_id, actor=actor, now=now)
        keys = IdempotencyRepository(db).forget_subject(tenant_id=tenant_id, subject=external_id)
        receipt = db.run(
            insert_receipt,
            tenant_id=tenant_id,
            kind=DeletionKind.USER,
            subject=subject,
            actor=actor,
            request={"purge": purge},
            record_hashes=erased.record_hashes,
            revoked_versions=[v.to_json() for v in erased.versions],
            erased={**erased.erased, "idempotency_keys": keys},
            blobs=erased.blobs,
            purge_after=now if purge else now + registry.gc_grace,
            adapter_ids=erased.adapter_ids,
        )
        record_event(
            db,
            tenant_id=tenant_id,
            actor=actor,
            action=AuditAction.DELETE_USER,
            target=subject,
            details={
                "receipt_id": receipt.id,
                "version_ids": [v.version_id for v in erased.versions],
                "records": len(erased.record_hashes),
                "cancelled_jobs": list(erased.cancelled_jobs),
                "purge": purge,
            },
        )
    if not purge:
        return receipt
    deleted = registry.delete_unreferenced_now(receipt.blobs, now=now)
    if set(deleted) == set(receipt.blobs):
        db.run(mark_blobs_deleted, receipt_ids=[receipt.id], at=now)
    return db.run(get_receipt, tenant_id=tenant_id, receipt_id=receipt.id)


__all__ = ["forget_user"]
