"""SQL side of routing: a user's experts (live versions of own and enrolled adapters), enrolments, gate settings.

Every method runs in a session the caller opened with ``Database.session()``; lookups are tenant-scoped, so an
id of another tenant is reported exactly like a missing one. Methods return the plain frozen objects below,
never ORM rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from lorafleet.domain import FINAL_STATUSES, LIVE, AdapterKind, EnrolmentAction, SubjectKind
from lorafleet.domain.subject import TASK_SUBJECT_PREFIX
from lorafleet.errors import NotFoundError
from lorafleet.store.sql.models import (
    SqlAdapter,
    SqlAdapterVersion,
    SqlAlias,
    SqlEnrolment,
    SqlEnrolmentEvent,
    SqlFeedback,
    SqlGateSettings,
    SqlUser,
    utcnow,
)
from lorafleet.store.sql.rows import DialectRepository, from_row

#: the name of a user's learned-gate adapter (kind ``gate``; one per user)
GATE_ADAPTER_NAME = "gate"


@dataclass(frozen=True)
class LiveAdapterRow:
    """An adapter of a user's experts (own, or an enrolled task adapter) with its live version."""

    adapter_id: int
    adapter_name: str
    owner_user_id: int | None
    kind: AdapterKind
    version_id: int
    version_number: int
    sha256: str
    size_bytes: int
    rank: int
    routing_key: tuple[float, ...] | None
    routing_claim: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Enrolment:
    """A user enrolled in a tenant's shared task adapter."""

    tenant_id: int
    user_id: int
    adapter_id: int
    task_name: str
    actor: str
    enrolled_at: datetime


@dataclass(frozen=True)
class EnrolmentEvent:
    """One recorded enrol or unenrol: who, when, which user and task adapter."""

    id: int
    tenant_id: int
    user_id: int
    adapter_id: int
    action: EnrolmentAction
    actor: str
    created_at: datetime


#: the columns ``_live_row`` reads, in its order
_LIVE_ROW_COLUMNS = (
    SqlAdapter.id,
    SqlAdapter.name,
    SqlAdapter.owner_user_id,
    SqlAdapter.kind,
    SqlAdapterVersion.id,
    SqlAdapterVersion.number,
    SqlAdapterVersion.sha256,
    SqlAdapterVersion.size_bytes,
    SqlAdapterVersion.rank,
    SqlAdapterVersion.routing_key,
    SqlAdapterVersion.routing_claim,
)


