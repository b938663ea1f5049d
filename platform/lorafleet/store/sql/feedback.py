"""Feedback rows and dataset snapshots in SQL.

Validation lives in ``lorafleet.feedback``; this module only stores records that were already checked. A
record's ``content_hash`` is unique per user, so a batch is deduplicated against the rows already stored
and within itself, and a concurrent ingest of the same record cannot create it twice.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import and_, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from lorafleet.domain import DatasetSnapshot, FeedbackRecord, SubjectKind, VersionStatus
from lorafleet.domain.subject import Subject
from lorafleet.errors import NotFoundError, ValidationError
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import (
    SqlAdapterVersion,
    SqlDatasetSnapshot,
    SqlFeedback,
    SqlUser,
    utcnow,
)
from lorafleet.store.sql.registry_repository import RegistryRepository
from lorafleet.store.sql.rows import chunks, from_row, to_snapshot
from lorafleet.store.sql.tenants import check_page, find_user, get_or_create_user_row

#: Keeps ``IN (...)`` lists well under SQLite's and PostgreSQL's bound-parameter limits.


class NewFeedback(Protocol):
    """A validated record ready to store (``lorafleet.feedback.PreparedFeedback`` is one)."""

    @property
    def kind(self) -> str: ...

    @property
    def payload(self) -> Mapping[str, Any]: ...

    @property
    def content_hash(self) -> str: ...


@dataclass(frozen=True)
class FeedbackBacklog:
    """A user with feedback newer than anything their own adapters were trained on."""

    user_id: int
    tenant_id: int
    external_id: str
    new_records: int
    last_record_id: int
    #: the newest feedback id any of the user's adapter versions was trained on; None if never trained
    trained_through_id: int | None
    #: ``user``, or ``task`` for a shared task's dataset (``external_id`` is then its ``task_subject_id``)
    kind: str = SubjectKind.USER


def to_feedback_record(row: SqlFeedback) -> FeedbackRecord:
    return from_row(FeedbackRecord, row, payload=dict(row.payload))


def _ids_by_hash(session: Session, *, user_id: int, hashes: Iterable[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for chunk in chunks(sorted(set(hashes))):
        query = select(SqlFeedback.content_hash, SqlFeedback.id).where(
            SqlFeedback.user_id == user_id, SqlFeedback.content_hash.in_(chunk)
        )
        found.update({content_hash: record_id for content_hash, record_id in session.execute(query)})
    return found


def _first_of_each_hash(records: Sequence[NewFeedback], *, known: Mapping[str, int]) -> list[NewFeedback]:
    """The records to insert: the first occurrence of each hash that is not stored yet, in input order."""
    fresh: dict[str, NewFeedback] = {}
    for record in records:
        if record.content_hash not in known:
            fresh.setdefault(record.content_hash, record)
    return list(fresh.values())


def _insert_new(session: Session, *, user_id: int, records: Sequence[NewFeedback]) -> dict[str, int]:
    """Insert with ``ON CONFLICT DO NOTHING``: a row a concurrent ingest committed first is skipped, not an
    error. Returns the ids of the rows this call created, by content hash."""
    if not records:
        return {}
    dialect_insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(SqlFeedback)
        .on_conflict_do_nothing(index_elements=["user_id", "content_hash"])
        .returning(SqlFeedback.content_hash, SqlFeedback.id)
    )
    now = utcnow()
    rows = [
        {
            "user_id": user_id,
            "kind": r.kind,
            "payload": dict(r.payload),
            "content_hash": r.content_hash,
            "created_at": now,
        }
        for r in records
    ]
    return {content_hash: record_id for content_hash, record_id in session.execute(statement, rows)}


def insert_feedback(
    db: Database,
    *,
    tenant_id: int,
    external_id: str,
    records: Sequence[NewFeedback],
    kind: str = SubjectKind.USER,
    task_adapter: str | None = None,
) -> tuple[list[int], int]:
    """Store a validated batch in one transaction, creating the subject (a user, or a task's dataset with
    ``kind="task"``) if absent; with ``task_adapter``, the tenant's owner-less (task) adapter of that name is
    created in the same transaction when absent.

    Returns the record ids in input order (a duplicate gets the id of the row it duplicates) and how many
    rows were created.
    """
    with db.session() as session:
        user = get_or_create_user_row(session, tenant_id=tenant_id, external_id=external_id, kind=kind)
        if task_adapter is not None:
            RegistryRepository(dialect=db.dialect).ensure_adapter(
                session, tenant_id=tenant_id, owner_user_id=None, name=task_adapter
            )
        ids = _ids_by_hash(session, user_id=user.id, hashes=(r.content_hash for r in records))
        fresh = _first_of_each_hash(records, known=ids)
        created = _insert_new(session, user_id=user.id, records=fresh)
        ids.update(created)
        raced = [r.content_hash for r in fresh if r.content_hash not in created]
        ids.update(_ids_by_hash(session, user_id=user.id, hashes=raced))
        return [ids[r.content_hash] for r in records], len(created)


def list_feedback(
    db: Database,
    *,
    tenant_id: int,
    external_id: str,
    after_id: int | None = None,
    limit: int = 100,
    kind: str = SubjectKind.USER,
) -> list[FeedbackRecord]:
    """A subject's records in id order, after ``after_id`` (keyset paging over the ``(user_id, id)`` index)."""
    check_page(limit=limit)
    with db.session() as session:
        user = find_user(session, tenant_id=tenant_id, external_id=external_id, kind=kind)
        if user is None:
            what = "task" if kind == SubjectKind.TASK else "user"
            shown = Subject.from_row(kind, external_id).name
            raise NotFoundError(f"{what} {shown!r} not found")
        query = select(SqlFeedback).where(SqlFeedback.user_id == user.id)
        if after_id is not None:
            query = query.where(SqlFeedback.id > after_id)
        rows = session.scalars(query.order_by(SqlFeedback.id).limit(limit))
        return [to_feedback_record(row) for row in rows]


