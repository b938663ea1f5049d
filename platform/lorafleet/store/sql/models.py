"""SQLAlchemy 2 tables of the metadata store.

ORM rows (``Sql*``) never leave ``lorafleet.store``: repositories turn them into the frozen objects of
``lorafleet.domain``. The schema changes only through Alembic migrations in ``migrations/``; a test checks
that these models and the migrated schema agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from lorafleet.domain.enums import ACTIVE_JOB_STATES as DOMAIN_ACTIVE_JOB_STATES
from lorafleet.domain.enums import (
    AdapterKind,
    AuditAction,
    DeletionKind,
    EnrolmentAction,
    FeedbackKind,
    JobState,
    LineageRelation,
    QADecision,
    QAKind,
    SubjectKind,
    VersionStatus,
    values,
)

#: A 64-bit key on PostgreSQL; on SQLite only ``INTEGER PRIMARY KEY`` auto-increments, hence the variant.
BigIntKey = BigInteger().with_variant(Integer(), "sqlite")

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# The columns' allowed values, as plain strings, built from the enums of ``lorafleet.domain.enums``.
FEEDBACK_KINDS = values(FeedbackKind)
VERSION_STATUSES = values(VersionStatus)
LINEAGE_RELATIONS = values(LineageRelation)
JOB_STATES = values(JobState)
ACTIVE_JOB_STATES = tuple(state.value for state in DOMAIN_ACTIVE_JOB_STATES)
#: ``lora``: a PEFT LoRA adapter; ``gate``: a user's learned routing gate (its versions are safetensors files)
ADAPTER_KINDS = values(AdapterKind)
ENROLMENT_ACTIONS = values(EnrolmentAction)
SUBJECT_KINDS = values(SubjectKind)
AUDIT_ACTIONS = values(AuditAction)
DELETION_KINDS = values(DeletionKind)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that is timezone-aware UTC on every backend: SQLite keeps no offset, so
    values are stored as UTC and read back with ``tzinfo=UTC`` (PostgreSQL's ``timestamptz`` already is)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is None:
            return value
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class SqlTenant(Base):
    __tablename__ = "tenants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: the tenant's ``TrainingConfig`` overrides (migration 0008); a job's own overrides go on top
    training_config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class SqlApiKey(Base):
    """A tenant's API key, stored as sha256 of the secret; ``prefix`` identifies it in logs."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: when the key last authenticated a request (kept to the minute: ``TenantRepository.authenticate``)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class SqlUser(Base):
    """A *subject* that owns feedback and trains adapters: one of the tenant's users (``kind`` ``user``), or a
    shared task's dataset (``kind`` ``task``, see ``lorafleet.workflows.tasks``): both are trained the same way, so a task
    reuses the feedback, scheduling and job tables instead of duplicating them. A task row's ``external_id`` is
    ``lorafleet.domain.subject.TASK_SUBJECT_PREFIX`` + the task name: real users' ids are printable, so the two can never collide."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("tenant_id", "external_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(
        String(8), default=SubjectKind.USER.value, server_default=SubjectKind.USER.value
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SqlFeedback(Base):
    """One feedback record; ``content_hash`` (sha256 of kind + canonical payload) dedupes per user."""

    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("user_id", "content_hash"),
        CheckConstraint(_in("kind", FEEDBACK_KINDS), name="kind"),
        # "users with new feedback since their last version": range scans of a user's ids
        Index("ix_feedback_user_id_id", "user_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SqlDatasetSnapshot(Base):
    """The feedback records one training run used: an id range (min..max) or an explicit list, and a hash."""

    __tablename__ = "dataset_snapshots"

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True, index=True
    )
    min_record_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_record_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    record_ids: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    record_count: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SqlAdapter(Base):
    """A named adapter owned by a user, or tenant-wide (``owner_user_id`` NULL) for shared task adapters."""

    __tablename__ = "adapters"
    __table_args__ = (
        Index(
            "uq_adapters_user_name",
            "tenant_id",
            "owner_user_id",
            "name",
            unique=True,
            postgresql_where=text("owner_user_id IS NOT NULL"),
            sqlite_where=text("owner_user_id IS NOT NULL"),
        ),
        Index(
            "uq_adapters_task_name",
            "tenant_id",
            "name",
            unique=True,
            postgresql_where=text("owner_user_id IS NULL"),
            sqlite_where=text("owner_user_id IS NULL"),
        ),
        CheckConstraint(_in("kind", ADAPTER_KINDS), name="kind"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    owner_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), nullable=True
    )
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(
        String(16), default=AdapterKind.LORA.value, server_default=AdapterKind.LORA.value
    )
    target_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    #: Number of versions ever registered; bumped in the registering transaction (gap-free numbering).
    version_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SqlJob(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("state", JOB_STATES), name="state"),
        # a dedupe key is unique among active jobs only: the same work may run again once finished
        Index(
            "uq_jobs_active_dedupe_key",
            "dedupe_key",
            unique=True,
            postgresql_where=text(f"state IN {ACTIVE_JOB_STATES!r}"),
            sqlite_where=text(f"state IN {ACTIVE_JOB_STATES!r}"),
        ),
        Index("ix_jobs_state_run_after", "state", "run_after"),
    )

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), nullable=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED.value)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    dedupe_key: Mapped[str | None] = mapped_column(String(256), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    run_after: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: the running job's latest progress report (step, total, per-subject loss, ETA), throttled by the worker
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    #: a cancel request: the worker stops the job at its next step and it ends ``cancelled``
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancelled_by: Mapped[str | None] = mapped_column(String(256), nullable=True)


class SqlAdapterVersion(Base):
    """An immutable adapter version; its weights are the blob ``sha256`` (written before this row)."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "number"),
        CheckConstraint(_in("status", VERSION_STATUSES), name="status"),
        CheckConstraint("number >= 1", name="number_positive"),
        Index("ix_adapter_versions_sha256", "sha256"),
        # at most one version per job and adapter, even when a job runs twice (NULL job ids are distinct)
        Index("uq_adapter_versions_adapter_id_job_id", "adapter_id", "job_id", unique=True),
    )

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    blob_uri: Mapped[str] = mapped_column(String(1024))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    base_fingerprint: Mapped[str] = mapped_column(String(128))
    rank: Mapped[int] = mapped_column(Integer)
    target_modules: Mapped[list[Any]] = mapped_column(JSON)
    training_config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=VersionStatus.CANDIDATE.value)
    job_id: Mapped[int | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True, index=True
    )
    dataset_snapshot_id: Mapped[int | None] = mapped_column(
        ForeignKey("dataset_snapshots.id", ondelete="SET NULL"), nullable=True
    )
    #: normalised mean of pooled base-model embeddings of the training prompts (the centroid gate's key)
    routing_key: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    #: the version's routing claim (``routing.embeddings.fit_claim``), for the gate's base side; null before it
    routing_claim: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: when the version was revoked (a record it was trained on was deleted: ``lorafleet.workflows.deletion``)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class SqlScrubCursor(Base):
    """Where a periodic blob scrub goes on: the id of the last version it claimed (0: start over). Scrubbers
    claim their next window under this row's lock, so restarts resume and concurrent schedulers never overlap."""

    __tablename__ = "scrub_cursors"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    after_version_id: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SqlLineageEdge(Base):
    """Child version → parent version, with how the child came from the parent."""

    __tablename__ = "lineage_edges"
    __table_args__ = (
        CheckConstraint(_in("relation", LINEAGE_RELATIONS), name="relation"),
        CheckConstraint("child_version_id <> parent_version_id", name="not_self"),
    )

    child_version_id: Mapped[int] = mapped_column(
        BigIntKey, ForeignKey("adapter_versions.id", ondelete="CASCADE"), primary_key=True
    )
    parent_version_id: Mapped[int] = mapped_column(
        BigIntKey, ForeignKey("adapter_versions.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    relation: Mapped[str] = mapped_column(String(32))


class SqlAlias(Base):
    """A movable pointer (``live``) from an adapter to one of its versions; NULL means "no adapter"."""

    __tablename__ = "aliases"

    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    version_id: Mapped[int | None] = mapped_column(
        BigIntKey, ForeignKey("adapter_versions.id", ondelete="RESTRICT"), nullable=True
    )
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SqlAliasEvent(Base):
    """One move of an alias: who, when, from, to, why."""

    __tablename__ = "alias_history"
    __table_args__ = (Index("ix_alias_history_adapter_id_id", "adapter_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    alias: Mapped[str] = mapped_column(String(32))
    from_version_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    to_version_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    actor: Mapped[str] = mapped_column(String(256))
    reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: a person made a version live that QA had not passed (``force`` under the promote rule ``qa``)
    forced: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class SqlJobUser(Base):
    """A user a job trains, and the feedback id it trains through (its ``watermark``).

    Kept as rows rather than inside ``jobs.payload`` so "users with an active job" and "a user's recent
    failed jobs" are indexed joins instead of JSON scans.
    """

    __tablename__ = "job_users"

    job_id: Mapped[int] = mapped_column(
        BigIntKey, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    watermark: Mapped[int] = mapped_column(BigInteger)


class SqlEnrolment(Base):
    """A user enrolled in one of the tenant's shared task adapters (it joins the user's experts)."""

    __tablename__ = "enrolments"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    adapter_id: Mapped[int] = mapped_column(
        ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    actor: Mapped[str] = mapped_column(String(256))
    enrolled_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SqlEnrolmentEvent(Base):
    """One enrol or unenrol: who, when, which user and task adapter."""

    __tablename__ = "enrolment_events"
    __table_args__ = (
        CheckConstraint(_in("action", ENROLMENT_ACTIONS), name="action"),
        Index("ix_enrolment_events_user_id_id", "user_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    action: Mapped[str] = mapped_column(String(16))
    actor: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SqlGateSettings(Base):
    """A user's gate settings (``lorafleet.routing.GateSpec`` as JSON), set by the tenant; absent = default."""

    __tablename__ = "gate_settings"

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    actor: Mapped[str] = mapped_column(String(256))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


QA_KINDS = values(QAKind)
QA_DECISIONS = values(QADecision)


class SqlQAReport(Base):
    """One QA run on a version: decision, reasons and summary; the full matrix is the JSON blob ``blob_sha256``.

    ``job_id`` is unique, so a QA job that is retried or taken over decides once.
    """

    __tablename__ = "qa_reports"
    __table_args__ = (
        CheckConstraint(_in("kind", QA_KINDS), name="kind"),
        CheckConstraint(_in("decision", QA_DECISIONS), name="decision"),
        UniqueConstraint("job_id"),
    )

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    version_id: Mapped[int] = mapped_column(
        BigIntKey, ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    policy_version: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(16))
    reasons: Mapped[list[Any]] = mapped_column(JSON)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: the blob GC treats this digest as referenced (``Registry.gc``)
    blob_sha256: Mapped[str] = mapped_column(String(64), index=True)
    blob_uri: Mapped[str] = mapped_column(String(1024))
    blob_size_bytes: Mapped[int] = mapped_column(BigInteger)
    job_id: Mapped[int | None] = mapped_column(
        BigIntKey, ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SqlDeletionReceipt(Base):
    """What one deletion did (``lorafleet.domain.DeletionReceipt``): hashes and ids only. ``tenant_id`` has no
    foreign key (a receipt outlives what it describes). ``blobs`` are held from the gc until ``purge_after``;
    ``blobs_deleted_at`` is set once they are gone."""

    __tablename__ = "deletion_receipts"
    __table_args__ = (
        CheckConstraint(_in("kind", DELETION_KINDS), name="kind"),
        Index("ix_deletion_receipts_tenant_id_created_at", "tenant_id", "created_at"),
        Index("ix_deletion_receipts_blobs_deleted_at", "blobs_deleted_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    subject: Mapped[str] = mapped_column(String(300))
    actor: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    record_hashes: Mapped[list[Any]] = mapped_column(JSON)
    revoked_versions: Mapped[list[Any]] = mapped_column(JSON)
    erased: Mapped[dict[str, Any]] = mapped_column(JSON)
    blobs: Mapped[list[Any]] = mapped_column(JSON)
    purge_after: Mapped[datetime] = mapped_column(UTCDateTime())
    blobs_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    rebuild_job_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    adapter_ids: Mapped[list[Any]] = mapped_column(JSON)


class SqlIdempotencyKey(Base):
    """A tenant's ``Idempotency-Key`` and the response it produced, written in the request's own transaction
    (``store.sql.idempotency``). Status NULL only in rows an older version left reserved before a crash.

    ``request_hash`` (sha256 of method, path and body) tells a retry from another request reusing the key.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (
        UniqueConstraint("tenant_id", "key"),
        Index("ix_idempotency_keys_tenant_id_subject", "tenant_id", "subject"),
    )

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(256))
    request_hash: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    #: the user (external id) whose path the request was on, if any: forgetting that user deletes the entry
    subject: Mapped[str | None] = mapped_column(String(256), nullable=True)


class SqlAuditEvent(Base):
    """One event of the append-only audit log (``lorafleet.store.sql.audit_repository``): inserted in the
    transaction of the action it records, never updated or deleted (triggers refuse both, migration 0013).
    ``tenant_id`` has no foreign key: the log outlives what it records; NULL is an admin-wide event."""

    __tablename__ = "audit_events"
    __table_args__ = (
        CheckConstraint(_in("action", AUDIT_ACTIONS), name="action"),
        Index("ix_audit_events_tenant_id_id", "tenant_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


__all__ = [
    "Base",
    "SqlTenant",
    "SqlApiKey",
    "SqlUser",
    "SqlFeedback",
    "SqlDatasetSnapshot",
    "SqlAdapter",
    "SqlJob",
    "SqlAdapterVersion",
    "SqlScrubCursor",
    "SqlLineageEdge",
    "SqlAlias",
    "SqlAliasEvent",
    "SqlJobUser",
    "SqlEnrolment",
    "SqlEnrolmentEvent",
    "SqlGateSettings",
    "SqlQAReport",
    "SqlDeletionReceipt",
    "SqlIdempotencyKey",
    "SqlAuditEvent",
]
