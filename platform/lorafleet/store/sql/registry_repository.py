"""SQL side of the adapter registry: tenant-scoped queries over adapters, versions, aliases and lineage.

Every method runs inside a session the caller (``lorafleet.registry.Registry``) opened with
``Database.session()``, so one registry operation is one transaction. Every lookup joins through
``adapters.tenant_id``: an id of another tenant is reported exactly like a missing one. ORM rows never leave
this module; methods return the frozen objects of ``lorafleet.domain``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import and_, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lorafleet.domain import (
    LIVE,
    Adapter,
    AdapterVersion,
    AliasEvent,
    DatasetSnapshot,
    Job,
    LineageEdge,
    LineageRelation,
    VersionContent,
    VersionStatus,
)
from lorafleet.errors import NotFoundError, ValidationError
from lorafleet.store.sql.jobs_repository import to_job
from lorafleet.store.sql.models import (
    SqlAdapter,
    SqlAdapterVersion,
    SqlAlias,
    SqlAliasEvent,
    SqlDatasetSnapshot,
    SqlJob,
    SqlLineageEdge,
    SqlQAReport,
    SqlScrubCursor,
    SqlTenant,
    SqlUser,
    utcnow,
)
from lorafleet.store.sql.receipts import blob_holds
from lorafleet.store.sql.rows import DialectRepository, chunks, from_row, to_snapshot

#: PostgreSQL advisory-lock key that orders "GC deletes a blob" against "a version row starts to use it".
BLOB_GC_LOCK_KEY = 0x6C6F7261_67630001

Direction = Literal["ancestors", "descendants"]


#: ``scrub_cursors.updated_at`` of a cursor that has not ended a pass yet: its first pass starts at once
_NO_PASS_YET = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class NewVersion(VersionContent):
    """The metadata of a version about to be inserted (its blob is already in the object store)."""

    job_id: int | None
    dataset_snapshot_id: int | None
    parents: tuple[tuple[int, LineageRelation], ...]
    #: the centroid gate's key (a unit vector of the backbone's hidden size), when known
    routing_key: tuple[float, ...] | None = None
    #: the gate's probe for the base side (``routing.embeddings.fit_claim``), when known
    routing_claim: tuple[float, ...] | None = None


@dataclass(frozen=True)
class VersionLocation:
    """A version and whose it is: its tenant, its adapter and the adapter's owner (for reports across tenants)."""

    version: AdapterVersion
    tenant_id: int
    tenant_name: str
    adapter_name: str
    adapter_kind: str
    #: the owning user's external id; None for a shared task adapter
    owner: str | None


