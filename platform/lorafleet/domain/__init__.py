"""Plain, frozen domain objects: what the library's functions take and return (never ORM rows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lorafleet.domain.enums import (
    ACTIVE_JOB_STATES,
    FINAL_STATUSES,
    FINISHED_JOB_STATES,
    UNSERVABLE_STATUSES,
    AdapterKind,
    AuditAction,
    BlobCheck,
    DeletionKind,
    EnrolmentAction,
    FeedbackKind,
    JobKind,
    JobState,
    LineageRelation,
    PromoteRule,
    QADecision,
    QAKind,
    SubjectKind,
    VersionStatus,
)

#: the name of the alias that marks a version as served (its version's status is ``VersionStatus.LIVE``)
LIVE = "live"


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    created_at: datetime


@dataclass(frozen=True)
class User:
    id: int
    tenant_id: int
    external_id: str
    created_at: datetime


@dataclass(frozen=True)
class FeedbackRecord:
    id: int
    user_id: int
    kind: FeedbackKind
    payload: dict[str, Any]
    content_hash: str
    created_at: datetime


@dataclass(frozen=True)
class DatasetSnapshot:
    """Which feedback records a training run used (an id range or an explicit list) and their hash."""

    id: int
    user_id: int | None
    record_count: int
    content_hash: str
    min_record_id: int | None = None
    max_record_id: int | None = None
    record_ids: tuple[int, ...] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass(frozen=True)
class Adapter:
    """A named adapter of a user, or of the whole tenant when ``owner_user_id`` is None (a task adapter)."""

    id: int
    tenant_id: int
    owner_user_id: int | None
    name: str
    target_config: dict[str, Any]
    created_at: datetime

    @property
    def is_task_adapter(self) -> bool:
        return self.owner_user_id is None


@dataclass(frozen=True)
class VersionContent:
    """What a version records of its weights and how they were made (shared by ``AdapterVersion`` and the
    store's ``NewVersion``, the row about to be inserted)."""

    blob_uri: str
    sha256: str
    size_bytes: int
    base_fingerprint: str
    rank: int
    target_modules: tuple[str, ...]
    training_config: dict[str, Any]
    metrics: dict[str, Any]
    status: VersionStatus


@dataclass(frozen=True)
class AdapterVersion(VersionContent):
    """An immutable version: weights in the object store under ``sha256``; everything else is metadata."""

    id: int
    adapter_id: int
    number: int
    created_at: datetime
    job_id: int | None = None
    dataset_snapshot_id: int | None = None
    #: when the version was revoked (status ``revoked``: a record it was trained on was deleted)
    revoked_at: datetime | None = None


@dataclass(frozen=True)
class LineageEdge:
    child_version_id: int
    parent_version_id: int
    relation: LineageRelation


@dataclass(frozen=True)
class AliasEvent:
    """One recorded move of an alias (``live``): who, when, from, to, why."""

    id: int
    adapter_id: int
    alias: str
    from_version_id: int | None
    to_version_id: int | None
    actor: str
    reason: str
    created_at: datetime
    #: a person made a version live that QA had not passed (``force`` under the promote rule ``qa``)
    forced: bool = False


@dataclass(frozen=True)
class Job:
    id: int
    tenant_id: int | None
    kind: str
    state: JobState
    payload: dict[str, Any]
    attempts: int
    max_attempts: int
    created_at: datetime
    dedupe_key: str | None = None
    result: dict[str, Any] | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    heartbeat_at: datetime | None = None
    run_after: datetime | None = None
    error: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: the running job's latest progress report (``lorafleet.jobs.progress``), None before the first
    progress: dict[str, Any] | None = None
    #: when a cancel was requested and by whom (a running job stops at its next step and ends ``cancelled``)
    cancel_requested_at: datetime | None = None
    cancelled_by: str | None = None


@dataclass(frozen=True)
class UserSummary:
    """One of a tenant's users as a listing shows them: their adapters' live version numbers (adapter name ->
    number, only adapters with one live), when their newest feedback record was stored, and how many adapter
    versions and feedback records they have."""

    id: int
    external_id: str
    created_at: datetime
    live_versions: dict[str, int]
    last_feedback_at: datetime | None
    version_count: int
    feedback_count: int


@dataclass(frozen=True)
class AuditEvent:
    """One row of the append-only audit log: who (``actor``) did what (``action``) to what (``target``, e.g.
    ``user:ada/personal@3``), when, in which tenant (None: an admin-wide event). ``details`` holds ids and hashes
    only, never personal content."""

    id: int
    tenant_id: int | None
    at: datetime
    actor: str
    action: AuditAction
    target: str
    details: dict[str, Any]


@dataclass(frozen=True)
class DeletionReceipt:
    """What one deletion did, kept retrievable (``GET /v1/deletions/{id}``): what was asked (``request``), the
    content hashes of the records removed, the versions revoked (``{"adapter", "number", "version_id",
    "sha256"}``), what else was erased (counts, for a user), the blobs and when they are deleted, the rebuild
    job, timestamps and the actor. Ids and hashes only, never personal content.

    ``subject`` is ``user:<id>`` or ``task:<name>``; ``purge_after``: when the blobs may be deleted (the gc grace
    period after the deletion, or at once with ``purge``); ``blobs_deleted_at``: when they were.
    """

    id: str
    tenant_id: int
    kind: DeletionKind
    subject: str
    actor: str
    created_at: datetime
    request: dict[str, Any]
    record_hashes: tuple[str, ...]
    revoked_versions: tuple[dict[str, Any], ...]
    erased: dict[str, int]
    blobs: tuple[str, ...]
    purge_after: datetime
    blobs_deleted_at: datetime | None = None
    rebuild_job_id: int | None = None
    #: the adapters whose versions were revoked (a rebuilt version is the first clean one after ``created_at``)
    adapter_ids: tuple[int, ...] = ()


__all__ = [
    "ACTIVE_JOB_STATES",
    "FINAL_STATUSES",
    "FINISHED_JOB_STATES",
    "LIVE",
    "UNSERVABLE_STATUSES",
    "Adapter",
    "AdapterKind",
    "AdapterVersion",
    "AliasEvent",
    "AuditAction",
    "AuditEvent",
    "BlobCheck",
    "DatasetSnapshot",
    "DeletionKind",
    "DeletionReceipt",
    "EnrolmentAction",
    "FeedbackKind",
    "FeedbackRecord",
    "Job",
    "JobKind",
    "JobState",
    "LineageEdge",
    "LineageRelation",
    "PromoteRule",
    "QADecision",
    "QAKind",
    "SubjectKind",
    "Tenant",
    "User",
    "UserSummary",
    "VersionContent",
    "VersionStatus",
]
