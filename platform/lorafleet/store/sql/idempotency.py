"""Idempotency keys: a tenant's ``Idempotency-Key`` header and the response it produced.

``IdempotencyRepository.run_once`` runs an operation at most once per tenant and key, and stores its response
**in the transaction of the operation's own writes** (``Database.transaction()``: the operation's store calls
join it). So there is no moment at which the write is committed and its response is not: a process killed
before the commit leaves neither (the retry runs again), one killed after it leaves both (the retry replays).

A retry with the same key and the same request (``request_hash``) gets the stored response back instead of
running again; the same key on a different request is refused (``IdempotencyKeyReusedError``, HTTP 422, as the
IETF ``Idempotency-Key`` draft says), and a retry that arrives while the first request still runs is told to come
back (``IdempotencyKeyInFlightError``, 409). A request that fails rolls back, response and all, so its retry
runs again.

The reservation lives only as long as the transaction: on PostgreSQL a transaction-scoped advisory lock on
(tenant, key), taken with ``pg_try_advisory_xact_lock`` (a concurrent duplicate is 409 at once, never queued
behind the first); the server drops it the moment the holder's connection goes, so a crashed request blocks
nothing. On SQLite every write transaction holds the database's write lock from its start (``BEGIN
IMMEDIATE``), so a duplicate waits for the first to finish and then replays its response. A row is written only
with its response; a row without one (left by a version before this one, which reserved keys in a transaction
of their own) is taken over once older than ``stale_after``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from lorafleet.errors import ConflictError, ValidationError
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlIdempotencyKey, utcnow

MAX_KEY_LENGTH = 255
DEFAULT_STALE_AFTER = timedelta(minutes=5)
#: the first key of the PostgreSQL advisory locks on idempotency keys (two-key locks never meet the one-key
#: locks of the scheduler and the blob GC): "lfid"
ADVISORY_LOCK_SPACE = 0x6C666964


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


def advisory_key(*, tenant_id: int, key: str) -> int:
    """The key's second advisory-lock key: a signed 32-bit hash of tenant and key (two keys sharing one only
    make a concurrent request with the other wait for a 409 retry)."""
    digest = hashlib.sha256(f"{tenant_id}:{key}".encode()).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


def request_hash(*, method: str, path: str, body: Any) -> str:
    """sha256 of the canonical JSON of method, path and (parsed) body: what makes two requests "the same"."""
    canonical = json.dumps(
        {"method": method.upper(), "path": path, "body": body},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Outcome:
    """What ``run_once`` answered: the response, and whether it was replayed (stored by an earlier request)."""

    response: StoredResponse
    replayed: bool


class IdempotencyRepository:
    """Run operations at most once per key (``run_once``) and prune old keys."""

    def __init__(self, db: Database, *, stale_after: timedelta = DEFAULT_STALE_AFTER) -> None:
        self.db = db
        self.stale_after = stale_after

    def run_once(
        self,
        *,
        tenant_id: int,
        key: str,
        request_hash: str,
        status: int,
        operation: Callable[[], dict[str, Any]],
        subject: str | None = None,
    ) -> Outcome:
        """The stored response for ``(tenant_id, key)`` (replayed), or ``operation()``'s result as the body of a
        ``status`` response, stored with the key in the operation's transaction. The operation's store calls
        must go through this repository's ``Database`` (they then join the transaction); it runs at most once
        per key, and when it raises nothing of it is kept. Raises ``IdempotencyKeyReusedError`` or
        ``IdempotencyKeyInFlightError``. ``subject``: the user (external id) the request was about, stored with
        the response so that forgetting the user deletes it (``forget_subject``)."""
        key = check_key(key)
        with self.db.transaction() as session:
            self._lock_key(session, tenant_id=tenant_id, key=key)
            row = session.scalars(
                select(SqlIdempotencyKey).where(
                    SqlIdempotencyKey.tenant_id == tenant_id, SqlIdempotencyKey.key == key
                )
            ).one_or_none()
            if row is not None:
                if row.request_hash != request_hash:
                    raise IdempotencyKeyReusedError(
                        "Idempotency-Key: already used for a different request (method, path or body)"
                    )
                if row.response_status is not None:
                    stored = StoredResponse(status=row.response_status, body=dict(row.response_body or {}))
                    return Outcome(stored, replayed=True)
                if row.created_at > utcnow() - self.stale_after:  # an earlier version's live reservation
                    raise IdempotencyKeyInFlightError("a request with this Idempotency-Key is still running")
            body = operation()
            self._store(
                session,
                tenant_id=tenant_id,
                key=key,
                request_hash=request_hash,
                status=status,
                body=body,
                subject=subject,
            )
            return Outcome(StoredResponse(status=status, body=body), replayed=False)

    def prune(self, *, older_than: datetime) -> int:
        """Delete keys created before ``older_than``; returns how many."""
        with self.db.session() as session:
            result = session.execute(
                delete(SqlIdempotencyKey).where(SqlIdempotencyKey.created_at < older_than)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def forget_subject(self, *, tenant_id: int, subject: str) -> int:
        """Delete the tenant's stored responses of requests about the user ``subject``; returns how many. Joins
        the caller's transaction (``Database.session``), so a user's erasure deletes them with everything else."""
        with self.db.session() as session:
            result = session.execute(
                delete(SqlIdempotencyKey).where(
                    SqlIdempotencyKey.tenant_id == tenant_id, SqlIdempotencyKey.subject == subject
                )
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def _lock_key(self, session: Session, *, tenant_id: int, key: str) -> None:
        """Hold the key for the rest of the transaction, or raise ``IdempotencyKeyInFlightError`` when another
        transaction holds it (PostgreSQL). On SQLite the statement only starts the transaction (``BEGIN
        IMMEDIATE``: the write lock, which already keeps any other request with the key out until the end)."""
        if session.get_bind().dialect.name != "postgresql":
            session.execute(text("SELECT 1"))
            return
        held = session.scalar(
            text("SELECT pg_try_advisory_xact_lock(:space, :key)"),
            {"space": ADVISORY_LOCK_SPACE, "key": advisory_key(tenant_id=tenant_id, key=key)},
        )
        if not held:
            raise IdempotencyKeyInFlightError("a request with this Idempotency-Key is still running")

    def _store(
        self,
        session: Session,
        *,
        tenant_id: int,
        key: str,
        request_hash: str,
        status: int,
        body: dict[str, Any],
        subject: str | None,
    ) -> None:
        """The key's row with its response (over an earlier version's unfinished reservation, if one is left)."""
        dialect_insert = (
            postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        )
        values = {
            "request_hash": request_hash,
            "response_status": status,
            "response_body": body,
            "created_at": utcnow(),
            "subject": subject,
        }
        statement = (
            dialect_insert(SqlIdempotencyKey)
            .values(tenant_id=tenant_id, key=key, **values)
            .on_conflict_do_update(index_elements=["tenant_id", "key"], set_=values)
        )
        session.execute(statement)


__all__ = [
    "ADVISORY_LOCK_SPACE",
    "DEFAULT_STALE_AFTER",
    "IdempotencyKeyInFlightError",
    "IdempotencyKeyReusedError",
    "IdempotencyRepository",
    "Outcome",
    "StoredResponse",
    "advisory_key",
    "check_key",
    "request_hash",
]
