"""Every fixed set of strings the platform stores or sends, defined once as a ``StrEnum``.

A member *is* its string (``JobState.QUEUED == "queued"``, ``str(JobState.QUEUED) == "queued"``, and JSON
encodes it as ``"queued"``), so the database rows, the HTTP API and old stored payloads keep their values.
SQL CHECK constraints are built from these enums (``values``), never from a second list.
"""

from __future__ import annotations

from enum import StrEnum


class FeedbackKind(StrEnum):
    """The kind of a feedback record."""

    SFT = "sft"
    PREFERENCE = "preference"
    RATING = "rating"


class VersionStatus(StrEnum):
    """An adapter version's status; ``live`` is set only by moving the alias (promote or rollback).

    ``corrupt``: its blob failed verification (a wrong digest or size, or gone from the object store); the
    version is quarantined: never served, never a promote or rollback target, and its status never changes again
    (``lorafleet.workflows.blob_verify`` sets it).

    ``revoked``: its training data held a record that was deleted since (``lorafleet.workflows.deletion``):
    never served, never a promote or rollback target, its blob deleted after the gc grace period; final.
    """

    CANDIDATE = "candidate"
    LIVE = "live"
    REJECTED = "rejected"
    ARCHIVED = "archived"
    CORRUPT = "corrupt"
    REVOKED = "revoked"


#: statuses a version can never go live from (QA rejected it, its blob failed verification, or its data was
#: deleted)
UNSERVABLE_STATUSES: tuple[VersionStatus, ...] = (
    VersionStatus.REJECTED,
    VersionStatus.CORRUPT,
    VersionStatus.REVOKED,
)
#: statuses that never change again
FINAL_STATUSES: tuple[VersionStatus, ...] = (VersionStatus.CORRUPT, VersionStatus.REVOKED)


class BlobCheck(StrEnum):
    """What re-hashing a version's blob found (``lorafleet verify``, the scheduler's scrub).

    ``unreadable``: the object store failed for another reason (network, permissions): nothing is known about the
    bytes, so such a version is reported but never repaired. ``quarantined``: the version is already ``corrupt``
    (or ``revoked``: its blob is deleted on purpose) and was not read again.
    """

    OK = "ok"
    CORRUPT = "corrupt"
    MISSING = "missing"
    UNREADABLE = "unreadable"
    QUARANTINED = "quarantined"

    @property
    def bad(self) -> bool:
        """A blob known to be wrong: what a repair quarantines."""
        return self in (BlobCheck.CORRUPT, BlobCheck.MISSING)


class LineageRelation(StrEnum):
    """How a version relates to a parent version."""

    CONTINUED_FROM = "continued-from"
    MERGED_FROM = "merged-from"
    IMPORTED = "imported"


class JobState(StrEnum):
    """A job's state: ``queued`` → ``running`` → one of the finished states (or back to ``queued`` to retry)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """Whether nothing more happens to a job in this state."""
        return self in FINISHED_JOB_STATES


#: states a job can still change from (at most one active job per user, one per dedupe key)
ACTIVE_JOB_STATES: tuple[JobState, ...] = (JobState.QUEUED, JobState.RUNNING)
#: states after which nothing more happens to a job
FINISHED_JOB_STATES: tuple[JobState, ...] = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobKind(StrEnum):
    """What a job does; each kind has its payload and result model in ``lorafleet.domain.jobs``."""

    TRAIN = "train"
    QA = "qa"
    IMPORT = "import"


class SubjectKind(StrEnum):
    """Whose data a training subject is: a user's, or a shared task's (``lorafleet.domain.subject``)."""

    USER = "user"
    TASK = "task"


class AdapterKind(StrEnum):
    """``lora``: a PEFT LoRA adapter; ``gate``: a user's learned routing gate (versions are safetensors)."""

    LORA = "lora"
    GATE = "gate"


class EnrolmentAction(StrEnum):
    """A recorded change of a user's enrolment in a task adapter."""

    ENROL = "enrol"
    UNENROL = "unenrol"


class QAKind(StrEnum):
    """``candidate``: QA of a new version (promote or reject); ``recheck``: of a live one (keep or roll back)."""

    CANDIDATE = "candidate"
    RECHECK = "recheck"


class QADecision(StrEnum):
    """What a QA run decided."""

    PROMOTE = "promote"
    REJECT = "reject"
    KEEP = "keep"
    ROLLBACK = "rollback"
    #: no evidence to decide by (an import without examples or feedback): stays a candidate for a person
    HOLD = "hold"


class PromoteRule(StrEnum):
    """How new versions go live: ``qa`` (a QA job decides), or a rule applied when training ends."""

    HOLDOUT_IMPROVED = "holdout-improved"
    NEVER = "never"
    ALWAYS = "always"
    QA = "qa"


class AuditAction(StrEnum):
    """What an audit event records (``lorafleet.workflows.audit``): data rights actions, forced promotes and
    rollbacks, key and tenant changes."""

    PROMOTE_FORCED = "promote.forced"
    ROLLBACK = "rollback"
    KEY_CREATED = "key.created"
    KEY_REVOKED = "key.revoked"
    EXPORT_VERSION = "export.version"
    EXPORT_FEEDBACK = "export.feedback"
    DELETE_RECORDS = "delete.records"
    DELETE_USER = "delete.user"
    TENANT_CREATED = "tenant.created"


class DeletionKind(StrEnum):
    """What a deletion receipt records: some of a subject's records, or a whole user."""

    RECORDS = "records"
    USER = "user"


def values(enum: type[StrEnum]) -> tuple[str, ...]:
    """The members' plain string values, in definition order (for SQL CHECK constraints and messages)."""
    return tuple(member.value for member in enum)


__all__ = [
    "ACTIVE_JOB_STATES",
    "FINISHED_JOB_STATES",
    "UNSERVABLE_STATUSES",
    "AdapterKind",
    "AuditAction",
    "BlobCheck",
    "DeletionKind",
    "FINAL_STATUSES",
    "EnrolmentAction",
    "FeedbackKind",
    "JobKind",
    "JobState",
    "LineageRelation",
    "PromoteRule",
    "QADecision",
    "QAKind",
    "SubjectKind",
    "VersionStatus",
    "values",
]
