"""Forgetting records: delete some of a subject's feedback and unlearn it through the lineage, with a receipt.

``forget_records`` runs in ONE unit of work, under the subject's row lock (which a training job's registration
takes too, ``lorafleet.workflows.continual``, so the two serialise per subject):

1. select the records (``RecordSelection``: explicit ids, or a filter on time and metadata);
2. find every version whose dataset snapshot holds one of them (new and replayed records alike), and all their
   lineage descendants, of any relation, transitively: those versions are *revoked* (final: never served, never
   a promote or rollback target);
3. an adapter whose ``live`` version is revoked is rolled back, exactly like a person's rollback (history, audit,
   a task adapter's enrolled users rechecked), to the newest earlier version that was live before and is not
   revoked, or to none (the base model), with reason ``records-deleted``;
4. delete the feedback rows; insert the receipt (``lorafleet.store.sql.receipts``: ids and hashes only) that holds
   the revoked versions' blobs and their QA reports' blobs from the gc until ``purge_after``; write the
   ``delete.records`` audit event.

After the commit: when the subject's own adapter lost versions and the subject has records newer than what its
(new) live version was trained on, a train job rebuilds it (``Scheduler.train_now``), whose id the receipt keeps;
the rebuilt version goes through QA like any other. With ``purge`` the blobs are deleted at once (if the object
store fails then, the deletion stands and the next gc deletes them: their hold has ended).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from lorafleet.domain import (
    AdapterVersion,
    AuditAction,
    DeletionKind,
    DeletionReceipt,
    JobState,
    VersionStatus,
)
from lorafleet.domain.subject import Subject
from lorafleet.domain.text import MAX_INT64
from lorafleet.errors import BlobStoreError, LorafleetError, NotFoundError, ValidationError
from lorafleet.jobs.queue import JobQueue
from lorafleet.jobs.scheduler import Scheduler
from lorafleet.registry import Registry
from lorafleet.store.sql import receipts, record_deletion
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.feedback import get_snapshot
from lorafleet.store.sql.registry_repository import RegistryRepository
from lorafleet.workflows.audit import record_event
from lorafleet.workflows.continual import PERSONAL_ADAPTER
from lorafleet.workflows.live_alias import earlier_live_versions, move_live

logger = logging.getLogger(__name__)

#: the reason recorded on a rollback of ``live`` off a revoked version
RECORDS_DELETED = "records-deleted"
#: at most this many ids in one request
MAX_IDS = 10_000


@dataclass(frozen=True)
class RecordSelection:
    """Which of a subject's records to forget: ``ids``, or a filter (stored in ``[since, until)``, and payload
    ``metadata`` holding every given key with an equal value). Build it with ``parse`` (checks every field)."""

    ids: tuple[int, ...] | None = None
    since: datetime | None = None
    until: datetime | None = None
    metadata: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(
        cls,
        *,
        ids: Sequence[int] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> RecordSelection:
        """A checked selection; ``ValidationError`` naming the field (``ids``, ``filter.since``, ...)."""
        filtered = since is not None or until is not None or bool(metadata)
        if ids is not None and (filtered or metadata is not None):
            raise ValidationError("ids: give either ids or a filter, not both")
        if ids is not None:
            return cls(ids=_check_ids(ids))
        if not filtered:
            raise ValidationError("filter: give ids, or a filter with since, until or metadata")
        since, until = _aware("filter.since", since), _aware("filter.until", until)
        if since is not None and until is not None and since >= until:
            raise ValidationError("filter.until: must be later than filter.since")
        return cls(since=since, until=until, metadata=_check_metadata(metadata or {}))

    def request(self) -> dict[str, Any]:
        """What the receipt keeps of the request: the ids, or the filter with each metadata value as the sha256 of
        its canonical JSON (never in clear)."""
        if self.ids is not None:
            return {"ids": list(self.ids)}
        found: dict[str, Any] = {}
        if self.since is not None:
            found["since"] = self.since.isoformat()
        if self.until is not None:
            found["until"] = self.until.isoformat()
        if self.metadata:
            found["metadata_sha256"] = {k: _value_hash(v) for k, v in self.metadata}
        return {"filter": found}


@dataclass(frozen=True)
class RebuiltVersion:
    """The first clean version of a revoked adapter registered after the deletion."""

    adapter: str | None
    number: int
    version_id: int
    status: VersionStatus


@dataclass(frozen=True)
class RebuildStatus:
    """Where a deletion's rebuild stands: its job and its state, and the rebuilt versions so far."""

    job_id: int | None
    job_state: JobState | None
    versions: tuple[RebuiltVersion, ...]


