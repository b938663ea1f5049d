"""Tenants, their API keys and their users.

An API key is shown once, when it is made; the database keeps only its sha256 (to authenticate) and a short
prefix (to recognise it in logs). Users are addressed by the tenant's own ``external_id``; a user of another
tenant is reported as not found, never as forbidden, so ids of other tenants do not leak. A tenant's
``TrainingConfig`` overrides are stored here as JSON; ``lorafleet.training.overrides`` validates them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from lorafleet.domain import LIVE, AuditAction, SubjectKind, Tenant, User, UserSummary
from lorafleet.domain.subject import task_subject_id as task_subject_id  # re-exported
from lorafleet.errors import AuthError, NotFoundError, StoreError, ValidationError
from lorafleet.store.sql.audit_repository import insert_event
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import (
    SqlAdapter,
    SqlAdapterVersion,
    SqlAlias,
    SqlApiKey,
    SqlFeedback,
    SqlTenant,
    SqlUser,
    utcnow,
)
from lorafleet.store.sql.rows import MAX_PAGE_SIZE as MAX_PAGE_SIZE  # re-exported
from lorafleet.store.sql.rows import check_page as check_page  # re-exported
from lorafleet.store.sql.rows import chunks, from_row

API_KEY_SCHEME = "lf_"
#: ``lf_`` + 8 characters of the secret: enough to tell keys apart in logs, far too little to guess the rest.
API_KEY_PREFIX_LENGTH = 11
MAX_EXTERNAL_ID_LENGTH = 256
MAX_TENANT_NAME_LENGTH = 128


def hash_api_key(api_key: str) -> str:
    """The stored form of a key: hex sha256 of its UTF-8 bytes."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def validate_external_id(external_id: object) -> str:
    """A user's id in the tenant's own system: a non-empty, printable string of at most 256 characters."""
    if not isinstance(external_id, str) or not external_id:
        raise ValidationError("external_id: must be a non-empty string")
    if len(external_id) > MAX_EXTERNAL_ID_LENGTH:
        raise ValidationError(f"external_id: longer than {MAX_EXTERNAL_ID_LENGTH} characters")
    if not external_id.isprintable():
        raise ValidationError("external_id: contains non-printable characters")
    return external_id


def validate_tenant_name(name: object) -> str:
    """A tenant's unique name: non-empty, printable, at most 128 characters."""
    if not isinstance(name, str) or not name.strip():
        raise ValidationError("name: must be a non-empty string")
    if len(name) > MAX_TENANT_NAME_LENGTH or not name.isprintable():
        raise ValidationError(f"name: must be printable and at most {MAX_TENANT_NAME_LENGTH} characters")
    return name


def to_tenant(row: SqlTenant) -> Tenant:
    return from_row(Tenant, row)


def to_user(row: SqlUser) -> User:
    return from_row(User, row)


def require_tenant(session: Session, *, tenant_id: int) -> SqlTenant:
    row = session.get(SqlTenant, tenant_id)
    if row is None:
        raise NotFoundError(f"tenant {tenant_id} not found")
    return row


def training_overrides(session: Session, *, tenant_id: int) -> dict[str, Any]:
    """The tenant's ``TrainingConfig`` overrides in this transaction (``tenants.training_config``; empty: none)."""
    return dict(require_tenant(session, tenant_id=tenant_id).training_config or {})


def find_user(
    session: Session, *, tenant_id: int, external_id: str, kind: str = SubjectKind.USER
) -> SqlUser | None:
    """A subject row by external id: a user (``kind`` ``user``), or a task's dataset (``task``, with the
    ``task_subject_id`` of the task name)."""
    query = select(SqlUser).where(
        SqlUser.tenant_id == tenant_id, SqlUser.external_id == external_id, SqlUser.kind == kind
    )
    return session.scalars(query).one_or_none()


def user_id_of(session: Session, *, tenant_id: int, external_id: str) -> int | None:
    """The id of the tenant's user with this external id, or None (what code above the store asks for, through
    ``Database.run``, instead of the row)."""
    row = find_user(session, tenant_id=tenant_id, external_id=external_id)
    return None if row is None else row.id


def get_or_create_user_id(session: Session, *, tenant_id: int, external_id: str) -> int:
    """The id of the tenant's user with this external id, the user created if absent (race-safe)."""
    return get_or_create_user_row(session, tenant_id=tenant_id, external_id=external_id).id


