"""SQL of forgetting records (``lorafleet.workflows.deletion``): the subject's row lock, the records a request
selects, the versions whose dataset snapshots hold them, revoking those versions and deleting the rows.

Every function runs in a session the caller opened (``Database.run``), inside the deletion's unit of work.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, null, select, update
from sqlalchemy.orm import Session

from lorafleet.domain import VersionStatus
from lorafleet.errors import NotFoundError
from lorafleet.store.sql.models import (
    SqlAdapterVersion,
    SqlDatasetSnapshot,
    SqlFeedback,
    SqlQAReport,
    SqlUser,
)
from lorafleet.store.sql.rows import chunks


@dataclass(frozen=True)
class SelectedRecord:
    """A record a deletion selected: its id and content hash (never its content)."""

    id: int
    content_hash: str


def lock_subject(session: Session, *, tenant_id: int, external_id: str, kind: str) -> int | None:
    """The subject's row id under its row lock (``FOR NO KEY UPDATE`` on PostgreSQL; SQLite's write lock is held
    already), or None when the tenant has no such subject. A deletion and a training job's registration both take
    it first, so they serialise per subject; feedback inserts (a foreign-key share lock) are not blocked."""
    found = session.scalar(
        _locked(session, _subject(tenant_id=tenant_id, external_id=external_id, kind=kind))
    )
    return None if found is None else int(found)


def find_subject_id(session: Session, *, tenant_id: int, external_id: str, kind: str) -> int | None:
    """``lock_subject`` without the lock (a read)."""
    found = session.scalar(_subject(tenant_id=tenant_id, external_id=external_id, kind=kind))
    return None if found is None else int(found)


def lock_subject_by_id(session: Session, *, user_id: int) -> bool:
    """``lock_subject`` by row id: whether the subject still exists (a user erased meanwhile is gone)."""
    stmt = select(SqlUser.id).where(SqlUser.id == user_id)
    return session.scalar(_locked(session, stmt)) is not None


def subject_exists(session: Session, *, user_id: int) -> bool:
    """Whether the subject row is still there (no lock: a planning step's check)."""
    return session.scalar(select(SqlUser.id).where(SqlUser.id == user_id)) is not None


def select_records(
    session: Session,
    *,
    user_id: int,
    ids: Sequence[int] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> list[SelectedRecord]:
    """The subject's records named by ``ids`` (each must be one of theirs, else ``NotFoundError`` naming the
    others), or those stored in ``[since, until)`` whose payload ``metadata`` holds every key of ``metadata``
    with an equal value; in id order."""
    if ids is not None:
        found = _by_ids(session, user_id=user_id, ids=ids)
        missing = sorted(set(ids) - {r.id for r in found})
        if missing:
            raise NotFoundError(f"ids: not records of this subject: {missing[:20]}")
        return found
    stmt = select(SqlFeedback.id, SqlFeedback.content_hash, SqlFeedback.payload).where(
        SqlFeedback.user_id == user_id
    )
    if since is not None:
        stmt = stmt.where(SqlFeedback.created_at >= since)
    if until is not None:
        stmt = stmt.where(SqlFeedback.created_at < until)
    wanted = dict(metadata or {})
    out = []
    for record_id, content_hash, payload in session.execute(stmt.order_by(SqlFeedback.id)):
        held = (payload or {}).get("metadata") or {}
        if isinstance(held, dict) and all(k in held and _same(held[k], v) for k, v in wanted.items()):
            out.append(SelectedRecord(int(record_id), str(content_hash)))
    return out


def present_records(session: Session, *, user_id: int, record_ids: Iterable[int]) -> set[int]:
    """Which of ``record_ids`` are still the subject's records."""
    return {r.id for r in _by_ids(session, user_id=user_id, ids=sorted(set(record_ids)))}


def versions_trained_on(session: Session, *, user_id: int, record_ids: Iterable[int]) -> list[int]:
    """Ids of the versions whose dataset snapshot (of this subject's records: new and replayed alike) holds any of
    ``record_ids``; a snapshot without an id list counts by its id range."""
    wanted = set(record_ids)
    if not wanted:
        return []
    stmt = (
        select(SqlAdapterVersion.id, SqlDatasetSnapshot.record_ids)
        .add_columns(SqlDatasetSnapshot.min_record_id, SqlDatasetSnapshot.max_record_id)
        .join(SqlDatasetSnapshot, SqlDatasetSnapshot.id == SqlAdapterVersion.dataset_snapshot_id)
        .where(
            SqlDatasetSnapshot.user_id == user_id,
            SqlDatasetSnapshot.max_record_id >= min(wanted),
            SqlDatasetSnapshot.min_record_id <= max(wanted),
        )
    )
    found = []
    for version_id, ids, low, high in session.execute(stmt):
        held = set(ids) if ids is not None else {i for i in wanted if low <= i <= high}
        if held & wanted:
            found.append(int(version_id))
    return sorted(found)


def revoke_versions(session: Session, *, version_ids: Iterable[int], at: datetime) -> None:
    """Mark the versions ``revoked`` at ``at`` (final: never served, never a promote or rollback target), and
    erase their routing keys and claims, which were computed from their training prompts (a revoked version is
    never routed to)."""
    for chunk in chunks(sorted(set(version_ids))):
        session.execute(
            update(SqlAdapterVersion)
            .where(SqlAdapterVersion.id.in_(chunk))
            .values(
                status=VersionStatus.REVOKED.value, revoked_at=at, routing_key=null(), routing_claim=null()
            )
            .execution_options(synchronize_session=False)
        )


def qa_report_blobs(session: Session, *, version_ids: Iterable[int]) -> list[str]:
    """The blob digests of the QA reports about these versions."""
    found: set[str] = set()
    for chunk in chunks(sorted(set(version_ids))):
        stmt = select(SqlQAReport.blob_sha256).where(SqlQAReport.version_id.in_(chunk)).distinct()
        found.update(str(d) for d in session.scalars(stmt))
    return sorted(found)


def delete_records(session: Session, *, user_id: int, record_ids: Iterable[int]) -> int:
    """Delete the subject's feedback rows with these ids; how many went."""
    deleted = 0
    for chunk in chunks(sorted(set(record_ids))):
        result = session.execute(
            delete(SqlFeedback)
            .where(SqlFeedback.user_id == user_id, SqlFeedback.id.in_(chunk))
            .execution_options(synchronize_session=False)
        )
        deleted += int(getattr(result, "rowcount", 0) or 0)
    return deleted


def has_records_after(session: Session, *, user_id: int, after_id: int | None) -> bool:
    """Whether the subject has a record with an id above ``after_id`` (any record with None)."""
    stmt = select(SqlFeedback.id).where(SqlFeedback.user_id == user_id)
    if after_id is not None:
        stmt = stmt.where(SqlFeedback.id > after_id)
    return session.scalar(stmt.limit(1)) is not None


def _by_ids(session: Session, *, user_id: int, ids: Sequence[int]) -> list[SelectedRecord]:
    found: list[SelectedRecord] = []
    for chunk in chunks(sorted(set(ids))):
        stmt = select(SqlFeedback.id, SqlFeedback.content_hash).where(
            SqlFeedback.user_id == user_id, SqlFeedback.id.in_(chunk)
        )
        found.extend(SelectedRecord(int(i), str(h)) for i, h in session.execute(stmt))
    return sorted(found, key=lambda r: r.id)


def _subject(*, tenant_id: int, external_id: str, kind: str) -> Any:
    return select(SqlUser.id).where(
        SqlUser.tenant_id == tenant_id, SqlUser.external_id == external_id, SqlUser.kind == kind
    )


def _same(a: Any, b: Any) -> bool:
    """JSON equality (``True`` is not ``1``, key order does not matter)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _locked(session: Session, stmt: Any) -> Any:
    if session.get_bind().dialect.name == "postgresql":
        return stmt.with_for_update(key_share=True)
    return stmt


__all__ = [
    "SelectedRecord",
    "delete_records",
    "find_subject_id",
    "has_records_after",
    "lock_subject",
    "lock_subject_by_id",
    "present_records",
    "qa_report_blobs",
    "revoke_versions",
    "select_records",
    "subject_exists",
    "versions_trained_on",
]