def forget_records(
    db: Database,
    registry: Registry,
    *,
    tenant_id: int,
    subject: Subject,
    selection: RecordSelection,
    actor: str,
    purge: bool = False,
    scheduler: Scheduler | None = None,
) -> DeletionReceipt:
    """Forget the selected records of ``subject`` (a user, or a task's dataset); see the module docstring.
    An unknown subject, or ids that are not its records, raise ``NotFoundError`` and change nothing."""
    scheduler = scheduler or Scheduler(db)
    now = datetime.now(UTC)
    with db.unit_of_work():
        receipt = _forget(
            db,
            registry,
            queue=scheduler.queue,
            tenant_id=tenant_id,
            subject=subject,
            selection=selection,
            actor=actor,
            now=now,
            purge=purge,
        )
    receipt = _queue_rebuild(db, registry, scheduler=scheduler, receipt=receipt, subject=subject)
    if purge and receipt.blobs:
        try:
            registry.delete_unreferenced_now(receipt.blobs)  # now: past ``purge_after``, so no longer held
        except BlobStoreError as exc:  # the deletion stands; the next gc deletes them (their hold has ended)
            logger.warning("receipt %s: purge left blobs to the gc: %s", receipt.id, exc)
            return receipt
        db.run(receipts.mark_blobs_deleted, receipt_ids=[receipt.id], at=datetime.now(UTC))
        receipt = db.run(receipts.get_receipt, tenant_id=tenant_id, receipt_id=receipt.id)
    return receipt


def _forget(
    db: Database,
    registry: Registry,
    *,
    queue: JobQueue,
    tenant_id: int,
    subject: Subject,
    selection: RecordSelection,
    actor: str,
    now: datetime,
    purge: bool,
) -> DeletionReceipt:
    user_id = db.run(
        record_deletion.lock_subject, tenant_id=tenant_id, external_id=subject.external_id, kind=subject.kind
    )
    if user_id is None:
        raise NotFoundError(f"{subject.kind} {subject.name!r} not found")
    records = db.run(
        record_deletion.select_records,
        user_id=user_id,
        ids=selection.ids,
        since=selection.since,
        until=selection.until,
        metadata=dict(selection.metadata),
    )
    record_ids = [r.id for r in records]
    trained = db.run(record_deletion.versions_trained_on, user_id=user_id, record_ids=record_ids)
    revoked = _with_descendants(db, registry, tenant_id=tenant_id, version_ids=trained)
    adapter_names = _roll_back_live(registry, queue=queue, tenant_id=tenant_id, revoked=revoked, actor=actor)
    db.run(record_deletion.revoke_versions, version_ids=[v.id for v in revoked], at=now)
    db.run(record_deletion.delete_records, user_id=user_id, record_ids=record_ids)
    report_blobs = db.run(record_deletion.qa_report_blobs, version_ids=[v.id for v in revoked])
    receipt = db.run(
        receipts.insert_receipt,
        tenant_id=tenant_id,
        kind=DeletionKind.RECORDS,
        subject=f"{subject.kind}:{subject.name}",
        actor=actor,
        request=selection.request(),
        record_hashes=[r.content_hash for r in records],
        revoked_versions=[
            {
                "adapter": adapter_names[v.adapter_id],
                "number": v.number,
                "version_id": v.id,
                "sha256": v.sha256,
            }
            for v in revoked
        ],
        blobs=[*(v.sha256 for v in revoked), *report_blobs],
        purge_after=now if purge else now + registry.gc_grace,
        adapter_ids=sorted(adapter_names),
    )
    record_event(
        db,
        tenant_id=tenant_id,
        actor=actor,
        action=AuditAction.DELETE_RECORDS,
        target=f"{subject.kind}:{subject.name}",
        details={
            "receipt_id": receipt.id,
            "record_ids": record_ids,
            "record_hashes": list(receipt.record_hashes),
            "revoked_version_ids": [v.id for v in revoked],
            "purge": purge,
        },
    )
    logger.info(
        "%s: forgot %d records, revoked %d versions (receipt %s)",
        subject.label,
        len(records),
        len(revoked),
        receipt.id,
    )
    return receipt


