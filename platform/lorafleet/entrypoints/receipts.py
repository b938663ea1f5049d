"""A deletion receipt in the API's shape (``lorafleet.sdk.schemas.DeletionReceiptOut``): one converter for the
API (``services/api``: ``DELETE /v1/users/{id}``, ``/v1/deletions``) and the CLI (``lorafleet forget``,
``lorafleet receipt --json``), so that both print the same fields in the same format (times in UTC as
pydantic writes them, with a ``Z``)."""

from __future__ import annotations

from lorafleet.domain import DeletionReceipt
from lorafleet.sdk.schemas import DeletionReceiptOut, RebuildOut, RebuiltVersionOut, RevokedVersionOut
from lorafleet.workflows.deletion import RebuildStatus


def deletion_receipt(receipt: DeletionReceipt, *, rebuild: RebuildStatus | None = None) -> DeletionReceiptOut:
    """``receipt`` with ``rebuild``, where its rebuild stands (``workflows.deletion.rebuild_status``; None: a
    user's erasure, which rebuilds nothing, or not asked)."""
    return DeletionReceiptOut(
        id=receipt.id,
        kind=receipt.kind.value,
        subject=receipt.subject,
        actor=receipt.actor,
        created_at=receipt.created_at,
        request=receipt.request,
        record_hashes=list(receipt.record_hashes),
        revoked_versions=[RevokedVersionOut(**v) for v in receipt.revoked_versions],
        erased=receipt.erased,
        blobs=list(receipt.blobs),
        purge_after=receipt.purge_after,
        blobs_deleted_at=receipt.blobs_deleted_at,
        rebuild=None if rebuild is None else rebuild_out(rebuild),
    )


def rebuild_out(status: RebuildStatus) -> RebuildOut:
    return RebuildOut(
        job_id=status.job_id,
        job_state=status.job_state,
        versions=[
            RebuiltVersionOut(adapter=v.adapter, number=v.number, version_id=v.version_id, status=v.status)
            for v in status.versions
        ],
    )