class RoutingRepository(DialectRepository):
    """Tenant-scoped SQL for routing; stateless apart from the dialect (upserts differ)."""

    # --- the bank ---------------------------------------------------------------------------------------
    def user_with_gate_spec(
        self, session: Session, *, tenant_id: int, external_id: str
    ) -> tuple[int, dict[str, Any] | None] | None:
        """``(user id, stored gate spec or None)`` in one query, or None for a user the tenant does not have."""
        stmt = (
            select(SqlUser.id, SqlGateSettings.spec)
            .outerjoin(SqlGateSettings, SqlGateSettings.user_id == SqlUser.id)
            .where(
                SqlUser.tenant_id == tenant_id,
                SqlUser.external_id == external_id,
                SqlUser.kind == SubjectKind.USER,
            )
        )
        row = session.execute(stmt).one_or_none()
        return None if row is None else (int(row[0]), None if row[1] is None else dict(row[1]))

    def user_experts(
        self, session: Session, *, tenant_id: int, external_id: str
    ) -> tuple[tuple[int, dict[str, Any] | None] | None, list[LiveAdapterRow]]:
        """``user_with_gate_spec`` and, for a user the tenant has, their ``live_adapters``: both in this one
        session (what serving resolves for every request)."""
        found = self.user_with_gate_spec(session, tenant_id=tenant_id, external_id=external_id)
        if found is None:
            return None, []
        return found, self.live_adapters(session, tenant_id=tenant_id, user_id=found[0])

    def live_adapters(self, session: Session, *, tenant_id: int, user_id: int) -> list[LiveAdapterRow]:
        """The user's own adapters (both kinds) and enrolled task adapters that have a live version: one query."""
        enrolled = and_(SqlEnrolment.adapter_id == SqlAdapter.id, SqlEnrolment.user_id == user_id)
        stmt = (
            select(*_LIVE_ROW_COLUMNS)
            .join(SqlAlias, and_(SqlAlias.adapter_id == SqlAdapter.id, SqlAlias.name == LIVE))
            .join(SqlAdapterVersion, SqlAdapterVersion.id == SqlAlias.version_id)
            .outerjoin(SqlEnrolment, enrolled)
            .where(
                SqlAdapter.tenant_id == tenant_id,
                or_(
                    SqlAdapter.owner_user_id == user_id,
                    and_(SqlAdapter.owner_user_id.is_(None), SqlEnrolment.user_id.is_not(None)),
                ),
            )
            .order_by(SqlAdapter.id)
        )
        return [_live_row(row) for row in session.execute(stmt)]

    def adapter_version(
        self, session: Session, *, tenant_id: int, owner_user_id: int | None, name: str, number: int | None
    ) -> LiveAdapterRow | None:
        """One LoRA adapter of the tenant (a user's, or a task's when ``owner_user_id`` is None) at version
        ``number``, or at its live version when ``number`` is None; None when there is no such version (a
        ``corrupt`` or ``revoked`` one, ``FINAL_STATUSES``, counts as none)."""
        owner = (
            SqlAdapter.owner_user_id.is_(None)
            if owner_user_id is None
            else SqlAdapter.owner_user_id == owner_user_id
        )
        stmt = select(*_LIVE_ROW_COLUMNS).where(
            SqlAdapter.tenant_id == tenant_id,
            owner,
            SqlAdapter.kind == AdapterKind.LORA,
            SqlAdapter.name == name,
        )
        if number is None:
            stmt = stmt.join(
                SqlAlias, and_(SqlAlias.adapter_id == SqlAdapter.id, SqlAlias.name == LIVE)
            ).join(SqlAdapterVersion, SqlAdapterVersion.id == SqlAlias.version_id)
        else:  # a pinned version, unless quarantined or revoked (final: never served; a rejected one may be pinned)
            stmt = stmt.join(SqlAdapterVersion, SqlAdapterVersion.adapter_id == SqlAdapter.id).where(
                SqlAdapterVersion.number == number,
                SqlAdapterVersion.status.not_in([s.value for s in FINAL_STATUSES]),
            )
        row = session.execute(stmt).first()
        return None if row is None else _live_row(row)

    def task_adapters_with_live_version(self, session: Session, *, tenant_id: int) -> list[str]:
        """Names of the tenant's task (owner-less LoRA) adapters that have a live version, sorted."""
        stmt = (
            select(SqlAdapter.name)
            .join(SqlAlias, and_(SqlAlias.adapter_id == SqlAdapter.id, SqlAlias.name == LIVE))
            .where(
                SqlAdapter.tenant_id == tenant_id,
                SqlAdapter.owner_user_id.is_(None),
                SqlAdapter.kind == AdapterKind.LORA,
            )
            .order_by(SqlAdapter.name)
        )
        return [str(name) for name in session.scalars(stmt)]

    # --- enrolments ---------------------------------------------------------------------------------------
    def find_task_adapter(self, session: Session, *, tenant_id: int, name: str) -> int | None:
        """The id of the tenant's shared (owner-less) LoRA adapter called ``name``, or None."""
        stmt = select(SqlAdapter.id).where(
            SqlAdapter.tenant_id == tenant_id,
            SqlAdapter.owner_user_id.is_(None),
            SqlAdapter.kind == AdapterKind.LORA,
            SqlAdapter.name == name,
        )
        found = session.scalar(stmt)
        return None if found is None else int(found)

    def enrolled_external_ids(self, session: Session, *, tenant_id: int, adapter_id: int) -> list[str]:
        """External ids of the users enrolled in a task adapter, sorted."""
        stmt = (
            select(SqlUser.external_id)
            .join(SqlEnrolment, SqlEnrolment.user_id == SqlUser.id)
            .where(SqlEnrolment.tenant_id == tenant_id, SqlEnrolment.adapter_id == adapter_id)
            .order_by(SqlUser.external_id)
        )
        return [str(e) for e in session.scalars(stmt)]

    def task_overview(self, session: Session, *, tenant_id: int) -> list[dict[str, Any]]:
        """Per task adapter of the tenant, by name: id, live version number, versions, enrolled users, and the
        feedback records of the task's subject row (``TaskInfo`` fields)."""
        live = (
            select(SqlAdapterVersion.number)
            .join(SqlAlias, SqlAlias.version_id == SqlAdapterVersion.id)
            .where(SqlAlias.adapter_id == SqlAdapter.id, SqlAlias.name == LIVE)
            .scalar_subquery()
        )
        enrolled = (
            select(func.count()).select_from(SqlEnrolment).where(SqlEnrolment.adapter_id == SqlAdapter.id)
        ).scalar_subquery()
        records = (
            select(func.count(SqlFeedback.id))
            .join(SqlUser, SqlUser.id == SqlFeedback.user_id)
            .where(
                SqlUser.tenant_id == SqlAdapter.tenant_id,
                SqlUser.kind == SubjectKind.TASK,
                SqlUser.external_id == TASK_SUBJECT_PREFIX + SqlAdapter.name,
            )
            .scalar_subquery()
        )
        stmt = (
            select(SqlAdapter.name, SqlAdapter.id, live, SqlAdapter.version_count, enrolled, records)
            .where(
                SqlAdapter.tenant_id == tenant_id,
                SqlAdapter.owner_user_id.is_(None),
                SqlAdapter.kind == AdapterKind.LORA,
            )
            .order_by(SqlAdapter.name)
        )
        keys = ("name", "adapter_id", "live_version", "versions", "enrolled_users", "feedback_records")
        return [dict(zip(keys, row, strict=True)) for row in session.execute(stmt)]

    def find_enrolment(self, session: Session, *, user_id: int, adapter_id: int) -> bool:
        return session.get(SqlEnrolment, (user_id, adapter_id)) is not None

    def insert_enrolment(
        self, session: Session, *, tenant_id: int, user_id: int, adapter_id: int, actor: str
    ) -> datetime:
        """Enrol and record the event (one transaction); a duplicate raises ``AlreadyExistsError`` at commit."""
        now = utcnow()
        session.add(
            SqlEnrolment(
                tenant_id=tenant_id, user_id=user_id, adapter_id=adapter_id, actor=actor, enrolled_at=now
            )
        )
        self._event(session, tenant_id, user_id, adapter_id, EnrolmentAction.ENROL, actor, now)
        session.flush()
        return now

    def delete_enrolment(
        self, session: Session, *, tenant_id: int, user_id: int, adapter_id: int, actor: str
    ) -> None:
        """Unenrol and record the event; ``NotFoundError`` when the user is not enrolled."""
        stmt = delete(SqlEnrolment).where(
            SqlEnrolment.user_id == user_id,
            SqlEnrolment.adapter_id == adapter_id,
            SqlEnrolment.tenant_id == tenant_id,
        )
        result = cast(CursorResult[Any], session.execute(stmt))
        if result.rowcount == 0:
            raise NotFoundError(f"user {user_id} is not enrolled in adapter {adapter_id}")
        self._event(session, tenant_id, user_id, adapter_id, EnrolmentAction.UNENROL, actor, utcnow())
        session.flush()

    def list_enrolments(self, session: Session, *, tenant_id: int, user_id: int) -> list[Enrolment]:
        stmt = (
            select(SqlEnrolment, SqlAdapter.name)
            .join(SqlAdapter, SqlAdapter.id == SqlEnrolment.adapter_id)
            .where(SqlEnrolment.user_id == user_id, SqlEnrolment.tenant_id == tenant_id)
            .order_by(SqlAdapter.name)
        )
        return [
            Enrolment(e.tenant_id, e.user_id, e.adapter_id, name, e.actor, e.enrolled_at)
            for e, name in session.execute(stmt).tuples()
        ]

    def list_events(self, session: Session, *, tenant_id: int, user_id: int) -> list[EnrolmentEvent]:
        stmt = (
            select(SqlEnrolmentEvent)
            .where(SqlEnrolmentEvent.user_id == user_id, SqlEnrolmentEvent.tenant_id == tenant_id)
            .order_by(SqlEnrolmentEvent.id)
        )
        return [_event(row) for row in session.scalars(stmt)]

    def _event(
        self,
        session: Session,
        tenant_id: int,
        user_id: int,
        adapter_id: int,
        action: EnrolmentAction,
        actor: str,
        now: datetime,
    ) -> None:
        session.add(
            SqlEnrolmentEvent(
                tenant_id=tenant_id,
                user_id=user_id,
                adapter_id=adapter_id,
                action=action,
                actor=actor,
                created_at=now,
            )
        )

    # --- gate settings and the learned gate's adapter ---------------------------------------------------
    def upsert_gate_spec(
        self, session: Session, *, tenant_id: int, user_id: int, spec: dict[str, Any], actor: str
    ) -> None:
        insert = pg_insert if self._postgres else sqlite_insert
        values = {
            "user_id": user_id,
            "tenant_id": tenant_id,
            "spec": spec,
            "actor": actor,
            "updated_at": utcnow(),
        }
        stmt = insert(SqlGateSettings).values(**values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[SqlGateSettings.user_id],
            set_={k: stmt.excluded[k] for k in ("spec", "actor", "updated_at")},
        )
        session.execute(stmt)

    def delete_gate_spec(self, session: Session, *, tenant_id: int, user_id: int) -> None:
        session.execute(
            delete(SqlGateSettings).where(
                SqlGateSettings.user_id == user_id, SqlGateSettings.tenant_id == tenant_id
            )
        )

    def gate_adapter_id(self, session: Session, *, tenant_id: int, user_id: int) -> int | None:
        """The id of the user's learned-gate adapter, or None when none was ever registered."""
        stmt = select(SqlAdapter.id).where(
            SqlAdapter.tenant_id == tenant_id,
            SqlAdapter.owner_user_id == user_id,
            SqlAdapter.kind == AdapterKind.GATE,
        )
        found = session.scalar(stmt)
        return None if found is None else int(found)

    def insert_gate_adapter(self, session: Session, *, tenant_id: int, user_id: int) -> int:
        """A new ``gate`` adapter for the user (``AlreadyExistsError`` at commit if the name is taken)."""
        row = SqlAdapter(
            tenant_id=tenant_id,
            owner_user_id=user_id,
            name=GATE_ADAPTER_NAME,
            kind=AdapterKind.GATE,
            target_config={},
            version_count=0,
            created_at=utcnow(),
        )
        session.add(row)
        session.flush()
        return row.id


def _live_row(row: Any) -> LiveAdapterRow:
    adapter_id, name, owner, kind, version_id, number, sha256, size, rank, key, claim = row
    return LiveAdapterRow(
        adapter_id=int(adapter_id),
        adapter_name=str(name),
        owner_user_id=None if owner is None else int(owner),
        kind=AdapterKind(kind),
        version_id=int(version_id),
        version_number=int(number),
        sha256=str(sha256),
        size_bytes=int(size),
        rank=int(rank),
        routing_key=None if key is None else tuple(float(v) for v in key),
        routing_claim=None if claim is None else tuple(float(v) for v in claim),
    )


def _event(row: SqlEnrolmentEvent) -> EnrolmentEvent:
    return from_row(EnrolmentEvent, row)