def _with_descendants(
    db: Database, registry: Registry, *, tenant_id: int, version_ids: Iterable[int]
) -> list[AdapterVersion]:
    """The versions and all their lineage descendants that are not revoked yet, by id (tenant-scoped)."""
    repo = RegistryRepository(dialect=db.dialect)
    found: set[int] = set()
    for version_id in version_ids:
        found.add(version_id)
        edges = db.run(repo.lineage_edges, version_id=version_id, direction="descendants")
        found.update(e.child_version_id for e in edges)
    versions = [registry.get_version_by_id(tenant_id=tenant_id, version_id=v) for v in sorted(found)]
    return [v for v in versions if v.status != VersionStatus.REVOKED]


def _roll_back_live(
    registry: Registry, *, queue: JobQueue, tenant_id: int, revoked: Sequence[AdapterVersion], actor: str
) -> dict[int, str]:
    """Move each affected adapter's ``live`` off a revoked version (see the module docstring); the adapters'
    names by id."""
    revoked_ids = {v.id for v in revoked}
    names: dict[int, str] = {}
    for adapter_id in sorted({v.adapter_id for v in revoked}):
        adapter = registry.get_adapter(tenant_id=tenant_id, adapter_id=adapter_id)
        names[adapter_id] = adapter.name
        live = registry.live_version(tenant_id=tenant_id, adapter_id=adapter_id)
        if live is None or live.id not in revoked_ids:
            continue
        earlier = earlier_live_versions(
            registry, tenant_id=tenant_id, adapter_id=adapter_id, below=live.number, excluding=revoked_ids
        )
        target = earlier[0] if earlier else None
        move_live(
            registry=registry,
            queue=queue,
            tenant_id=tenant_id,
            adapter=adapter,
            action="rollback",
            number=None if target is None else target.number,
            actor=actor,
            reason=RECORDS_DELETED,
            cause=f"task adapter {adapter.name!r}: version {live.number} revoked (records deleted)",
        )
    return names


def _queue_rebuild(
    db: Database, registry: Registry, *, scheduler: Scheduler, receipt: DeletionReceipt, subject: Subject
) -> DeletionReceipt:
    """Queue the train job that rebuilds the subject's own adapter when it lost versions and the subject has
    records newer than what its live version was trained on; the receipt with the job's id."""
    adapter = registry.find_adapter(
        tenant_id=receipt.tenant_id,
        owner_user_id=None if subject.is_task else _user_id(db, receipt.tenant_id, subject),
        name=subject.task_name or PERSONAL_ADAPTER,
    )
    if adapter is None or adapter.id not in receipt.adapter_ids:
        return receipt
    live = registry.live_version(tenant_id=receipt.tenant_id, adapter_id=adapter.id)
    through = None
    if live is not None and live.dataset_snapshot_id is not None:
        through = get_snapshot(db, snapshot_id=live.dataset_snapshot_id).max_record_id
    user_id = _user_id(db, receipt.tenant_id, subject)
    if user_id is None or not db.run(record_deletion.has_records_after, user_id=user_id, after_id=through):
        return receipt
    try:
        if subject.is_task:
            submitted = scheduler.train_task_now(tenant_id=receipt.tenant_id, task_name=subject.name)
        else:
            submitted = scheduler.train_now(tenant_id=receipt.tenant_id, user_external_id=subject.name)
    except LorafleetError as exc:  # e.g. no backlog by the scheduler's rule: its loop decides later
        logger.info("%s: no rebuild queued (%s)", subject.label, exc)
        return receipt
    db.run(receipts.set_rebuild_job, receipt_id=receipt.id, job_id=submitted.job.id)
    return replace(receipt, rebuild_job_id=submitted.job.id)


