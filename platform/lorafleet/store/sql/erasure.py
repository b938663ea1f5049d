"""Erasing one user: every row of theirs, in the caller's transaction (``Database.run``), counted per kind.

``erase_user`` locks the user row first (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN IMMEDIATE``
already serialises writers), so it and a training job's registration for the user happen one after the other.
Before deleting, it reads what the receipt needs: the content hashes of their feedback, their versions (adapter
name, number, id, blob digest) and the blob digests of those versions and of their QA reports.

What goes: their feedback and dataset snapshots; the adapters they own (both kinds, ``lora`` and the learned
``gate``) with their versions (and so their routing keys, which are columns of the versions), aliases (first: an
alias's foreign key to its version is ``RESTRICT``), alias history, lineage edges and QA reports; their
enrolments in shared task adapters and the enrolment events; their gate settings; their ``job_users`` rows; the
user row. Shared task adapters stay as they are (only the user's enrolment rows go).

Jobs: the rows stay (a finished job is the record of what ran; its payload and result name the user's external
id). Active jobs that exist only for this user are cancelled, as ``POST /v1/jobs/{id}/cancel`` does (a queued
one at once, a running one at its next step): a train job whose only subject is the user, a QA job of one of
their versions or adapters, an import into their adapter. A train job that also trains other users is left
running: its other subjects train as planned, and its registration skips a subject whose user row is gone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from lorafleet.domain import JobKind, SubjectKind
from lorafleet.errors import NotFoundError, ValidationError
from lorafleet.store.sql.jobs_repository import JobsRepository
from lorafleet.store.sql.models import (
    ACTIVE_JOB_STATES,
    SqlAdapter,
    SqlAdapterVersion,
    SqlAlias,
    SqlAliasEvent,
    SqlDatasetSnapshot,
    SqlEnrolment,
    SqlEnrolmentEvent,
    SqlFeedback,
    SqlGateSettings,
    SqlJob,
    SqlJobUser,
    SqlLineageEdge,
    SqlQAReport,
    SqlUser,
)
from lorafleet.store.sql.rows import chunks


@dataclass(frozen=True)
class ErasedVersion:
    """A version that was erased: its adapter's name, number, id and blob digest (a receipt's revoked version)."""

    adapter: str
    number: int
    version_id: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ErasedUser:
    """What ``erase_user`` removed: ``erased`` counts rows per kind (a kind with none is counted 0)."""

    user_id: int
    external_id: str
    record_hashes: tuple[str, ...]
    versions: tuple[ErasedVersion, ...]
    #: digests of the erased versions' blobs and of their QA reports' blobs
    blobs: tuple[str, ...]
    adapter_ids: tuple[int, ...]
    erased: dict[str, int]
    #: active jobs cancelled because they existed only for this user
    cancelled_jobs: tuple[int, ...]


def erase_user(
    session: Session, *, tenant_id: int, external_id: str, actor: str, now: datetime
) -> ErasedUser:
    """Delete everything of the tenant's user ``external_id`` (see the module); ``NotFoundError`` for a user the
    tenant does not have (nothing changes), ``ValidationError`` for a task's subject row."""
    user_id = _locked_user(session, tenant_id=tenant_id, external_id=external_id)
    owned = select(SqlAdapter.id, SqlAdapter.name).where(SqlAdapter.owner_user_id == user_id)
    adapters = {int(adapter_id): str(name) for adapter_id, name in session.execute(owned)}
    versions = _versions(session, adapter_names=adapters)
    version_ids = [v.version_id for v in versions]
    reports = _in(session, select(SqlQAReport.blob_sha256), SqlQAReport.version_id, version_ids)
    hashes = sorted(session.scalars(select(SqlFeedback.content_hash).where(SqlFeedback.user_id == user_id)))
    cancelled = _cancel_jobs(
        session,
        tenant_id=tenant_id,
        user=(user_id, external_id),
        adapter_ids=set(adapters),
        version_ids=set(version_ids),
        actor=actor,
        now=now,
    )
    erased = {"routing_keys": _count_routing_keys(session, version_ids)}
    erased |= _delete_adapters(session, adapter_ids=list(adapters), version_ids=version_ids)
    erased |= _delete_user_rows(session, user_id=user_id)
    return ErasedUser(
        user_id=user_id,
        external_id=external_id,
        record_hashes=tuple(hashes),
        versions=tuple(versions),
        blobs=tuple(sorted({v.sha256 for v in versions} | set(reports))),
        adapter_ids=tuple(sorted(adapters)),
        erased=erased,
        cancelled_jobs=tuple(cancelled),
    )


def _locked_user(session: Session, *, tenant_id: int, external_id: str) -> int:
    """The user's id, its row under a row lock (PostgreSQL ``FOR UPDATE``; SQLite holds the write lock already)."""
    query = (
        select(SqlUser)
        .where(SqlUser.tenant_id == tenant_id, SqlUser.external_id == external_id)
        .with_for_update()
    )
    row = session.scalars(query).one_or_none()
    if row is None:
        raise NotFoundError(f"user {external_id!r} not found")
    if row.kind != SubjectKind.USER:
        raise ValidationError("user_id: names a shared task's dataset, not a user")
    return int(row.id)


def _versions(session: Session, *, adapter_names: dict[int, str]) -> list[ErasedVersion]:
    query = select(
        SqlAdapterVersion.adapter_id, SqlAdapterVersion.number, SqlAdapterVersion.id, SqlAdapterVersion.sha256
    )
    rows = _in(session, query, SqlAdapterVersion.adapter_id, list(adapter_names), scalars=False)
    found = [ErasedVersion(adapter_names[a], int(n), int(i), str(s)) for a, n, i, s in rows]
    return sorted(found, key=lambda v: (v.adapter, v.number))


