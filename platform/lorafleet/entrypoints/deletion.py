"""``lorafleet forget records`` and ``lorafleet receipt``: forget some of a user's (or a task's) records and read a
deletion's receipt, from the registry and the database directly (as the other admin commands; the API offers the
same over HTTP: ``DELETE /v1/users/{id}/feedback``, ``GET /v1/deletions/{id}``)."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from typing import Any

from services.api.convert import deletion_receipt  # the API's converter: both print the same receipt

from lorafleet.domain import DeletionReceipt
from lorafleet.domain.subject import Subject
from lorafleet.entrypoints.admin import CLI_ACTOR, dump_json
from lorafleet.errors import ValidationError
from lorafleet.jobs.scheduler import Scheduler
from lorafleet.platform import Platform
from lorafleet.workflows.deletion import (
    RebuildStatus,
    RecordSelection,
    forget_records,
    get_receipt,
    rebuild_status,
)


def forget_records_command(args: argparse.Namespace) -> int:
    if (args.user is None) == (args.task is None):
        raise ValidationError("forget: pass exactly one of --user and --task")
    subject = Subject.task(args.task) if args.task is not None else Subject.user(args.user)
    selection = RecordSelection.parse(
        ids=None if args.ids is None else _ids(args.ids),
        since=_moment("filter.since", args.since),
        until=_moment("filter.until", args.until),
        metadata=_tags(args.tag) if args.tag else None,
    )
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.tenant)
        scheduler = Scheduler(lib.db, queue=lib.queue, max_rank=lib.settings.trainer_max_rank)
        receipt = forget_records(
            lib.db,
            lib.registry,
            tenant_id=tenant.id,
            subject=subject,
            selection=selection,
            actor=CLI_ACTOR,
            purge=args.purge,
            scheduler=scheduler,
        )
        status = rebuild_status(lib.db, lib.registry, receipt=receipt, queue=lib.queue)
    _show(receipt, status, as_json=args.json)
    return 0


def receipt_command(args: argparse.Namespace) -> int:
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.tenant)
        receipt = get_receipt(lib.db, tenant_id=tenant.id, receipt_id=args.receipt_id)
        status = rebuild_status(lib.db, lib.registry, receipt=receipt, queue=lib.queue)
    _show(receipt, status, as_json=args.json)
    return 0


def _show(receipt: DeletionReceipt, status: RebuildStatus, *, as_json: bool) -> None:
    if as_json:
        print(dump_json(deletion_receipt(receipt, rebuild=status).model_dump(mode="json")))
        return
    print(
        f"receipt {receipt.id} ({receipt.kind}) of {receipt.subject} by {receipt.actor} at {receipt.created_at}"
    )
    print(f"  records removed: {len(receipt.record_hashes)}")
    for v in receipt.revoked_versions:
        print(
            f"  revoked: {v['adapter']} version {v['number']} (id {v['version_id']}, sha256 {v['sha256'][:12]})"
        )
    deleted = "not yet" if receipt.blobs_deleted_at is None else str(receipt.blobs_deleted_at)
    print(f"  blobs: {len(receipt.blobs)}, deleted after {receipt.purge_after} (deleted: {deleted})")
    job = "none" if status.job_id is None else f"job {status.job_id} ({status.job_state})"
    print(f"  rebuild: {job}")
    for r in status.versions:
        print(f"  rebuilt: {r.adapter} version {r.number} ({r.status})")


def _ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise ValidationError("ids: must be comma-separated integers, e.g. --ids 12,13") from exc


def _moment(field: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValidationError(f"{field}: not an ISO 8601 time: {text!r}") from exc


def _tags(tags: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise ValidationError(f"filter.metadata: --tag must be key=value, got {tag!r}")
        try:
            found[key] = json.loads(value)
        except ValueError:
            found[key] = value
    return found