def _user_id(db: Database, tenant_id: int, subject: Subject) -> int | None:
    return db.run(
        record_deletion.find_subject_id,
        tenant_id=tenant_id,
        external_id=subject.external_id,
        kind=subject.kind,
    )


def get_receipt(db: Database, *, tenant_id: int, receipt_id: str) -> DeletionReceipt:
    """The tenant's receipt (``ValidationError`` for a malformed id, ``NotFoundError`` for another's)."""
    receipts.check_receipt_id(receipt_id)
    return db.run(receipts.get_receipt, tenant_id=tenant_id, receipt_id=receipt_id)


def list_receipts(
    db: Database, *, tenant_id: int, subject: Subject | None = None, limit: int = 100
) -> list[DeletionReceipt]:
    """The tenant's receipts, newest first, optionally one subject's."""
    label = None if subject is None else f"{subject.kind}:{subject.name}"
    return db.run(receipts.list_receipts, tenant_id=tenant_id, limit=limit, subject=label)


def rebuild_status(
    db: Database, registry: Registry, *, receipt: DeletionReceipt, queue: JobQueue | None = None
) -> RebuildStatus:
    """The rebuild job's state, and the first version of each revoked adapter registered after the deletion that
    is not revoked (an adapter erased since is left out)."""
    state = None
    if receipt.rebuild_job_id is not None:
        try:
            job = (queue or JobQueue(db)).get(tenant_id=receipt.tenant_id, job_id=receipt.rebuild_job_id)
            state = job.state
        except NotFoundError:
            state = None
    versions = []
    for adapter_id in receipt.adapter_ids:
        try:
            adapter = registry.get_adapter(tenant_id=receipt.tenant_id, adapter_id=adapter_id)
            found = registry.list_versions(tenant_id=receipt.tenant_id, adapter_id=adapter_id)
        except NotFoundError:
            continue
        clean = [v for v in found if v.created_at > receipt.created_at and v.status != VersionStatus.REVOKED]
        if clean:
            first = clean[0]
            versions.append(RebuiltVersion(adapter.name, first.number, first.id, first.status))
    return RebuildStatus(receipt.rebuild_job_id, state, tuple(versions))


def _check_ids(ids: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
        raise ValidationError("ids: must be a list of record ids")
    if not ids:
        raise ValidationError("ids: give at least one record id")
    if len(ids) > MAX_IDS:
        raise ValidationError(f"ids: at most {MAX_IDS} ids in one request")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= MAX_INT64:
            raise ValidationError(f"ids: {i!r} is not a record id (a positive integer)")
    return tuple(sorted(set(ids)))


def _aware(field: str, moment: datetime | None) -> datetime | None:
    if moment is None:
        return None
    if not isinstance(moment, datetime):
        raise ValidationError(f"{field}: must be a date and time")
    if moment.tzinfo is None:
        raise ValidationError(f"{field}: must carry a timezone (e.g. '2026-01-01T00:00:00Z')")
    return moment.astimezone(UTC)


def _check_metadata(metadata: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    if not isinstance(metadata, Mapping):
        raise ValidationError("filter.metadata: must be an object of key/value pairs")
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or not key.isprintable():
            raise ValidationError("filter.metadata: keys must be non-empty printable strings")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"filter.metadata: the value of {key!r} is not JSON") from exc
    return tuple(sorted(metadata.items()))


def _value_hash(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


__all__ = [
    "RECORDS_DELETED",
    "RebuildStatus",
    "RebuiltVersion",
    "RecordSelection",
    "forget_records",
    "get_receipt",
    "list_receipts",
    "rebuild_status",
]
