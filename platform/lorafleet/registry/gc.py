"""Garbage collection of the object store.

A blob is deleted when nothing needs it any more (``RegistryRepository.referenced_sha256s``: a version row that
is not ``revoked``, a QA report of one, or a deletion receipt's hold) and either it is older than the grace period
(a registration writes its blob before its row, so a young unreferenced blob may be one about to be
registered) or a deletion receipt's hold on it has ended (its ``purge_after`` has passed: the blob of a revoked or
erased version goes then, however young). Each deletion re-checks under the blob lock, so a registration is
never undercut. Receipts whose held blobs are all gone (or still used by a servable version) are marked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

from lorafleet.errors import BlobNotFoundError
from lorafleet.store.blob.base import BlobStore
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.receipts import blob_holds, mark_blobs_deleted
from lorafleet.store.sql.registry_repository import RegistryRepository

logger = logging.getLogger(__name__)


def collect_unreferenced_blobs(
    db: Database, blobs: BlobStore, repo: RegistryRepository, *, cutoff: datetime, now: datetime | None = None
) -> list[str]:
    """Delete the unreferenced blobs last modified before ``cutoff``, and those whose deletion receipt's hold
    ended by ``now``; returns their digests."""
    now = now or datetime.now(UTC)
    holds = db.run(blob_holds, now=now)
    due = {sha for digests in holds.due.values() for sha in digests}
    stored = {info.sha256: _aware(info.modified_at) for info in blobs.list()}
    candidates = {sha for sha, modified in stored.items() if modified < cutoff} | (due & set(stored))
    unreferenced = candidates - db.run(repo.referenced_sha256s, digests=candidates, now=now)
    deleted = sorted(sha for sha in unreferenced if delete_if_unreferenced(db, blobs, repo, sha, now=now))
    if holds.due:
        db.run(mark_blobs_deleted, receipt_ids=list(holds.due), at=now)
    return deleted


def delete_if_unreferenced(
    db: Database, blobs: BlobStore, repo: RegistryRepository, sha256: str, *, now: datetime
) -> bool:
    """Delete one blob unless something needs it (checked under the exclusive blob lock); whether it was."""
    with db.unit_of_work():
        db.run(repo.lock_blobs, exclusive=True)
        if db.run(repo.referenced_sha256s, digests=[sha256], now=now):
            return False
        try:
            blobs.delete(sha256)
        except BlobNotFoundError:
            return False
    return True


class PeriodicGc:
    """The scheduler's housekeeping task: ``collect()`` (a registry's ``gc``) at most every ``interval_seconds``
    (0: never), so deleted data's blobs go soon after their hold ends. A failure is logged, never raised: the
    next period tries again."""

    def __init__(
        self,
        collect: Callable[[], list[str]],
        *,
        interval_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.collect = collect
        self.interval_seconds = interval_seconds
        self.clock = clock
        self._last: float | None = None

    @property
    def enabled(self) -> bool:
        return self.interval_seconds > 0

    def __call__(self) -> list[str]:
        now = self.clock()
        if not self.enabled or (self._last is not None and now - self._last < self.interval_seconds):
            return []
        self._last = now
        try:
            deleted = self.collect()
        except Exception:  # a store outage must not stop the scheduler; the next period retries
            logger.exception("blob gc failed")
            return []
        if deleted:
            logger.info("blob gc deleted %d blobs", len(deleted))
        return deleted


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