class RegistryRepository(DialectRepository):
    """Tenant-scoped SQL for the registry; stateless apart from the dialect (locks and upserts differ)."""

    # --- tenants, users, adapters -----------------------------------------------------------------------
    def require_tenant(self, session: Session, *, tenant_id: int) -> None:
        if session.get(SqlTenant, tenant_id) is None:
            raise NotFoundError(f"tenant {tenant_id} not found")

    def require_user(self, session: Session, *, tenant_id: int, user_id: int) -> None:
        found = session.scalar(
            select(SqlUser.id).where(SqlUser.id == user_id, SqlUser.tenant_id == tenant_id)
        )
        if found is None:
            raise NotFoundError(f"user {user_id} not found")

    def insert_adapter(
        self,
        session: Session,
        *,
        tenant_id: int,
        owner_user_id: int | None,
        name: str,
        target_config: dict[str, Any],
    ) -> Adapter:
        row = SqlAdapter(
            tenant_id=tenant_id,
            owner_user_id=owner_user_id,
            name=name,
            target_config=target_config,
            version_count=0,
        )
        session.add(row)
        session.flush()
        return _adapter(row)

    def get_adapter(
        self, session: Session, *, tenant_id: int, adapter_id: int, lock: bool = False
    ) -> Adapter:
        """The tenant's adapter; ``lock`` takes its row lock (PostgreSQL) to serialise alias moves."""
        stmt = select(SqlAdapter).where(SqlAdapter.id == adapter_id, SqlAdapter.tenant_id == tenant_id)
        if lock and self._postgres:
            stmt = stmt.with_for_update(key_share=True)  # FOR NO KEY UPDATE: FK inserts still proceed
        row = session.scalar(stmt)
        if row is None:
            raise NotFoundError(f"adapter {adapter_id} not found")
        return _adapter(row)

    def lock_live(
        self, session: Session, *, tenant_id: int, adapter_id: int
    ) -> tuple[Adapter, AdapterVersion | None]:
        """The adapter under its row lock, and its live version: what every move of ``live`` (or status change
        that must not touch the live version) checks first, so concurrent moves of one adapter queue up."""
        adapter = self.get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id, lock=True)
        return adapter, self.live_version(session, tenant_id=tenant_id, adapter_id=adapter_id)

    def ensure_adapter(
        self, session: Session, *, tenant_id: int, owner_user_id: int | None, name: str
    ) -> Adapter:
        """The adapter, inserted (empty target config) in a savepoint when absent: a concurrent insert of the same
        name wins and is read back instead of failing the caller's transaction."""
        found = self.find_adapter(session, tenant_id=tenant_id, owner_user_id=owner_user_id, name=name)
        if found is not None:
            return found
        try:
            with session.begin_nested():
                return self.insert_adapter(
                    session, tenant_id=tenant_id, owner_user_id=owner_user_id, name=name, target_config={}
                )
        except IntegrityError:
            found = self.find_adapter(session, tenant_id=tenant_id, owner_user_id=owner_user_id, name=name)
            if found is None:
                raise
            return found

    def find_adapter(
        self, session: Session, *, tenant_id: int, owner_user_id: int | None, name: str
    ) -> Adapter | None:
        owner = SqlAdapter.owner_user_id
        stmt = select(SqlAdapter).where(
            SqlAdapter.tenant_id == tenant_id,
            SqlAdapter.name == name,
            owner.is_(None) if owner_user_id is None else owner == owner_user_id,
        )
        row = session.scalar(stmt)
        return None if row is None else _adapter(row)

    def require_kind(self, session: Session, *, tenant_id: int, adapter_id: int, kind: str) -> None:
        """``ValidationError`` unless the tenant's adapter is of ``kind`` (``lora`` or ``gate``)."""
        stmt = select(SqlAdapter.kind).where(SqlAdapter.id == adapter_id, SqlAdapter.tenant_id == tenant_id)
        found = session.scalar(stmt)
        if found is None:
            raise NotFoundError(f"adapter {adapter_id} not found")
        if found != kind:
            raise ValidationError(f"adapter {adapter_id} is a {found!r} adapter, not {kind!r}")

    def list_adapters(self, session: Session, *, tenant_id: int, owner_user_id: int | None) -> list[Adapter]:
        stmt = select(SqlAdapter).where(SqlAdapter.tenant_id == tenant_id).order_by(SqlAdapter.id)
        if owner_user_id is not None:
            stmt = stmt.where(SqlAdapter.owner_user_id == owner_user_id)
        return [_adapter(row) for row in session.scalars(stmt)]

    # --- versions -------------------------------------------------------------------------------------------
    def check_references(self, session: Session, *, tenant_id: int, adapter_id: int, new: NewVersion) -> None:
        """Raise ``NotFoundError`` unless the adapter, parents, job and snapshot are all this tenant's."""
        self.get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
        self._require_versions(session, tenant_id=tenant_id, version_ids=[p for p, _ in new.parents])
        if new.job_id is not None:
            self._require_job(session, tenant_id=tenant_id, job_id=new.job_id)
        if new.dataset_snapshot_id is not None:
            self._require_snapshot(session, tenant_id=tenant_id, snapshot_id=new.dataset_snapshot_id)

    def _require_versions(self, session: Session, *, tenant_id: int, version_ids: Sequence[int]) -> None:
        if not version_ids:
            return
        stmt = _scoped_versions(tenant_id).where(SqlAdapterVersion.id.in_(version_ids))
        found = {row.id for row in session.scalars(stmt)}
        missing = sorted(set(version_ids) - found)
        if missing:
            raise NotFoundError(f"version {missing[0]} not found")

    def _require_job(self, session: Session, *, tenant_id: int, job_id: int) -> None:
        """A job of this tenant, or a system job (``tenant_id`` NULL, e.g. a batch across users)."""
        stmt = select(SqlJob.id).where(
            SqlJob.id == job_id, or_(SqlJob.tenant_id == tenant_id, SqlJob.tenant_id.is_(None))
        )
        if session.scalar(stmt) is None:
            raise NotFoundError(f"job {job_id} not found")

    def _require_snapshot(self, session: Session, *, tenant_id: int, snapshot_id: int) -> None:
        """A snapshot of one of this tenant's users, or one with no user (the table has no tenant column)."""
        stmt = _scoped_snapshots(tenant_id).where(SqlDatasetSnapshot.id == snapshot_id)
        if session.scalar(stmt) is None:
            raise NotFoundError(f"dataset snapshot {snapshot_id} not found")

    def next_version_number(self, session: Session, *, tenant_id: int, adapter_id: int) -> int:
        """Bump ``version_count`` atomically and return it: the row lock (PostgreSQL) or the database
        write lock (SQLite) is held until commit, and a rollback undoes the bump, so numbers have no gaps."""
        stmt = (
            update(SqlAdapter)
            .where(SqlAdapter.id == adapter_id, SqlAdapter.tenant_id == tenant_id)
            .values(version_count=SqlAdapter.version_count + 1)
            .returning(SqlAdapter.version_count)
            .execution_options(synchronize_session=False)
        )
        number = session.execute(stmt).scalar_one_or_none()
        if number is None:
            raise NotFoundError(f"adapter {adapter_id} not found")
        return int(number)

    def insert_version(
        self, session: Session, *, adapter_id: int, number: int, new: NewVersion
    ) -> AdapterVersion:
        row = SqlAdapterVersion(
            adapter_id=adapter_id,
            number=number,
            blob_uri=new.blob_uri,
            sha256=new.sha256,
            size_bytes=new.size_bytes,
            base_fingerprint=new.base_fingerprint,
            rank=new.rank,
            target_modules=list(new.target_modules),
            training_config=new.training_config,
            metrics=new.metrics,
            status=new.status,
            job_id=new.job_id,
            dataset_snapshot_id=new.dataset_snapshot_id,
            routing_key=None if new.routing_key is None else list(new.routing_key),
            routing_claim=None if new.routing_claim is None else list(new.routing_claim),
            created_at=utcnow(),
        )
        session.add(row)
        session.flush()
        session.add_all(
            SqlLineageEdge(child_version_id=row.id, parent_version_id=parent, relation=relation)
            for parent, relation in new.parents
        )
        session.flush()
        return _version(row)

    def get_version(
        self, session: Session, *, tenant_id: int, adapter_id: int, number: int
    ) -> AdapterVersion:
        stmt = _scoped_versions(tenant_id).where(
            SqlAdapterVersion.adapter_id == adapter_id, SqlAdapterVersion.number == number
        )
        row = session.scalar(stmt)
        if row is None:
            raise NotFoundError(f"version {number} of adapter {adapter_id} not found")
        return _version(row)

    def version_for_job(self, session: Session, *, adapter_id: int, job_id: int) -> AdapterVersion | None:
        """The adapter's version produced by ``job_id`` (unique index on ``(adapter_id, job_id)``), or None."""
        stmt = select(SqlAdapterVersion).where(
            SqlAdapterVersion.adapter_id == adapter_id, SqlAdapterVersion.job_id == job_id
        )
        row = session.scalar(stmt)
        return None if row is None else _version(row)

    def get_version_by_id(self, session: Session, *, tenant_id: int, version_id: int) -> AdapterVersion:
        row = session.scalar(_scoped_versions(tenant_id).where(SqlAdapterVersion.id == version_id))
        if row is None:
            raise NotFoundError(f"version {version_id} not found")
        return _version(row)

    def list_versions(
        self, session: Session, *, tenant_id: int, adapter_id: int, status: VersionStatus | None
    ) -> list[AdapterVersion]:
        self.get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
        stmt = (
            select(SqlAdapterVersion)
            .where(SqlAdapterVersion.adapter_id == adapter_id)
            .order_by(SqlAdapterVersion.number)
        )
        if status is not None:
            stmt = stmt.where(SqlAdapterVersion.status == status)
        return [_version(row) for row in session.scalars(stmt)]

    def scan_versions(
        self,
        session: Session,
        *,
        tenant_id: int | None,
        after_id: int = 0,
        limit: int = 500,
        exclude_status: VersionStatus | None = None,
    ) -> list[VersionLocation]:
        """Versions with an id above ``after_id``, by id, with their tenant, adapter and owner: the tenant's, or
        every tenant's with ``tenant_id`` None (an operator's scan; never a tenant's request)."""
        stmt = (
            select(SqlAdapterVersion, SqlAdapter.tenant_id, SqlTenant.name, SqlAdapter.name, SqlAdapter.kind)
            .add_columns(SqlUser.external_id)
            .join(SqlAdapter, SqlAdapter.id == SqlAdapterVersion.adapter_id)
            .join(SqlTenant, SqlTenant.id == SqlAdapter.tenant_id)
            .outerjoin(SqlUser, SqlUser.id == SqlAdapter.owner_user_id)
            .where(SqlAdapterVersion.id > after_id)
            .order_by(SqlAdapterVersion.id)
            .limit(limit)
        )
        if tenant_id is not None:
            stmt = stmt.where(SqlAdapter.tenant_id == tenant_id)
        if exclude_status is not None:
            stmt = stmt.where(SqlAdapterVersion.status != exclude_status)
        return [
            VersionLocation(_version(row), int(tenant), tenant_name, adapter_name, kind, owner)
            for row, tenant, tenant_name, adapter_name, kind, owner in session.execute(stmt).tuples()
        ]

    def claim_scrub_window(
        self, session: Session, *, name: str, max_versions: int, max_bytes: int, pass_seconds: float = 0.0
    ) -> list[VersionLocation]:
        """The next versions a periodic scrub checks, and the cursor moved past them, in the caller's transaction.

        At most ``max_versions`` versions and ``max_bytes`` bytes (the first version is taken even when it alone is
        larger, so no version is skipped forever), by id after the cursor, ``corrupt`` ones left out (they are not
        read again); past the last version the cursor starts over, once ``pass_seconds`` have gone by since the
        last pass ended (its end is recorded in ``updated_at``, with the cursor back at 0; nothing is read before).
        The cursor row is locked until commit, so two scrubbers claim disjoint windows."""
        if self._postgres:
            session.execute(
                pg_insert(SqlScrubCursor)
                .values(name=name, after_version_id=0, updated_at=_NO_PASS_YET)
                .on_conflict_do_nothing(index_elements=[SqlScrubCursor.name])
            )
            cursor = session.scalar(
                select(SqlScrubCursor).where(SqlScrubCursor.name == name).with_for_update()
            )
        else:
            cursor = session.get(SqlScrubCursor, name)  # SQLite: the transaction holds the write lock
        if cursor is None:
            cursor = SqlScrubCursor(name=name, after_version_id=0, updated_at=_NO_PASS_YET)
            session.add(cursor)
        now = utcnow()
        if cursor.after_version_id == 0 and (now - cursor.updated_at).total_seconds() < pass_seconds:
            return []  # the last pass ended less than pass_seconds ago
        corrupt = VersionStatus.CORRUPT
        found = self.scan_versions(
            session,
            tenant_id=None,
            after_id=cursor.after_version_id,
            limit=max_versions,
            exclude_status=corrupt,
        )
        if not found and cursor.after_version_id > 0:  # past the end: this pass is over
            if pass_seconds > 0:
                cursor.after_version_id, cursor.updated_at = 0, now
                session.flush()
                return []
            found = self.scan_versions(
                session, tenant_id=None, after_id=0, limit=max_versions, exclude_status=corrupt
            )
        if not found:
            return []  # nothing to check (an empty registry): the cursor stays as it is
        window: list[VersionLocation] = []
        total = 0
        for located in found:
            if window and total + located.version.size_bytes > max_bytes:
                break
            window.append(located)
            total += located.version.size_bytes
        cursor.after_version_id = window[-1].version.id
        cursor.updated_at = now
        session.flush()
        return window

    def set_routing_key(
        self,
        session: Session,
        *,
        tenant_id: int,
        version_id: int,
        key: tuple[float, ...],
        claim: tuple[float, ...] | None = None,
    ) -> None:
        """Store a version's routing key, and its routing claim when given (derived metadata; the weights stay
        immutable)."""
        self.get_version_by_id(session, tenant_id=tenant_id, version_id=version_id)
        values: dict[str, Any] = {"routing_key": list(key)}
        if claim is not None:
            values["routing_claim"] = list(claim)
        session.execute(
            update(SqlAdapterVersion)
            .where(SqlAdapterVersion.id == version_id)
            .values(**values)
            .execution_options(synchronize_session=False)
        )

    def update_status(self, session: Session, *, version_id: int, status: VersionStatus) -> None:
        session.execute(
            update(SqlAdapterVersion)
            .where(SqlAdapterVersion.id == version_id)
            .values(status=status)
            .execution_options(synchronize_session=False)
        )

    # --- the live alias --------------------------------------------------------------------------------------
    def live_version(self, session: Session, *, tenant_id: int, adapter_id: int) -> AdapterVersion | None:
        """One indexed query (primary keys only); ``NotFoundError`` if the adapter is not this tenant's."""
        stmt = (
            select(SqlAdapter.id, SqlAdapterVersion)
            .select_from(SqlAdapter)
            .outerjoin(SqlAlias, and_(SqlAlias.adapter_id == SqlAdapter.id, SqlAlias.name == LIVE))
            .outerjoin(SqlAdapterVersion, SqlAdapterVersion.id == SqlAlias.version_id)
            .where(SqlAdapter.id == adapter_id, SqlAdapter.tenant_id == tenant_id)
        )
        row = session.execute(stmt).one_or_none()
        if row is None:
            raise NotFoundError(f"adapter {adapter_id} not found")
        return None if row[1] is None else _version(row[1])

    def move_live(
        self,
        session: Session,
        *,
        adapter_id: int,
        current: AdapterVersion | None,
        target: AdapterVersion | None,
        actor: str,
        reason: str,
        forced: bool = False,
    ) -> AliasEvent:
        """Point ``live`` at ``target`` (None = no adapter) with an upsert, fix both versions' status and
        record the move (``forced``: QA had not passed the target); the caller holds the adapter's lock and
        commits all of it as one transaction."""
        now = utcnow()
        if current is not None:
            self.update_status(session, version_id=current.id, status=VersionStatus.ARCHIVED)
        if target is not None:
            self.update_status(session, version_id=target.id, status=VersionStatus.LIVE)
        self._upsert_live(
            session, adapter_id=adapter_id, version_id=None if target is None else target.id, now=now
        )
        event = SqlAliasEvent(
            adapter_id=adapter_id,
            alias=LIVE,
            from_version_id=None if current is None else current.id,
            to_version_id=None if target is None else target.id,
            actor=actor,
            reason=reason,
            created_at=now,
            forced=forced,
        )
        session.add(event)
        session.flush()
        return _event(event)

    def _upsert_live(
        self, session: Session, *, adapter_id: int, version_id: int | None, now: datetime
    ) -> None:
        insert = pg_insert if self._postgres else sqlite_insert
        stmt = insert(SqlAlias).values(
            adapter_id=adapter_id, name=LIVE, version_id=version_id, updated_at=now
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=[SqlAlias.adapter_id, SqlAlias.name],
            set_={"version_id": stmt.excluded.version_id, "updated_at": stmt.excluded.updated_at},
        )
        session.execute(stmt)

    def alias_history(self, session: Session, *, tenant_id: int, adapter_id: int) -> list[AliasEvent]:
        self.get_adapter(session, tenant_id=tenant_id, adapter_id=adapter_id)
        stmt = select(SqlAliasEvent).where(SqlAliasEvent.adapter_id == adapter_id).order_by(SqlAliasEvent.id)
        return [_event(row) for row in session.scalars(stmt)]

    # --- lineage ------------------------------------------------------------------------------------------
    def lineage_edges(self, session: Session, *, version_id: int, direction: Direction) -> list[LineageEdge]:
        """Every edge reachable from a version going up (parents) or down (children): one recursive query.

        ``UNION`` (not ``UNION ALL``) visits each edge once, so diamonds from merges never multiply paths."""
        edges = SqlLineageEdge.__table__
        step = edges.alias("step")
        cols = (edges.c.child_version_id, edges.c.parent_version_id, edges.c.relation)
        up = direction == "ancestors"
        start = edges.c.child_version_id if up else edges.c.parent_version_id
        walk = select(*cols).where(start == version_id).cte("walk", recursive=True)
        link = (
            step.c.child_version_id == walk.c.parent_version_id
            if up
            else step.c.parent_version_id == walk.c.child_version_id
        )
        walk = walk.union(
            select(step.c.child_version_id, step.c.parent_version_id, step.c.relation).join(walk, link)
        )
        rows = session.execute(select(walk)).all()
        return [LineageEdge(int(c), int(p), LineageRelation(r)) for c, p, r in rows]

    def lineage_nodes(
        self, session: Session, *, tenant_id: int, version_ids: Iterable[int]
    ) -> list[tuple[AdapterVersion, DatasetSnapshot | None, Job | None]]:
        """Versions (this tenant's only) with the dataset snapshot and job that produced each."""
        out: list[tuple[AdapterVersion, DatasetSnapshot | None, Job | None]] = []
        for chunk in chunks(sorted(set(version_ids))):
            stmt = (
                select(SqlAdapterVersion, SqlDatasetSnapshot, SqlJob)
                .join(SqlAdapter, SqlAdapter.id == SqlAdapterVersion.adapter_id)
                .outerjoin(SqlDatasetSnapshot, SqlDatasetSnapshot.id == SqlAdapterVersion.dataset_snapshot_id)
                .outerjoin(SqlJob, SqlJob.id == SqlAdapterVersion.job_id)
                .where(SqlAdapter.tenant_id == tenant_id, SqlAdapterVersion.id.in_(chunk))
            )
            for version, snapshot, job in session.execute(stmt).tuples():
                out.append(
                    (
                        _version(version),
                        None if snapshot is None else to_snapshot(snapshot),
                        None if job is None else to_job(job),
                    )
                )
        return out

    # --- blobs and the garbage collector ----------------------------------------------------------------
    def lock_blobs(self, session: Session, *, exclusive: bool) -> None:
        """Registration takes this shared, the GC exclusive, each until commit: a PostgreSQL advisory lock;
        on SQLite, starting the transaction now (``BEGIN IMMEDIATE``) takes the database write lock."""
        if self._postgres:
            fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
            session.execute(text(f"SELECT {fn}(:key)"), {"key": BLOB_GC_LOCK_KEY})
        else:
            session.connection()  # begins the transaction before the caller looks at the object store

    def referenced_sha256s(
        self, session: Session, *, digests: Iterable[str], now: datetime | None = None
    ) -> set[str]:
        """The digests among ``digests`` that something still needs (indexes on each): a version row that is not
        ``revoked``, a QA report of such a version, or, with ``now``, a deletion receipt holding the blob until
        its ``purge_after`` (``store.sql.receipts``). A revoked version's blob, and its QA reports' blobs, are
        referenced only through its receipt, so they go once the hold ends."""
        revoked = VersionStatus.REVOKED.value
        found: set[str] = set()
        for chunk in chunks(sorted(set(digests))):
            stmt = (
                select(SqlAdapterVersion.sha256)
                .where(SqlAdapterVersion.sha256.in_(chunk), SqlAdapterVersion.status != revoked)
                .distinct()
            )
            found.update(session.scalars(stmt))
            reports = (
                select(SqlQAReport.blob_sha256)
                .join(SqlAdapterVersion, SqlAdapterVersion.id == SqlQAReport.version_id)
                .where(SqlQAReport.blob_sha256.in_(chunk), SqlAdapterVersion.status != revoked)
                .distinct()
            )
            found.update(session.scalars(reports))
        if now is not None:
            found.update(set(digests) & blob_holds(session, now=now).held)
        return found


# --- helpers ---------------------------------------------------------------------------------------------
def _scoped_versions(tenant_id: int) -> Any:
    return (
        select(SqlAdapterVersion)
        .join(SqlAdapter, SqlAdapter.id == SqlAdapterVersion.adapter_id)
        .where(SqlAdapter.tenant_id == tenant_id)
    )


def _scoped_snapshots(tenant_id: int) -> Any:
    return (
        select(SqlDatasetSnapshot.id)
        .outerjoin(SqlUser, SqlUser.id == SqlDatasetSnapshot.user_id)
        .where(or_(SqlDatasetSnapshot.user_id.is_(None), SqlUser.tenant_id == tenant_id))
    )


def _adapter(row: SqlAdapter) -> Adapter:
    return from_row(Adapter, row, target_config=dict(row.target_config or {}))


def _version(row: SqlAdapterVersion) -> AdapterVersion:
    return from_row(
        AdapterVersion,
        row,
        target_modules=tuple(row.target_modules),
        training_config=dict(row.training_config or {}),
        metrics=dict(row.metrics or {}),
    )


def _event(row: SqlAliasEvent) -> AliasEvent:
    return from_row(AliasEvent, row, forced=bool(row.forced))
