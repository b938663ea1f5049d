"""Garbage collection of the object store: blobs that no version row and no QA report references, once they
are older than the grace period (a registration writes its blob before its row)."""

from __future__ import annotations

from datetime import UTC, datetime

from lorafleet.errors import BlobNotFoundError
from lorafleet.store.blob.base import BlobStore
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.registry_repository import RegistryRepository


def collect_unreferenced_blobs(
    db: Database, blobs: BlobStore, repo: RegistryRepository, *, cutoff: datetime
) -> list[str]:
    """Delete the unreferenced blobs last modified before ``cutoff``; returns their digests. Each deletion
    re-checks under the blob lock, so a registration is never undercut."""
    old = {info.sha256 for info in blobs.list() if _aware(info.modified_at) < cutoff}
    unreferenced = old - db.run(repo.referenced_sha256s, digests=old)
    return sorted(sha for sha in unreferenced if _delete_if_unreferenced(db, blobs, repo, sha))


def _delete_if_unreferenced(db: Database, blobs: BlobStore, repo: RegistryRepository, sha256: str) -> bool:
    with db.unit_of_work():
        db.run(repo.lock_blobs, exclusive=True)
        if db.run(repo.referenced_sha256s, digests=[sha256]):
            return False
        try:
            blobs.delete(sha256)
        except BlobNotFoundError:
            return False
    return True


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
