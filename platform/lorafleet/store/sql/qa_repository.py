"""SQL side of QA: report rows, and the reads QA needs (feedback for holdouts, enrolments, routing keys).

Every method runs in a session the caller opened (``Database.session()`` or a job's fenced transaction), so a
report row commits together with the decision it records. Methods return plain frozen objects, never ORM rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from lorafleet.domain import LIVE, AdapterKind, FeedbackRecord, QADecision, QAKind, SubjectKind
from lorafleet.domain.subject import task_subject_id
from lorafleet.errors import NotFoundError
from lorafleet.store.sql.feedback import to_feedback_record
from lorafleet.store.sql.models import (
    SqlAdapter,
    SqlAdapterVersion,
    SqlAlias,
    SqlEnrolment,
    SqlFeedback,
    SqlQAReport,
    SqlUser,
    utcnow,
)
from lorafleet.store.sql.rows import DialectRepository, chunks, from_row


@dataclass(frozen=True)
class _ReportFields:
    """What a QA report row holds besides its id and time (shared by ``NewQAReport`` and ``QAReport``)."""

    tenant_id: int
    version_id: int
    kind: QAKind
    policy_version: str
    decision: QADecision
    reasons: tuple[str, ...]
    summary: dict[str, Any]
    blob_sha256: str
    blob_uri: str
    blob_size_bytes: int
    job_id: int | None


@dataclass(frozen=True)
class NewQAReport(_ReportFields):
    """A report row about to be inserted (its blob is already in the object store)."""


@dataclass(frozen=True)
class QAReport(_ReportFields):
    """One QA run on a version: what was decided and why; the full matrix is the JSON blob ``blob_sha256``."""

    id: int
    created_at: datetime


class QARepository(DialectRepository):
    """Stateless SQL for QA (the dialect is kept for symmetry with the other repositories)."""

    # --- reports ------------------------------------------------------------------------------------------
    def insert_report(self, session: Session, *, new: NewQAReport) -> QAReport:
        """Insert a report; a second report of the same job violates ``uq_qa_reports_job_id``."""
        values = asdict(new) | {"reasons": list(new.reasons)}  # the JSON column holds a list
        row = SqlQAReport(**values, created_at=utcnow())
        session.add(row)
        session.flush()
        return _report(row)

    def report_for_job(self, session: Session, *, job_id: int) -> QAReport | None:
        row = session.scalar(select(SqlQAReport).where(SqlQAReport.job_id == job_id))
        return None if row is None else _report(row)

    def get_report(self, session: Session, *, tenant_id: int | None, report_id: int) -> QAReport:
        """The report; ``NotFoundError`` if missing or another tenant's (``tenant_id`` None: any)."""
        stmt = select(SqlQAReport).where(SqlQAReport.id == report_id)
        if tenant_id is not None:
            stmt = stmt.where(SqlQAReport.tenant_id == tenant_id)
        row = session.scalar(stmt)
        if row is None:
            raise NotFoundError(f"QA report {report_id} not found")
        return _report(row)

    def reports_for_versions(
        self, session: Session, *, tenant_id: int, version_ids: Iterable[int]
    ) -> dict[int, list[QAReport]]:
        """The tenant's reports on each version, oldest first."""
        out: dict[int, list[QAReport]] = {}
        for chunk in chunks(sorted(set(version_ids))):
            stmt = (
                select(SqlQAReport)
                .where(SqlQAReport.tenant_id == tenant_id, SqlQAReport.version_id.in_(chunk))
                .order_by(SqlQAReport.id)
            )
            for row in session.scalars(stmt):
                out.setdefault(row.version_id, []).append(_report(row))
        return out

    def referenced_sha256s(self, session: Session, *, digests: Sequence[str]) -> set[str]:
        """The digests among ``digests`` that some report's blob is (index on ``blob_sha256``)."""
        stmt = select(SqlQAReport.blob_sha256).where(SqlQAReport.blob_sha256.in_(list(digests))).distinct()
        return set(session.scalars(stmt))

    # --- what QA reads --------------------------------------------------------------------------------------
    def user_records(self, session: Session, *, user_id: int, through_id: int | None) -> list[FeedbackRecord]:
        """A user's feedback in id order, up to ``through_id`` (None: all)."""
        stmt = select(SqlFeedback).where(SqlFeedback.user_id == user_id)
        if through_id is not None:
            stmt = stmt.where(SqlFeedback.id <= through_id)
        return [to_feedback_record(row) for row in session.scalars(stmt.order_by(SqlFeedback.id))]

    def task_subject_user_id(self, session: Session, *, tenant_id: int, adapter_id: int) -> int | None:
        """The subject row holding a task adapter's feedback (``lorafleet.workflows.tasks``), or None (no feedback yet)."""
        name = session.scalar(
            select(SqlAdapter.name).where(
                SqlAdapter.id == adapter_id,
                SqlAdapter.tenant_id == tenant_id,
                SqlAdapter.owner_user_id.is_(None),
            )
        )
        if name is None:
            return None
        found = session.scalar(
            select(SqlUser.id).where(
                SqlUser.tenant_id == tenant_id,
                SqlUser.kind == SubjectKind.TASK,
                SqlUser.external_id == task_subject_id(name),
            )
        )
        return None if found is None else int(found)

    def records_by_ids(
        self, session: Session, *, tenant_id: int, record_ids: Sequence[int]
    ) -> list[FeedbackRecord]:
        """The tenant's feedback records among ``record_ids``, in id order (others' are left out)."""
        out: list[FeedbackRecord] = []
        for chunk in chunks(sorted(set(record_ids))):
            stmt = (
                select(SqlFeedback)
                .join(SqlUser, SqlUser.id == SqlFeedback.user_id)
                .where(SqlUser.tenant_id == tenant_id, SqlFeedback.id.in_(chunk))
                .order_by(SqlFeedback.id)
            )
            out.extend(to_feedback_record(row) for row in session.scalars(stmt))
        return out

    def routing(
        self, session: Session, *, version_id: int
    ) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """A version's routing key and routing claim (either None when not stored)."""
        found = session.execute(
            select(SqlAdapterVersion.routing_key, SqlAdapterVersion.routing_claim).where(
                SqlAdapterVersion.id == version_id
            )
        ).first()
        key, claim = (None, None) if found is None else found
        return (
            None if key is None else tuple(float(v) for v in key),
            None if claim is None else tuple(float(v) for v in claim),
        )

    def user_external_id(self, session: Session, *, tenant_id: int, user_id: int) -> str:
        found = session.scalar(
            select(SqlUser.external_id).where(SqlUser.id == user_id, SqlUser.tenant_id == tenant_id)
        )
        if found is None:
            raise NotFoundError(f"user {user_id} not found")
        return str(found)

    def enrolled_user_ids(self, session: Session, *, tenant_id: int, adapter_id: int) -> list[int]:
        stmt = select(SqlEnrolment.user_id).where(
            SqlEnrolment.tenant_id == tenant_id, SqlEnrolment.adapter_id == adapter_id
        )
        return sorted(int(u) for u in session.scalars(stmt))

    def live_personal_adapters(
        self, session: Session, *, tenant_id: int, user_ids: Sequence[int]
    ) -> list[tuple[int, int]]:
        """``(adapter_id, user_id)`` of the users' own LoRA adapters that have a live version."""
        stmt = (
            select(SqlAdapter.id, SqlAdapter.owner_user_id)
            .join(SqlAlias, and_(SqlAlias.adapter_id == SqlAdapter.id, SqlAlias.name == LIVE))
            .where(
                SqlAdapter.tenant_id == tenant_id,
                SqlAdapter.kind == AdapterKind.LORA,
                SqlAdapter.owner_user_id.in_(list(user_ids)),
                SqlAlias.version_id.is_not(None),
            )
            .order_by(SqlAdapter.id)
        )
        return [(int(a), int(u)) for a, u in session.execute(stmt) if u is not None]


def _report(row: SqlQAReport) -> QAReport:
    return from_row(
        QAReport,
        row,
        reasons=tuple(str(r) for r in row.reasons or ()),
        summary=dict(row.summary or {}),
    )


__all__ = ["NewQAReport", "QADecision", "QAKind", "QAReport", "QARepository"]