def _in(
    session: Session, query: Any, column: Any, values: Sequence[int], *, scalars: bool = True
) -> list[Any]:
    """``query`` where ``column IN values``, in chunks (SQLite caps a statement's parameters)."""
    found: list[Any] = []
    for chunk in chunks(sorted(set(values))):
        stmt = query.where(column.in_(list(chunk)))
        found.extend(session.scalars(stmt) if scalars else session.execute(stmt).tuples())
    return found


def _count_routing_keys(session: Session, version_ids: Sequence[int]) -> int:
    """Versions with a routing key (read, not filtered in SQL: the JSON column may hold a JSON ``null``)."""
    keys = _in(session, select(SqlAdapterVersion.routing_key), SqlAdapterVersion.id, version_ids)
    return sum(1 for key in keys if key is not None)


def _deleted(session: Session, statement: Any) -> int:
    return int(getattr(session.execute(statement), "rowcount", 0) or 0)


def _delete_in(session: Session, model: Any, column: Any, values: Sequence[int]) -> int:
    return sum(
        _deleted(session, delete(model).where(column.in_(list(c)))) for c in chunks(sorted(set(values)))
    )


def _delete_adapters(
    session: Session, *, adapter_ids: Sequence[int], version_ids: Sequence[int]
) -> dict[str, int]:
    """The user's adapters and all that hangs on them; aliases before versions (their foreign key is RESTRICT)."""
    counts = {
        "aliases": _delete_in(session, SqlAlias, SqlAlias.adapter_id, adapter_ids),
        "alias_history": _delete_in(session, SqlAliasEvent, SqlAliasEvent.adapter_id, adapter_ids),
        "qa_reports": _delete_in(session, SqlQAReport, SqlQAReport.version_id, version_ids),
    }
    edges = 0
    for chunk in chunks(sorted(set(version_ids))):
        ids = list(chunk)
        edges += _deleted(
            session,
            delete(SqlLineageEdge).where(
                or_(SqlLineageEdge.child_version_id.in_(ids), SqlLineageEdge.parent_version_id.in_(ids))
            ),
        )
    counts["lineage_edges"] = edges
    counts["adapter_versions"] = _delete_in(
        session, SqlAdapterVersion, SqlAdapterVersion.adapter_id, adapter_ids
    )
    counts["adapters"] = _delete_in(session, SqlAdapter, SqlAdapter.id, adapter_ids)
    return counts


def _delete_user_rows(session: Session, *, user_id: int) -> dict[str, int]:
    """The rows keyed by the user, then the user row itself (after its adapters: they reference it)."""
    columns: dict[str, Any] = {
        "enrolment_events": SqlEnrolmentEvent.user_id,
        "enrolments": SqlEnrolment.user_id,
        "gate_settings": SqlGateSettings.user_id,
        "job_users": SqlJobUser.user_id,
        "dataset_snapshots": SqlDatasetSnapshot.user_id,
        "feedback": SqlFeedback.user_id,
    }
    counts = {
        kind: _deleted(session, delete(column.class_).where(column == user_id))
        for kind, column in columns.items()
    }
    counts["users"] = _deleted(session, delete(SqlUser).where(SqlUser.id == user_id))
    return counts


def _cancel_jobs(
    session: Session,
    *,
    tenant_id: int,
    user: tuple[int, str],
    adapter_ids: set[int],
    version_ids: set[int],
    actor: str,
    now: datetime,
) -> list[int]:
    """Cancel the tenant's active jobs that exist only for this user (see the module); their ids."""
    active = session.execute(
        select(SqlJob.id, SqlJob.kind, SqlJob.payload).where(
            SqlJob.tenant_id == tenant_id, SqlJob.state.in_(ACTIVE_JOB_STATES)
        )
    ).tuples()
    mine = [
        job_id
        for job_id, kind, payload in active
        if _only_for(kind, payload or {}, user, adapter_ids, version_ids)
    ]
    trained = _train_jobs_of_only(session, user_id=user[0])
    repo = JobsRepository(dialect=session.get_bind().dialect.name)
    ids = sorted(set(mine) | trained)
    for job_id in ids:
        repo.request_cancel(session, tenant_id=tenant_id, job_id=job_id, actor=actor, now=now)
    return ids


def _only_for(
    kind: str, payload: dict[str, Any], user: tuple[int, str], adapter_ids: set[int], version_ids: set[int]
) -> bool:
    """A QA job of the user's version or adapter, or an import into the user's adapter."""
    if kind == JobKind.QA:
        recheck = payload.get("recheck")
        adapter_id = recheck.get("adapter_id") if isinstance(recheck, dict) else None
        version_id = payload.get("version_id")
        return (isinstance(version_id, int) and version_id in version_ids) or (
            isinstance(adapter_id, int) and adapter_id in adapter_ids
        )
    if kind == JobKind.IMPORT:
        return payload.get("user") == user[1]
    return False


def _train_jobs_of_only(session: Session, *, user_id: int) -> set[int]:
    """Active jobs whose ``job_users`` are this user alone."""
    theirs = (
        select(SqlJobUser.job_id)
        .join(SqlJob, SqlJob.id == SqlJobUser.job_id)
        .where(SqlJobUser.user_id == user_id, SqlJob.state.in_(ACTIVE_JOB_STATES))
    )
    alone = (
        select(SqlJobUser.job_id)
        .where(SqlJobUser.job_id.in_(theirs))
        .group_by(SqlJobUser.job_id)
        .having(func.count() == 1)
    )
    return set(session.scalars(alone))


__all__ = ["ErasedUser", "ErasedVersion", "erase_user"]
