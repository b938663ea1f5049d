"""``lorafleet export``: a version as a PEFT folder archive, or a subject's feedback as JSON Lines, from the
registry and the database directly (as the other admin commands; the API offers the same over HTTP)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lorafleet.domain import Adapter, FeedbackRecord
from lorafleet.domain.subject import Subject
from lorafleet.entrypoints.admin import CLI_ACTOR
from lorafleet.errors import NotFoundError, ValidationError
from lorafleet.platform import Platform
from lorafleet.sdk.schemas import FeedbackRecordOut
from lorafleet.workflows.audit import record_feedback_export
from lorafleet.workflows.exports import export_audited_version
from lorafleet.workflows.feedback import EXPORT_PAGE, FeedbackPage, all_feedback, list_feedback
from lorafleet.workflows.tasks import get_task_adapter, list_task_feedback


def export_command(args: argparse.Namespace) -> int:
    """Write ``<adapter>-v<n>.tar.gz`` (``--version``) or ``<subject>-feedback.jsonl`` (``--feedback``) into
    ``--out`` (created if needed) and print its path."""
    if (args.user is None) == (args.task is None):
        raise ValidationError("export: pass exactly one of --user and --task")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.tenant)
        owner = Subject.task(args.task) if args.task is not None else Subject.user(args.user)
        if args.feedback:
            path = _export_feedback(lib, args, tenant.id, out)
            record_feedback_export(lib.db, tenant_id=tenant.id, actor=CLI_ACTOR, subject=owner)
        else:
            adapter = _adapter(lib, args, tenant.id)
            exported = export_audited_version(
                lib.db,
                lib.registry,
                adapter=adapter,
                owner=None if args.task is not None else owner,
                number=args.version,
                backbone=lib.settings.backbone,
                dest_dir=out,
                actor=CLI_ACTOR,
            )
            path = exported.path
            print(f"version sha256 (stored blob): {exported.version_sha256}")
            print(f"archive sha256: {exported.archive_sha256}")
    print(path)
    return 0


def _adapter(lib: Platform, args: argparse.Namespace, tenant_id: int) -> Adapter:
    if args.task is not None:
        return get_task_adapter(lib.registry, tenant_id=tenant_id, task_name=args.task)
    user = lib.tenants.get_user(tenant_id=tenant_id, external_id=args.user)
    found = lib.registry.find_adapter(tenant_id=tenant_id, owner_user_id=user.id, name=args.adapter)
    if found is None:
        raise NotFoundError(f"user {args.user!r} has no adapter {args.adapter!r}")
    return found


def _export_feedback(lib: Platform, args: argparse.Namespace, tenant_id: int, out: Path) -> Path:
    def page(after_id: int | None) -> list[FeedbackRecord]:
        if args.task is not None:
            return list_task_feedback(
                lib.db, tenant_id=tenant_id, task_name=args.task, after_id=after_id, limit=EXPORT_PAGE
            )
        return list_feedback(
            lib.db, tenant_id=tenant_id, user_external_id=args.user, after_id=after_id, limit=EXPORT_PAGE
        )

    name = f"task-{args.task}" if args.task is not None else args.user
    return write_jsonl(page, out / f"{name.replace('/', '_')}-feedback.jsonl")


def write_jsonl(page: FeedbackPage, dest: Path) -> Path:
    """Every record ``page`` reaches, one JSON object a line in the API's shape, written atomically."""
    records = all_feedback(page)
    partial = dest.with_name(f".{dest.name}.partial")
    with partial.open("w", encoding="utf-8") as f:
        for record in records:
            out = FeedbackRecordOut.model_validate(record, from_attributes=True)
            f.write(json.dumps(out.model_dump(mode="json"), ensure_ascii=False) + "\n")
    os.replace(partial, dest)
    return dest