def _trained_through() -> Any:
    """Per subject: the newest feedback id its versions were trained on. The snapshot names the subject
    whose records it holds (a user's, or a task's dataset row), so this one grouping serves both kinds. Revoked
    versions (``lorafleet.workflows.deletion``) do not count: their data is trained again by the rebuild."""
    return (
        select(
            SqlDatasetSnapshot.user_id.label("user_id"),
            func.max(SqlDatasetSnapshot.max_record_id).label("through"),
        )
        .join(SqlAdapterVersion, SqlAdapterVersion.dataset_snapshot_id == SqlDatasetSnapshot.id)
        .where(
            SqlDatasetSnapshot.user_id.is_not(None),
            SqlAdapterVersion.status != VersionStatus.REVOKED.value,
        )
        .group_by(SqlDatasetSnapshot.user_id)
        .cte("trained_through")
    )


def read_backlog(
    session: Session,
    *,
    tenant_id: int | None = None,
    min_new_records: int = 1,
    limit: int = 1000,
    after_user_id: int | None = None,
) -> list[FeedbackBacklog]:
    """Subjects (users, and tasks' datasets: ``kind``) with at least ``min_new_records`` records newer than
    what their adapters were trained on.

    "Trained on" is the highest ``max_record_id`` among the dataset snapshots (of the subject's records) that
    versions were trained on: candidate, live, rejected or archived alike, revoked ones not (a rejected version still consumed
    its data, so the scheduler does not retrain on the same records in a loop; a version without a snapshot,
    e.g. an import, does not reset it). One query; the new records are a range scan of ``ix_feedback_user_id_id``.
    Results are in user id order; ``after_user_id`` pages through them (keyset). Runs in the caller's
    session, so the scheduler reads it in the transaction that decides and inserts jobs.
    """
    if min_new_records < 1:
        raise ValidationError("min_new_records: must be at least 1")
    check_page(limit=limit)
    trained = _trained_through()
    new_records = func.count(SqlFeedback.id)
    query = (
        select(SqlUser.id, SqlUser.tenant_id, SqlUser.external_id, trained.c.through, SqlUser.kind)
        .add_columns(new_records, func.max(SqlFeedback.id))
        .outerjoin(trained, trained.c.user_id == SqlUser.id)
        .join(
            SqlFeedback,
            and_(SqlFeedback.user_id == SqlUser.id, SqlFeedback.id > func.coalesce(trained.c.through, 0)),
        )
        .group_by(SqlUser.id, SqlUser.tenant_id, SqlUser.external_id, trained.c.through, SqlUser.kind)
        .having(new_records >= min_new_records)
        .order_by(SqlUser.id)
        .limit(limit)
    )
    if tenant_id is not None:
        query = query.where(SqlUser.tenant_id == tenant_id)
    if after_user_id is not None:
        query = query.where(SqlUser.id > after_user_id)
    return [_to_backlog(row) for row in session.execute(query)]