def get_or_create_user_row(
    session: Session, *, tenant_id: int, external_id: str, kind: str = SubjectKind.USER
) -> SqlUser:
    """The user row, inserted if absent; safe when many transactions race to create the same user.

    ``INSERT ... ON CONFLICT DO NOTHING`` never raises on the unique key: on PostgreSQL it waits for a
    concurrent inserter to commit, and the following SELECT (a fresh snapshot under READ COMMITTED) sees its
    row. SQLite transactions are serialised by ``BEGIN IMMEDIATE``.
    """
    existing = find_user(session, tenant_id=tenant_id, external_id=external_id, kind=kind)
    if existing is not None:
        return existing
    require_tenant(session, tenant_id=tenant_id)
    dialect_insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    statement = dialect_insert(SqlUser).values(
        tenant_id=tenant_id, external_id=external_id, kind=kind, created_at=utcnow()
    )
    session.execute(statement.on_conflict_do_nothing(index_elements=["tenant_id", "external_id"]))
    row = find_user(session, tenant_id=tenant_id, external_id=external_id, kind=kind)
    if row is None:  # inserted above or by the transaction the insert waited for: cannot be missing
        raise StoreError(f"user {external_id!r} vanished while being created")
    return row


def _new_api_key_row(*, tenant_id: int) -> tuple[SqlApiKey, str]:
    api_key = API_KEY_SCHEME + secrets.token_urlsafe(32)
    row = SqlApiKey(
        tenant_id=tenant_id, key_hash=hash_api_key(api_key), prefix=api_key[:API_KEY_PREFIX_LENGTH]
    )
    return row, api_key


#: who a key or tenant change is in the audit log when the caller names no one (a direct library call)
LIBRARY_ACTOR = "library"


def _audit_key(
    session: Session, row: SqlApiKey, *, actor: str, action: AuditAction, target: str | None = None
) -> None:
    """An audit event about one API key: its id and prefix (never the key or its hash)."""
    insert_event(
        session,
        tenant_id=row.tenant_id,
        actor=actor,
        action=action,
        target=target or f"key:{row.id}",
        details={"key_id": row.id, "prefix": row.prefix},
    )


def _revoke(session: Session, row: SqlApiKey, *, actor: str) -> None:
    """Revoke the key now unless it already is; the first revocation is audited, a repeat changes nothing."""
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        _audit_key(session, row, actor=actor, action=AuditAction.KEY_REVOKED)


def user_summaries(session: Session, *, tenant_id: int, limit: int, offset: int = 0) -> list[UserSummary]:
    """One page of the tenant's users (never task subjects), by id, each with their adapters' live version
    numbers, newest feedback time, and version and feedback counts: four queries for the whole page."""
    check_page(limit=limit, offset=offset)
    query = select(SqlUser).where(SqlUser.tenant_id == tenant_id, SqlUser.kind == SubjectKind.USER)
    users = list(session.scalars(query.order_by(SqlUser.id).limit(limit).offset(offset)))
    feedback: dict[int, tuple[int, Any]] = {}
    versions: dict[int, int] = {}
    live: dict[int, dict[str, int]] = {}
    for ids in chunks([u.id for u in users]):
        counted = select(SqlFeedback.user_id, func.count(SqlFeedback.id), func.max(SqlFeedback.created_at))
        for user_id, count, last in session.execute(
            counted.where(SqlFeedback.user_id.in_(ids)).group_by(SqlFeedback.user_id)
        ):
            feedback[user_id] = (count, last)
        numbered = (
            select(SqlAdapter.owner_user_id, func.count(SqlAdapterVersion.id))
            .join(SqlAdapterVersion, SqlAdapterVersion.adapter_id == SqlAdapter.id)
            .where(SqlAdapter.owner_user_id.in_(ids))
            .group_by(SqlAdapter.owner_user_id)
        )
        versions.update(
            {user_id: count for user_id, count in session.execute(numbered) if user_id is not None}
        )
        lives = (
            select(SqlAdapter.owner_user_id, SqlAdapter.name, SqlAdapterVersion.number)
            .join(SqlAlias, (SqlAlias.adapter_id == SqlAdapter.id) & (SqlAlias.name == LIVE))
            .join(SqlAdapterVersion, SqlAdapterVersion.id == SqlAlias.version_id)
            .where(SqlAdapter.owner_user_id.in_(ids))
            .order_by(SqlAdapter.id)
        )
        for owner, name, number in session.execute(lives):
            if owner is not None:
                live.setdefault(owner, {})[name] = number
    return [
        UserSummary(
            id=u.id,
            external_id=u.external_id,
            created_at=u.created_at,
            live_versions=live.get(u.id, {}),
            last_feedback_at=_utc(feedback.get(u.id, (0, None))[1]),
            version_count=versions.get(u.id, 0),
            feedback_count=feedback.get(u.id, (0, None))[0],
        )
        for u in users
    ]


