"""The composition root: one place that turns ``Settings`` into the objects every entry point works with.

``Platform.from_settings(settings)`` opens the database and builds the registry (with the settings'
``blob_gc_grace_seconds``), the object store, the job queue and the tenant repository on it. The API
(``services/api``), the CLI (``lorafleet.entrypoints``), the trainer actors and Serve replicas, and the tests'
fixtures build these through here instead of by hand. Only entry points and runtimes import this module;
nothing below them (store, registry, ML, workflows) does.

Everything but the database is built on first use, so a command that only reads the job queue never opens
the object store.
"""

from __future__ import annotations

from functools import cached_property

from lorafleet.config import Settings, load_settings
from lorafleet.domain.closing import ClosesOnExit
from lorafleet.jobs.queue import JobQueue
from lorafleet.registry import Registry
from lorafleet.store.blob import BlobStore, open_blob_store_from_settings
from lorafleet.store.sql import migrate as migrations
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.tenants import TenantRepository

__all__ = ["Platform"]


class Platform(ClosesOnExit):
    """The database, object store, registry, job queue and tenants of one ``Settings``; ``close()`` (or
    leaving a ``with`` block) disposes of the database's connections."""

    def __init__(self, settings: Settings, db: Database, *, blobs: BlobStore | None = None) -> None:
        self.settings = settings
        self.db = db
        if blobs is not None:
            self.__dict__["blobs"] = blobs

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, migrate: bool = False) -> Platform:
        """Open what ``settings`` (default: ``load_settings()``) names; ``migrate`` upgrades the schema first."""
        settings = settings or load_settings()
        if migrate:
            migrations.upgrade(settings.resolved_database_url)
        return cls(settings, Database(settings.resolved_database_url))

    @cached_property
    def blobs(self) -> BlobStore:
        return open_blob_store_from_settings(self.settings)

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.db, self.blobs, gc_grace_seconds=self.settings.blob_gc_grace_seconds)

    @cached_property
    def queue(self) -> JobQueue:
        return JobQueue(self.db)

    @cached_property
    def tenants(self) -> TenantRepository:
        return TenantRepository(self.db)

    def close(self) -> None:
        self.db.dispose()
