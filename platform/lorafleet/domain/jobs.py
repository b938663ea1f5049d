"""The payload and the result of each job kind, as pydantic models (``JobKind`` → models).

A job row stores its payload and result as JSON objects; these models are their one definition. A payload is
validated where its job is submitted (``to_json`` is what is stored) and parsed where its handler starts
(``parse``: a malformed payload is a ``ValidationError`` naming the kind, since no retry can help). Results
are built as models by their handler and stored as ``to_json()``. The stored shapes are the ones jobs have
always had, so rows written before these models parse, and unknown keys are ignored.

Only the job kinds' own shapes live here; the generic queue (``lorafleet.jobs.queue``) stores any JSON object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from pydantic import ValidationError as PydanticValidationError

from lorafleet.domain.enums import JobKind, PromoteRule, QADecision, QAKind, SubjectKind
from lorafleet.domain.subject import Subject
from lorafleet.errors import ValidationError


class _JobModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    #: the job kind this model belongs to (for messages)
    job_kind: ClassVar[JobKind]
    #: what the stored JSON is called in messages: ``payload`` or ``result``
    part: ClassVar[str]

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None) -> Self:
        """The model of a stored JSON object; ``ValidationError`` (lorafleet's) naming the kind and field."""
        try:
            return cls.model_validate(dict(data or {}))
        except PydanticValidationError as exc:
            problems = "; ".join(
                ": ".join(filter(None, (".".join(str(p) for p in err["loc"]), err["msg"])))
                for err in exc.errors()
            )
            raise ValidationError(f"{cls.job_kind} job {cls.part}: {problems}") from None

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in the job row."""
        return self.model_dump(mode="json")


class _Payload(_JobModel):
    part: ClassVar[str] = "payload"


class _Result(_JobModel):
    part: ClassVar[str] = "result"


# --- train --------------------------------------------------------------------------------------------------
class TrainSubject(BaseModel):
    """One subject of a train job: a user, or a task's dataset (``kind`` ``task``), and where to train to."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    user_id: int
    #: the subject row's ``external_id`` (a task's is encoded, see ``lorafleet.domain.subject``)
    external_id: str
    #: absent in jobs queued before task subjects existed: a user
    kind: SubjectKind = SubjectKind.USER
    #: the newest feedback id to train through
    watermark: int
    #: where the subject's versions stood when the job was queued (None: never trained)
    trained_through_id: int | None = None

    @property
    def subject(self) -> Subject:
        return Subject.from_row(self.kind, self.external_id)


class TrainPayload(_Payload):
    """``training``: the job's ``TrainingConfig``, resolved when queued (absent in older jobs)."""

    job_kind: ClassVar[JobKind] = JobKind.TRAIN

    training: dict[str, Any] | None = None
    users: list[TrainSubject] = Field(min_length=1)


class TrainedVersion(BaseModel):
    """One new version of a train job's result."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    user_id: int
    #: the subject's label: the user's id, or ``task:<name>``
    external_id: str
    kind: SubjectKind
    adapter_id: int
    version_id: int
    number: int
    parent_version_id: int | None
    dataset_snapshot_id: int | None
    promote: bool
    promote_reason: str


class TrainResult(_Result):
    """The versions a train job registered, the subjects it skipped (label → why), and, when it trained, the
    promote rule it applied and (rule ``qa``) the QA jobs it queued."""

    job_kind: ClassVar[JobKind] = JobKind.TRAIN

    versions: list[TrainedVersion] = Field(default_factory=list)
    skipped: dict[str, str] = Field(default_factory=dict)
    promote_rule: PromoteRule | None = None
    qa_jobs: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        return {key: value for key, value in data.items() if value is not None}


# --- qa -----------------------------------------------------------------------------------------------------
class QARecheck(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    adapter_id: StrictInt
    cause: str = ""
    #: the task adapter whose enrolment or live version changed the bank, if one did: blamed first
    changed_adapter_id: StrictInt | None = None


class QAPayload(_Payload):
    """A candidate's QA (``{"version_id": id}``) or a live adapter's recheck (``{"recheck": {...}}``)."""

    job_kind: ClassVar[JobKind] = JobKind.QA

    version_id: StrictInt | None = None
    recheck: QARecheck | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if self.version_id is None and self.recheck is None:
            raise ValueError("needs 'version_id' or 'recheck': {'adapter_id': ...}")
        return self

    @classmethod
    def candidate(cls, version_id: int) -> QAPayload:
        return cls(version_id=int(version_id))

    @classmethod
    def recheck_of(cls, adapter_id: int, *, cause: str, changed_adapter_id: int | None = None) -> QAPayload:
        changed = None if changed_adapter_id is None else int(changed_adapter_id)
        return cls(recheck=QARecheck(adapter_id=int(adapter_id), cause=cause, changed_adapter_id=changed))

    @property
    def kind(self) -> QAKind:
        """A payload naming a version is a candidate's QA (it wins over a recheck, as it always has)."""
        return QAKind.CANDIDATE if self.version_id is not None else QAKind.RECHECK

    def to_json(self) -> dict[str, Any]:
        if self.version_id is not None:
            return {"version_id": self.version_id}
        assert self.recheck is not None
        return {"recheck": self.recheck.model_dump(mode="json", exclude_none=True)}


class QAResult(_Result):
    """The decision of a QA job (its report), or ``{"skipped": why}`` when there was nothing to decide."""

    job_kind: ClassVar[JobKind] = JobKind.QA

    report_id: int | None = None
    version_id: int | None = None
    kind: QAKind | None = None
    decision: QADecision | None = None
    reasons: list[str] | None = None
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        if self.skipped is not None:
            return {"skipped": self.skipped}
        del data["skipped"]
        return data


# --- import -------------------------------------------------------------------------------------------------
class _ImportTarget(_JobModel):
    """What an import job's payload and result share: where the version goes, a task adapter (``task``) or a
    user's own adapter (``user`` and ``adapter``; ``task`` is then None)."""

    job_kind: ClassVar[JobKind] = JobKind.IMPORT

    task: str | None = None
    #: a user's own adapter: the user's external id and the adapter's name
    user: str | None = None
    adapter: str | None = None


class ImportPayload(_ImportTarget, _Payload):
    """A PEFT archive (stored as a blob) to import as a version of a task adapter (``task``), or of a user's
    own adapter (``user`` and ``adapter``; ``task`` is then None)."""

    archive_sha256: str
    archive_size: int
    example_prompts: list[str]
    actor: str
    reason: str = ""
    #: the import's evidence: ``{"prompt", "expected"}`` objects QA answers as the version's holdout
    examples: list[dict[str, str]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if (self.task is None) == (self.user is None) or (self.user is None) != (self.adapter is None):
            raise ValueError("an import names a task, or a user and their adapter")
        return self

    @property
    def adapter_name(self) -> str:
        """The name of the adapter the import adds a version to (the task's, or the user's adapter's)."""
        name = self.task if self.task is not None else self.adapter
        assert name is not None
        return name

    @property
    def target(self) -> str:
        """How logs name where the import goes: ``task 'x'`` or ``adapter 'a' of user 'u'``."""
        return (
            f"task {self.task!r}"
            if self.task is not None
            else f"adapter {self.adapter!r} of user {self.user!r}"
        )

    def to_json(self) -> dict[str, Any]:
        # a task import, and one without evidence, keep the payload they had before users and examples
        return _without_empty(super().to_json(), "examples", "task", "user", "adapter")


def _without_empty(data: dict[str, Any], *keys: str) -> dict[str, Any]:
    """``data`` without those of ``keys`` whose value is None or empty."""
    return {k: v for k, v in data.items() if not (k in keys and v in (None, [], {}))}


class ImportResult(_ImportTarget, _Result):
    """The version an import registered, and (promote rule ``qa``) the QA job it queued."""

    adapter_id: int
    version_id: int
    number: int
    parent_version_id: int | None
    source_sha256: str
    qa_job: int | None = None

    def to_json(self) -> dict[str, Any]:
        return _without_empty(self.model_dump(mode="json"), "qa_job", "task", "user", "adapter")


#: each job kind's payload model
PAYLOADS: dict[JobKind, type[_Payload]] = {
    JobKind.TRAIN: TrainPayload,
    JobKind.QA: QAPayload,
    JobKind.IMPORT: ImportPayload,
}
#: each job kind's result model
RESULTS: dict[JobKind, type[_Result]] = {
    JobKind.TRAIN: TrainResult,
    JobKind.QA: QAResult,
    JobKind.IMPORT: ImportResult,
}

__all__ = [
    "PAYLOADS",
    "RESULTS",
    "ImportPayload",
    "ImportResult",
    "QAPayload",
    "QARecheck",
    "QAResult",
    "TrainPayload",
    "TrainResult",
    "TrainSubject",
    "TrainedVersion",
]