def _utc(value: datetime | None) -> datetime | None:
    """An aggregate's timestamp as aware UTC (SQLite's ``max()`` returns it naive, or as text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


#: ``api_keys.last_used_at`` is refreshed when it is at least this old
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class ApiKeyInfo:
    """What an admin sees of an API key: never the key, only its first characters."""

    id: int
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TenantRepository:
    """Tenants, API keys and users; every method is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def create_tenant(self, *, name: str, actor: str = LIBRARY_ACTOR) -> tuple[Tenant, str]:
        """A new tenant and its first API key (plaintext, shown only now). A taken name: AlreadyExistsError.
        Audited (``tenant.created``, with the key's id) in the same transaction, as every key change below."""
        name = validate_tenant_name(name)
        with self.db.session() as session:
            tenant = SqlTenant(name=name)
            session.add(tenant)
            session.flush()
            key_row, api_key = _new_api_key_row(tenant_id=tenant.id)
            session.add(key_row)
            session.flush()
            _audit_key(
                session, key_row, actor=actor, action=AuditAction.TENANT_CREATED, target=f"tenant:{name}"
            )
            return to_tenant(tenant), api_key

    def create_api_key(self, *, tenant_id: int, actor: str = LIBRARY_ACTOR) -> str:
        """Another key for the tenant (e.g. for rotation); returns the plaintext, shown only now."""
        with self.db.session() as session:
            require_tenant(session, tenant_id=tenant_id)
            key_row, api_key = _new_api_key_row(tenant_id=tenant_id)
            session.add(key_row)
            session.flush()
            _audit_key(session, key_row, actor=actor, action=AuditAction.KEY_CREATED)
            return api_key

    def revoke_api_key(self, *, api_key: str, actor: str = LIBRARY_ACTOR) -> None:
        """Revoke a key (idempotent: the first revocation time is kept, and only it is audited); an unknown key
        is NotFoundError."""
        with self.db.session() as session:
            row = session.scalars(
                select(SqlApiKey).where(SqlApiKey.key_hash == hash_api_key(api_key))
            ).first()
            if row is None:
                raise NotFoundError("API key not found")
            _revoke(session, row, actor=actor)

    def list_api_keys(self, *, tenant_id: int) -> list[ApiKeyInfo]:
        """The tenant's keys (never the keys themselves: their prefix, when made, last used and revoked), by id."""
        with self.db.session() as session:
            require_tenant(session, tenant_id=tenant_id)
            rows = session.scalars(
                select(SqlApiKey).where(SqlApiKey.tenant_id == tenant_id).order_by(SqlApiKey.id)
            ).all()
            return [ApiKeyInfo(r.id, r.prefix, r.created_at, r.last_used_at, r.revoked_at) for r in rows]

    def revoke_api_key_by_id(self, *, tenant_id: int, key_id: int, actor: str = LIBRARY_ACTOR) -> ApiKeyInfo:
        """Revoke one of the tenant's keys by its id (idempotent: the first revocation time is kept); a key of
        another tenant, or none, is NotFoundError."""
        with self.db.session() as session:
            row = session.scalars(
                select(SqlApiKey).where(SqlApiKey.id == key_id, SqlApiKey.tenant_id == tenant_id)
            ).first()
            if row is None:
                raise NotFoundError(f"API key {key_id} not found")
            _revoke(session, row, actor=actor)
            return ApiKeyInfo(row.id, row.prefix, row.created_at, row.last_used_at, row.revoked_at)

    def authenticate(self, *, api_key: str) -> Tenant:
        """The tenant owning an active key; an unknown, malformed or revoked key is AuthError.

        Every API request authenticates, so the lookup is a read-only transaction (on SQLite it does not wait for
        a writer); the key's ``last_used_at`` is refreshed, at most once a minute, in a short write of its own."""
        if not isinstance(api_key, str) or not api_key.startswith(API_KEY_SCHEME):
            raise AuthError("invalid API key")
        presented = hash_api_key(api_key)
        with self.db.session(read_only=True) as session:
            query = (
                select(SqlApiKey, SqlTenant)
                .join(SqlTenant, SqlTenant.id == SqlApiKey.tenant_id)
                .where(SqlApiKey.key_hash == presented)
            )
            found = session.execute(query).first()
            # the lookup is by hash already; compare_digest keeps the final check constant-time
            if found is None or not hmac.compare_digest(found[0].key_hash, presented):
                raise AuthError("invalid API key")
            key = found[0]
            if key.revoked_at is not None:
                raise AuthError(f"API key {key.prefix}... has been revoked")
            tenant, key_id, last_used_at = to_tenant(found[1]), key.id, key.last_used_at
        now = utcnow()
        if last_used_at is None or now - last_used_at >= LAST_USED_RESOLUTION:
            # at most one write a minute per key, not one per request
            with self.db.session() as session:
                session.execute(update(SqlApiKey).where(SqlApiKey.id == key_id).values(last_used_at=now))
        return tenant

    def get_tenant(self, *, tenant_id: int | None = None, name: str | None = None) -> Tenant:
        """A tenant by id or by name (exactly one of them); NotFoundError if there is none."""
        if (tenant_id is None) == (name is None):
            raise ValidationError("get_tenant: pass exactly one of tenant_id and name")
        with self.db.session() as session:
            if tenant_id is not None:
                return to_tenant(require_tenant(session, tenant_id=tenant_id))
            row = session.scalars(select(SqlTenant).where(SqlTenant.name == name)).one_or_none()
            if row is None:
                raise NotFoundError(f"tenant {name!r} not found")
            return to_tenant(row)

    def list_tenants(self, *, limit: int = MAX_PAGE_SIZE, offset: int = 0) -> list[Tenant]:
        check_page(limit=limit, offset=offset)
        with self.db.session() as session:
            rows = session.scalars(select(SqlTenant).order_by(SqlTenant.id).limit(limit).offset(offset))
            return [to_tenant(row) for row in rows]

    def tenant_names(self, *, tenant_ids: Iterable[int]) -> dict[int, str]:
        """The names of those of ``tenant_ids`` that exist, by id (one query per ``IN`` chunk)."""
        wanted = sorted(set(tenant_ids))
        with self.db.session() as session:
            return {
                row.id: row.name
                for ids in chunks(wanted)
                for row in session.execute(select(SqlTenant.id, SqlTenant.name).where(SqlTenant.id.in_(ids)))
            }

    def get_or_create_user(self, *, tenant_id: int, external_id: str) -> User:
        """The tenant's user with this external id, created on first sight (race-safe)."""
        external_id = validate_external_id(external_id)
        with self.db.session() as session:
            return to_user(get_or_create_user_row(session, tenant_id=tenant_id, external_id=external_id))

    def get_user(self, *, tenant_id: int, external_id: str) -> User:
        """The tenant's user; NotFoundError if absent (also when only another tenant has that id)."""
        found = self.find_subject(tenant_id=tenant_id, external_id=validate_external_id(external_id))
        if found is None:
            raise NotFoundError(f"user {external_id!r} not found")
        return found

    def find_subject(self, *, tenant_id: int, external_id: str, kind: str = SubjectKind.USER) -> User | None:
        """A subject by external id (a user, or with ``kind`` ``task`` a task's dataset), or None (read-only: the
        API looks users up per request)."""
        with self.db.session(read_only=True) as session:
            row = find_user(session, tenant_id=tenant_id, external_id=external_id, kind=kind)
            return None if row is None else to_user(row)

    def get_training_overrides(self, *, tenant_id: int) -> dict[str, Any]:
        """The tenant's stored ``TrainingConfig`` overrides (empty: none); NotFoundError for no such tenant."""
        with self.db.session() as session:
            return training_overrides(session, tenant_id=tenant_id)

    def set_training_overrides(self, *, tenant_id: int, overrides: Mapping[str, Any]) -> None:
        """Replace the tenant's overrides (``{}`` clears them). Stored as given: callers validate them first
        (``lorafleet.training.overrides``), since this layer does not know ``TrainingConfig``."""
        if not isinstance(overrides, Mapping):
            raise ValidationError("training_config: must be an object")
        with self.db.session() as session:
            row = require_tenant(session, tenant_id=tenant_id)
            row.training_config = dict(overrides) or None

    def list_users(self, *, tenant_id: int, limit: int = 100, offset: int = 0) -> list[User]:
        """The tenant's users in creation order, one page at a time."""
        check_page(limit=limit, offset=offset)
        with self.db.session() as session:
            query = select(SqlUser).where(SqlUser.tenant_id == tenant_id, SqlUser.kind == SubjectKind.USER)
            query = query.order_by(SqlUser.id)
            return [to_user(row) for row in session.scalars(query.limit(limit).offset(offset))]

    def list_user_summaries(self, *, tenant_id: int, limit: int = 100, offset: int = 0) -> list[UserSummary]:
        """One page of the tenant's users by id, each with live versions, newest feedback time and counts
        (``user_summaries``); NotFoundError for no such tenant."""
        with self.db.session() as session:
            require_tenant(session, tenant_id=tenant_id)
            return user_summaries(session, tenant_id=tenant_id, limit=limit, offset=offset)
