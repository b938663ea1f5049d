"""Idempotency keys: a tenant's ``Idempotency-Key`` header and the response it produced.

A request with a key first *reserves* it (one row, unique per tenant and key), runs, then *completes* the
row with its response. A retry with the same key and the same request (``request_hash``) gets the stored
response back instead of running again; the same key on a different request is refused
(``IdempotencyKeyReusedError``, HTTP 422, as the IETF ``Idempotency-Key`` draft says), and a retry that
arrives while the first request still runs is told to come back (``IdempotencyKeyInFlightError``, 409).
A request that fails releases its reservation, so the retry runs again. A reservation whose request died
mid-way (a crashed process) is taken over once it is older than ``stale_after``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from lorafleet.errors import ConflictError, ValidationError
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlIdempotencyKey, utcnow

MAX_KEY_LENGTH = 255
DEFAULT_STALE_AFTER = timedelta(minutes=5)


class IdempotencyKeyReusedError(ValidationError):
    """The key was already used for a different request (another method, path or body)."""

    code = "idempotency_key_reused"


class IdempotencyKeyInFlightError(ConflictError):
    """A request with this key is still running; retry later."""

    code = "idempotency_key_in_flight"


@dataclass(frozen=True)
class StoredResponse:
    """The response a completed request with this key produced."""

    status: int
    body: dict[str, Any]


def check_key(key: object) -> str:
    """A key: 1 to 255 printable ASCII characters (a UUID is typical)."""
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
        raise ValidationError(f"Idempotency-Key: must be 1 to {MAX_KEY_LENGTH} characters")
    if not key.isascii() or not key.isprintable():
        raise ValidationError("Idempotency-Key: must be printable ASCII")
    return key


def request_hash(*, method: str, path: str, body: Any) -> str:
    """sha256 of the canonical JSON of method, path and (parsed) body: what makes two requests "the same"."""
    canonical = json.dumps(
        {"method": method.upper(), "path": path, "body": body},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class IdempotencyRepository:
    """Reserve, complete, release and prune keys; every method is one transaction."""

    def __init__(self, db: Database, *, stale_after: timedelta = DEFAULT_STALE_AFTER) -> None:
        self.db = db
        self.stale_after = stale_after

    def reserve(self, *, tenant_id: int, key: str, request_hash: str) -> StoredResponse | None:
        """None: the caller holds the key now and must ``complete`` or ``release`` it. A stored response:
        replay it. Raises ``IdempotencyKeyReusedError`` or ``IdempotencyKeyInFlightError``."""
        key = check_key(key)
        with self.db.session() as session:
            if self._insert(session, tenant_id=tenant_id, key=key, request_hash=request_hash):
                return None
            row = self._locked_row(session, tenant_id=tenant_id, key=key)
            if row.request_hash != request_hash:
                raise IdempotencyKeyReusedError(
                    "Idempotency-Key: already used for a different request (method, path or body)"
                )
            if row.response_status is not None:
                return StoredResponse(status=row.response_status, body=dict(row.response_body or {}))
            now = utcnow()
            if row.created_at > now - self.stale_after:
                raise IdempotencyKeyInFlightError("a request with this Idempotency-Key is still running")
            row.created_at = now  # the first request died mid-way: take its reservation over
            return None

    def complete(self, *, tenant_id: int, key: str, status: int, body: dict[str, Any]) -> None:
        """Store the response of the request holding the key."""
        with self.db.session() as session:
            session.execute(
                update(SqlIdempotencyKey)
                .where(SqlIdempotencyKey.tenant_id == tenant_id, SqlIdempotencyKey.key == key)
                .values(response_status=status, response_body=body)
            )

    def release(self, *, tenant_id: int, key: str) -> None:
        """Drop an unfinished reservation (the request failed; a retry runs again)."""
        with self.db.session() as session:
            session.execute(
                delete(SqlIdempotencyKey).where(
                    SqlIdempotencyKey.tenant_id == tenant_id,
                    SqlIdempotencyKey.key == key,
                    SqlIdempotencyKey.response_status.is_(None),
                )
            )

    def prune(self, *, older_than: datetime) -> int:
        """Delete keys created before ``older_than``; returns how many."""
        with self.db.session() as session:
            result = session.execute(
                delete(SqlIdempotencyKey).where(SqlIdempotencyKey.created_at < older_than)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def _insert(self, session: Session, *, tenant_id: int, key: str, request_hash: str) -> bool:
        """``INSERT ... ON CONFLICT DO NOTHING``: True when this call created the row."""
        dialect_insert = (
            postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        )
        statement = (
            dialect_insert(SqlIdempotencyKey)
            .values(tenant_id=tenant_id, key=key, request_hash=request_hash, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["tenant_id", "key"])
            .returning(SqlIdempotencyKey.id)
        )
        return session.execute(statement).first() is not None

    def _locked_row(self, session: Session, *, tenant_id: int, key: str) -> SqlIdempotencyKey:
        query = (
            select(SqlIdempotencyKey)
            .where(SqlIdempotencyKey.tenant_id == tenant_id, SqlIdempotencyKey.key == key)
            .with_for_update()
        )
        row = session.scalars(query).one_or_none()
        if row is None:  # released between our insert attempt and this read: the caller may retry
            raise IdempotencyKeyInFlightError("a request with this Idempotency-Key just finished; retry")
        return row


__all__ = [
    "DEFAULT_STALE_AFTER",
    "IdempotencyKeyInFlightError",
    "IdempotencyKeyReusedError",
    "IdempotencyRepository",
    "StoredResponse",
    "check_key",
    "request_hash",
]
