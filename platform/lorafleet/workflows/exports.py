"""A version's download, with its audit event: what the API route and ``lorafleet export`` both do."""

from __future__ import annotations

from pathlib import Path

from lorafleet.domain import Adapter
from lorafleet.domain.subject import Subject
from lorafleet.registry import Registry
from lorafleet.registry.export import ExportedVersion, export_version
from lorafleet.store.sql.database import Database
from lorafleet.workflows.audit import record_version_export


def export_audited_version(
    db: Database,
    registry: Registry,
    *,
    adapter: Adapter,
    owner: Subject | None,
    number: int,
    backbone: str,
    dest_dir: Path,
    actor: str,
) -> ExportedVersion:
    """Write version ``number`` of ``adapter`` (a user's, or a task's with ``owner`` None) into ``dest_dir`` as a
    PEFT folder archive (``registry.export``) and record the ``export.version`` event; a missing or corrupt
    version raises before anything is written or recorded."""
    version = registry.get_version(tenant_id=adapter.tenant_id, adapter_id=adapter.id, number=number)
    exported = export_version(
        registry, version=version, adapter_name=adapter.name, backbone=backbone, dest_dir=dest_dir
    )
    record_version_export(
        db, actor=actor, adapter=adapter, owner=owner, version=version, archive_sha256=exported.archive_sha256
    )
    return exported


__all__ = ["export_audited_version"]
