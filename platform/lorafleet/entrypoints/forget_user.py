"""``lorafleet forget user``: erase a user and everything of theirs (``lorafleet.workflows.erasure``), from the
database and the object store directly (as the other admin commands; ``DELETE /v1/users/{id}`` does the same over
HTTP), and print the receipt."""

from __future__ import annotations

import argparse

from services.api.convert import deletion_receipt  # the API's converter: both print the same receipt

from lorafleet.domain import DeletionReceipt
from lorafleet.entrypoints.admin import CLI_ACTOR, dump_json
from lorafleet.platform import Platform
from lorafleet.workflows.erasure import forget_user


def forget_user_command(args: argparse.Namespace) -> int:
    """Forget ``args.user_id`` of tenant ``args.tenant`` (``--purge``: delete the blobs now) and print the
    receipt, as JSON with ``--json`` (the API's ``DeletionReceiptOut``)."""
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.tenant)
        receipt = forget_user(
            lib.db,
            lib.registry,
            tenant_id=tenant.id,
            external_id=args.user_id,
            actor=CLI_ACTOR,
            purge=args.purge,
        )
    if args.json:
        print(dump_json(deletion_receipt(receipt).model_dump(mode="json")))
        return 0
    for line in receipt_lines(receipt):
        print(line)
    return 0


def receipt_lines(receipt: DeletionReceipt) -> list[str]:
    erased = ", ".join(f"{kind} {n}" for kind, n in sorted(receipt.erased.items()) if n)
    versions = ", ".join(f"{v['adapter']}@{v['number']}" for v in receipt.revoked_versions) or "none"
    blobs = (
        f"deleted at {receipt.blobs_deleted_at.isoformat()}"
        if receipt.blobs_deleted_at is not None
        else f"held until {receipt.purge_after.isoformat()}, then deleted by the gc"
    )
    return [
        f"forgot {receipt.subject}: receipt {receipt.id}",
        f"erased: {erased or 'nothing'}",
        f"versions: {versions}",
        f"records: {len(receipt.record_hashes)} (content hashes in the receipt)",
        f"blobs: {len(receipt.blobs)}, {blobs}",
    ]