def _to_backlog(row: Any) -> FeedbackBacklog:
    user_id, tenant_id, external_id, through, kind, new_records, last_record_id = row
    return FeedbackBacklog(
        user_id=user_id,
        tenant_id=tenant_id,
        external_id=external_id,
        new_records=new_records,
        last_record_id=last_record_id,
        trained_through_id=through,
        kind=kind,
    )


def snapshot_hash(records: Iterable[tuple[int, str]]) -> str:
    """sha256 of the canonical JSON of ``[[id, content_hash], ...]`` sorted by id: names ids and content."""
    pairs = sorted([int(record_id), content_hash] for record_id, content_hash in records)
    encoded = json.dumps(pairs, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(encoded.encode("ascii")).hexdigest()


def _check_record_ids(record_ids: Iterable[int]) -> list[int]:
    ids = list(record_ids)
    if not ids:
        raise ValidationError("record_ids: a snapshot needs at least one record")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ValidationError("record_ids: must be integers")
    return sorted(set(ids))


def _content_hashes(session: Session, *, user_id: int | None, record_ids: Sequence[int]) -> dict[int, str]:
    """Content hash by record id; records of other users count as missing when ``user_id`` is given."""
    found: dict[int, str] = {}
    for chunk in chunks(record_ids):
        query = select(SqlFeedback.id, SqlFeedback.content_hash).where(SqlFeedback.id.in_(chunk))
        if user_id is not None:
            query = query.where(SqlFeedback.user_id == user_id)
        found.update({record_id: content_hash for record_id, content_hash in session.execute(query)})
    missing = [i for i in record_ids if i not in found]
    if missing:
        raise NotFoundError(f"feedback records not found: {missing[:10]}")
    return found


def create_snapshot(
    db: Database, *, user_id: int | None, record_ids: Iterable[int], details: Mapping[str, Any] | None = None
) -> DatasetSnapshot:
    """Record which feedback a training run used: the sorted, deduplicated ids, their range and a hash.

    With ``user_id`` every record must be that user's; ``None`` is for shared (task) datasets.
    """
    ids = _check_record_ids(record_ids)
    with db.session() as session:
        return insert_snapshot(session, user_id=user_id, record_ids=ids, details=details)


def insert_snapshot(
    session: Session,
    *,
    user_id: int | None,
    record_ids: Iterable[int],
    details: Mapping[str, Any] | None = None,
) -> DatasetSnapshot:
    """``create_snapshot`` in the caller's transaction, so a snapshot commits with the version that uses it
    (a training job writes both in its fenced transaction: no snapshot without its version)."""
    ids = _check_record_ids(record_ids)
    hashes = _content_hashes(session, user_id=user_id, record_ids=ids)
    row = SqlDatasetSnapshot(
        user_id=user_id,
        min_record_id=ids[0],
        max_record_id=ids[-1],
        record_ids=ids,
        record_count=len(ids),
        content_hash=snapshot_hash(hashes.items()),
        details=dict(details or {}),
    )
    session.add(row)
    session.flush()
    return to_snapshot(row)


def get_snapshot(db: Database, *, snapshot_id: int) -> DatasetSnapshot:
    with db.session() as session:
        row = session.get(SqlDatasetSnapshot, snapshot_id)
        if row is None:
            raise NotFoundError(f"dataset snapshot {snapshot_id} not found")
        return to_snapshot(row)
