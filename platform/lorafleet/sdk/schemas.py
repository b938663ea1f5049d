"""Request and response bodies of the HTTP API, shared by the service (``services/api``) and the SDK.

Plain pydantic models: importing this module imports neither torch nor SQLAlchemy. Feedback records are the
library's own schemas (``lorafleet.feedback``), so the service, the SDK and ingestion agree on one definition.
Times are timezone-aware UTC. The OpenAI-compatible bodies carry only the fields lorafleet serves, plus a
``lorafleet`` extension on responses (which adapter versions served the request, with the gate's weights).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    StrictBool,
    StrictInt,
    ValidationInfo,
    field_validator,
)

from lorafleet.domain.enums import (
    FINISHED_JOB_STATES,
    AuditAction,
    FeedbackKind,
    JobState,
    QADecision,
    VersionStatus,
)
from lorafleet.domain.text import MAX_INT32, MAX_INT64, free_text, printable_name
from lorafleet.feedback import (
    FeedbackIn,
    FeedbackMessage,
    FeedbackRole,
    PreferenceFeedback,
    RatingFeedback,
    SftFeedback,
)
from lorafleet.sdk.training import TrainingConfigOut, TrainingOverrides, TrainingValues, TrainRequest
from lorafleet.serving.requests import BANK_MODEL, MAX_LOGPROBS, MIN_TEMPERATURE

#: the limits of ``lorafleet.serving.requests`` (repeated here so the schemas need no serving import)
MAX_NEW_TOKENS = 4096
MAX_STOP_STRINGS = 16
#: the most choices (``n``) one OpenAI request may ask for per prompt
MAX_CHOICES = 16
#: a name (tenant, task) is printable; free text (a reason, a prompt) holds no NUL (``lorafleet.domain.text``)
Name = Annotated[str, AfterValidator(printable_name)]
FreeText = Annotated[str, AfterValidator(free_text)]
#: a version number: a JSON integer (not ``true``, not ``"5"``) that fits the database's ``integer`` column
VersionNumber = Annotated[StrictInt, Field(ge=1, le=MAX_INT32)]

__all__ = [
    "DeletionReceiptOut",
    "RebuildOut",
    "RebuiltVersionOut",
    "RevokedVersionOut",
    "FINISHED_JOB_STATES",
    "AuditAction",
    "AuditEventOut",
    "UserOut",
    "AdapterOut",
    "AliasEventOut",
    "ImportExample",
    "AssistantMessage",
    "ApiKeyCreated",
    "ApiKeyOut",
    "ChatChoice",
    "DownloadedFile",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatDelta",
    "ChatMessage",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionChunkChoice",
    "CompletionRequest",
    "CompletionResponse",
    "DatasetSnapshotOut",
    "EnrolRequest",
    "EnrolmentOut",
    "ErrorBody",
    "ErrorDetail",
    "FeedbackBatch",
    "FeedbackIn",
    "FeedbackMessage",
    "FeedbackRecordOut",
    "FeedbackSubmitted",
    "GenerateRequest",
    "GenerateResponse",
    "HealthOut",
    "JobOut",
    "JobProgressOut",
    "JobState",
    "JobSummaryOut",
    "LineageEdgeOut",
    "LineageNodeOut",
    "LineageOut",
    "MAX_CHOICES",
    "ModelList",
    "ModelOut",
    "PreferenceFeedback",
    "PromoteRequest",
    "QAReportOut",
    "RatingFeedback",
    "ReadyOut",
    "ResponseFormat",
    "RollbackRequest",
    "ServedByOut",
    "ServingInfo",
    "SftFeedback",
    "StreamOptions",
    "TenantCreate",
    "TenantCreated",
    "TenantOut",
    "TextPart",
    "TrainRequest",
    "TrainSubmitted",
    "TrainingConfigOut",
    "TrainingOverrides",
    "TrainingValues",
    "Usage",
    "VerifyCountsOut",
    "VerifyReportOut",
    "VerifyRequest",
    "VersionCheckOut",
    "VersionDetail",
    "VersionOut",
]


class _Out(BaseModel):
    """A response body: unknown fields from a newer server are kept, never an error in an older SDK."""

    model_config = ConfigDict(extra="allow")


class _In(BaseModel):
    """A request body: unknown fields are refused (a typo must not silently drop an argument)."""

    model_config = ConfigDict(extra="forbid")


# --- errors ---------------------------------------------------------------------------------------------------
class ErrorDetail(_Out):
    code: str = Field(description="Stable machine-readable name (``lorafleet.errors`` codes).")
    message: str
    field: str | None = Field(default=None, description="Where the input was wrong, e.g. records[2].prompt.")
    state: str | None = Field(default=None, description="The object's state, when the error is about it.")


class ErrorBody(_Out):
    """Every error response: ``{"error": {"code", "message", "field"?}}``."""

    error: ErrorDetail


# --- tenants (admin) -----------------------------------------------------------------------------------------
class TenantCreate(_In):
    name: Name = Field(min_length=1, max_length=128)


class TenantOut(_Out):
    id: int
    name: str
    created_at: datetime


class TenantCreated(TenantOut):
    api_key: str = Field(description="The tenant's first API key; shown only in this response.")


class ApiKeyCreated(_Out):
    tenant: str
    api_key: str = Field(description="Shown only in this response; the service keeps its sha256.")


class ApiKeyOut(_Out):
    """One of a tenant's API keys as an admin sees it: never the key, only its first characters."""

    id: int
    prefix: str
    created_at: datetime
    last_used_at: datetime | None = Field(description="When it last authenticated a request (to the minute).")
    revoked_at: datetime | None = None


# --- users and the audit log ----------------------------------------------------------------------------------
class UserOut(_Out):
    """One of the tenant's users as ``GET /v1/users`` lists them."""

    external_id: str = Field(description="The user's id in the tenant's system.")
    created_at: datetime
    live_versions: dict[str, int] = Field(
        description="Adapter name -> live version number, for each of the user's adapters with one live."
    )
    last_feedback_at: datetime | None = Field(description="When their newest feedback record was stored.")
    version_count: int = Field(description="Versions of all their adapters.")
    feedback_count: int = Field(description="Their stored feedback records.")


class AuditEventOut(_Out):
    """One event of the append-only audit log: ids and hashes only, never personal content."""

    id: int
    tenant_id: int | None = Field(description="The tenant's id; null for an admin-wide event.")
    tenant: str | None = Field(description="The tenant's name; null for an admin-wide event.")
    at: datetime
    actor: str = Field(description="Who: 'api:<tenant>', 'api:admin', 'cli', 'qa', ...")
    action: AuditAction
    target: str = Field(
        description="What, e.g. 'user:ada/personal@3', 'task:faq@none', 'key:7', 'tenant:acme'."
    )
    details: dict[str, Any]


# --- data deletion ---------------------------------------------------------------------------------------------
class RevokedVersionOut(_Out):
    """A version a deletion revoked: its adapter's name, number, id and blob digest."""

    adapter: str | None = Field(description="The adapter's name; null if it no longer exists.")
    number: int
    version_id: int
    sha256: str


class RebuiltVersionOut(_Out):
    """The first clean version of a revoked adapter registered after the deletion (the rebuild's result)."""

    adapter: str | None
    number: int
    version_id: int
    status: VersionStatus


class RebuildOut(_Out):
    """The unlearning job a deletion queued, and where it stands."""

    job_id: int | None = Field(description="The train job queued to rebuild; null when none was needed.")
    job_state: JobState | None = None
    versions: list[RebuiltVersionOut] = Field(
        default_factory=list, description="Clean versions registered since the deletion, per revoked adapter."
    )


class DeletionReceiptOut(_Out):
    """What one deletion did, retrievable by id (``GET /v1/deletions/{id}``): ids and hashes only."""

    id: str
    kind: Literal["records", "user"]
    subject: str = Field(description="'user:<id>' or 'task:<name>'.")
    actor: str
    created_at: datetime
    request: dict[str, Any] = Field(description="What was asked: record ids, or the filter (values hashed).")
    record_hashes: list[str] = Field(description="Content hashes (sha256) of the records removed.")
    revoked_versions: list[RevokedVersionOut]
    erased: dict[str, int] = Field(description="What else was erased, counted by kind of row.")
    blobs: list[str] = Field(description="Digests of the blobs to delete (revoked or erased versions).")
    purge_after: datetime = Field(description="When the blobs may be deleted (the gc grace period, or now).")
    blobs_deleted_at: datetime | None = None
    rebuild: RebuildOut | None = None


class RecordFilterIn(_In):
    """Which records a deletion selects by filter: stored in ``[since, until)`` (timezone-aware times), and whose
    ``metadata`` holds every given key with an equal value (top-level keys only). At least one is needed."""

    since: datetime | None = None
    until: datetime | None = None
    metadata: dict[Annotated[str, AfterValidator(printable_name)], JsonValue] | None = Field(
        default=None, description="Top-level key/value pairs the record's metadata must all hold."
    )


#: a feedback record's id in a deletion request
RecordId = Annotated[StrictInt, Field(ge=1, le=MAX_INT64)]


class ForgetRecordsRequest(_In):
    """``DELETE /v1/users/{user_id}/feedback`` (or a task's): exactly one of ``ids`` and ``filter``. The records,
    every version whose training data held one (and their descendants) are taken back; see ``docs/data-rights.md``."""

    ids: list[RecordId] | None = Field(default=None, description="The record ids to forget (1-10000).")
    filter: RecordFilterIn | None = Field(default=None, description="Or: the records this filter selects.")
    purge: StrictBool = Field(
        default=False,
        description="Delete the revoked versions' blobs now instead of after the gc grace period.",
    )


# --- blob verification (admin) ---------------------------------------------------------------------------------
class VerifyRequest(_In):
    """``POST /v1/admin/verify``: re-hash the blob of every version (one tenant's, or every tenant's). The flags
    are JSON booleans only (``"yes"`` or ``1`` is refused, never read as a repair)."""

    repair: StrictBool = Field(
        default=False,
        description="Quarantine each version whose blob is corrupt or missing: its status becomes 'corrupt' "
        "(never served, never a promote or rollback target) and a live one is first rolled back to the newest "
        "healthy earlier version, or none (recorded in the history with reason 'blob-corrupt').",
    )
    tenant: Name | None = Field(
        default=None, min_length=1, max_length=128, description="Only this tenant's versions (by name)."
    )
    only_bad: StrictBool = Field(
        default=False, description="List only the versions that are not ok (the counts still cover all)."
    )


class VerifyCountsOut(_Out):
    checked: int
    ok: int
    corrupt: int
    missing: int
    unreadable: int = Field(
        description="The object store failed for another reason: unknown, never repaired."
    )
    quarantined: int = Field(description="Already 'corrupt' before this run: not read again.")
    repaired: int = Field(description="Quarantined by this run.")


#: what re-hashing a version's blob found
BlobResult = Literal["ok", "corrupt", "missing", "unreadable", "quarantined"]


class VersionCheckOut(_Out):
    """One version's blob check."""

    tenant: str
    tenant_id: int
    owner: str | None = Field(description="The owning user's id; null for a shared task adapter.")
    adapter: str
    adapter_id: int
    version_id: int
    number: int
    sha256: str
    size_bytes: int
    status: VersionStatus = Field(
        description="The version's status after this run ('corrupt' once repaired)."
    )
    result: BlobResult
    detail: str = ""
    repaired: bool = False
    was_live: bool = Field(default=False, description="It was live when this run quarantined it.")
    live_after: int | None = Field(
        default=None, description="Where live was rolled back to (a version number; null: no adapter)."
    )


class VerifyReportOut(_Out):
    counts: VerifyCountsOut
    bytes_read: int
    versions: list[VersionCheckOut]


# --- feedback -------------------------------------------------------------------------------------------------
class FeedbackBatch(_In):
    """A batch of records for one user (stored all or nothing; repeats are deduplicated by content)."""

    records: list[FeedbackIn] = Field(min_length=1)


class FeedbackSubmitted(_Out):
    """Record ids in input order (a duplicate gets the id of the record it repeats) and the counts."""

    ids: list[int]
    created: int
    duplicates: int


class FeedbackRecordOut(_Out):
    id: int
    kind: FeedbackKind
    payload: dict[str, Any]
    content_hash: str
    created_at: datetime


# --- adapters, versions, lineage -----------------------------------------------------------------------------
class AdapterOut(_Out):
    id: int
    name: str
    target_config: dict[str, Any]
    live_version: int | None = Field(description="The number of the live version; None: no adapter live.")
    created_at: datetime


#: a version's QA state in listings (``VersionOut.qa_state``)
QAState = Literal["passed", "failed", "undecided"]


class VersionOut(_Out):
    id: int
    adapter_id: int
    adapter: str | None = Field(default=None, description="The adapter's name.")
    number: int
    status: VersionStatus
    sha256: str
    size_bytes: int
    base_fingerprint: str
    rank: int
    target_modules: list[str]
    training_config: dict[str, Any]
    metrics: dict[str, Any]
    job_id: int | None = None
    dataset_snapshot_id: int | None = None
    created_at: datetime
    qa_decision: str | None = Field(
        default=None,
        description="The latest QA report's decision (promote, reject, keep, rollback, hold), or null.",
    )
    qa_state: QAState = Field(
        default="undecided",
        description="passed (latest decision promote or keep), failed (reject or rollback), or undecided "
        "(no QA decision yet: a queued candidate, or a version a person forced live).",
    )
    forced_live: bool = Field(
        default=False,
        description="It went live by a forced promote (the latest move of live onto it was forced), so a live "
        "version with qa_state 'undecided' and forced_live true is being served without a QA decision.",
    )


class QAReportOut(_Out):
    id: int
    kind: str
    decision: QADecision
    reasons: list[str]
    summary: dict[str, Any]
    policy_version: str
    blob_sha256: str
    job_id: int | None = None
    created_at: datetime


class VersionDetail(VersionOut):
    """A version with its QA: the latest decision and report, every report, and (when asked) the document."""

    qa_report: QAReportOut | None = None
    qa_reports: list[QAReportOut] = Field(default_factory=list)
    qa_document: dict[str, Any] | None = None


class DatasetSnapshotOut(_Out):
    id: int
    record_count: int
    content_hash: str
    min_record_id: int | None = None
    max_record_id: int | None = None
    created_at: datetime | None = None


class JobSummaryOut(_Out):
    id: int
    kind: str
    state: JobState
    created_at: datetime
    finished_at: datetime | None = None


class LineageNodeOut(_Out):
    version: VersionOut
    distance: int
    dataset_snapshot: DatasetSnapshotOut | None = None
    job: JobSummaryOut | None = None
    qa_decisions: list[str] = Field(default_factory=list)


class LineageEdgeOut(_Out):
    child_version_id: int
    parent_version_id: int
    relation: str


class LineageOut(_Out):
    root: LineageNodeOut
    ancestors: list[LineageNodeOut]
    descendants: list[LineageNodeOut]
    edges: list[LineageEdgeOut]


class PromoteRequest(_In):
    version: VersionNumber = Field(description="The version number to make live.")
    reason: FreeText = Field(default="", max_length=2000)
    force: bool = Field(
        default=False,
        description="Under the promote rule 'qa', make live a version QA has not passed (recorded as forced "
        "in the history; QA still evaluates it and rolls it back if it fails). Without it such a promote is "
        "refused with 409 qa_undecided.",
    )


class RollbackRequest(_In):
    to_version: VersionNumber | None = Field(
        default=None, description="An earlier version number, or null for no adapter at all."
    )
    reason: FreeText = Field(default="", max_length=2000)


class AliasEventOut(_Out):
    """One move of the ``live`` alias: who, when, from, to (version numbers and ids), why."""

    id: int
    adapter: str
    from_version: int | None
    to_version: int | None
    from_version_id: int | None
    to_version_id: int | None
    actor: str
    reason: str
    created_at: datetime
    forced: bool = Field(
        default=False, description="A person made live a version QA had not passed (promote with force)."
    )


# --- jobs -----------------------------------------------------------------------------------------------------
class JobProgressOut(_Out):
    """A job's latest progress report, written by its worker at most every ~2 s (and at the last step)."""

    phase: str | None = Field(default=None, description="planning, training, evaluating or registering.")
    step: int = Field(default=0, description="Training steps done (0 before the first).")
    total_steps: int | None = None
    fraction: float = Field(default=0.0, description="step / total_steps, 0..1.")
    loss: float | None = Field(default=None, description="Mean loss of the subjects at the last step.")
    losses: dict[str, float | None] = Field(
        default_factory=dict, description="Each subject's loss at the last step, labelled as ``users``."
    )
    eta_seconds: float | None = Field(default=None, description="Training time left at the pace so far.")
    curves: dict[str, list[list[float]]] = Field(
        default_factory=dict,
        description="Each subject's loss by step (``[[step, loss], ...]``, finite losses only), at most 128 points "
        "per subject, thinned evenly as training goes on; labelled as ``losses``.",
    )
    updated_at: datetime | None = None


class JobOut(_Out):
    id: int
    kind: str
    state: JobState
    users: list[str] = Field(
        description="External ids of the users the job trains; a shared task's dataset is ``task:<name>``."
    )
    attempts: int
    max_attempts: int
    error: str | None = None
    result: dict[str, Any] | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: JobProgressOut | None = Field(default=None, description="None until the worker reports.")
    cancel_requested_at: datetime | None = None
    cancelled_by: str | None = None
    training: TrainingValues | None = Field(
        default=None, description="A train job's config, resolved when it was queued (None: older jobs)."
    )

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_JOB_STATES


class TrainSubmitted(_Out):
    """The user's job, and whether this call queued it (False: the user was in an active job already)."""

    job: JobOut
    created: bool


# --- enrolments -----------------------------------------------------------------------------------------------
class EnrolRequest(_In):
    task: Name = Field(min_length=1, max_length=128, description="The name of a tenant task adapter.")


class EnrolmentOut(_Out):
    task: str
    adapter_id: int
    actor: str
    enrolled_at: datetime


# --- shared task adapters -------------------------------------------------------------------------------------
class TaskOut(_Out):
    """A shared task adapter: its live version, versions, users enrolled and feedback records."""

    name: str
    adapter_id: int
    live_version: int | None = Field(description="The number of the live version; None: nothing live yet.")
    versions: int
    enrolled_users: int
    feedback_records: int


class ImportExample(_In):
    """One example of what an imported adapter should answer: QA decodes its answer and scores it."""

    prompt: FreeText = Field(min_length=1, max_length=16_384)
    expected: FreeText = Field(min_length=1, max_length=4_096)


class TaskImportRequest(_In):
    """An existing PEFT adapter (folder packed as .tar, .tar.gz or .zip), base64-encoded, and example prompts of
    the task: its routing key (the centroid gate's) is computed from them on import. ``examples`` (optional):
    prompts with expected outputs, QA's evidence for the version (its holdout); without them QA uses the task's
    feedback holdout, and with neither the version stays a candidate (QA decision ``hold``, "no evidence")
    until a person promotes it with ``force``."""

    archive_base64: str = Field(min_length=4, description="The archive's bytes, base64 (standard alphabet).")
    example_prompts: list[FreeText] = Field(min_length=1, max_length=256)
    reason: FreeText = Field(default="", max_length=2000)
    examples: list[ImportExample] = Field(default_factory=list, max_length=256)


class TaskImportSubmitted(_Out):
    """The ``import`` job that checks and registers the adapter (then QA decides), and the archive's sha256."""

    job: JobOut
    created: bool
    archive_sha256: str


class DownloadedFile(_Out):
    """A file the client wrote (a version's PEFT archive, a feedback export): where, how large, its sha256 (as
    written, checked against the service's ``X-Lorafleet-Archive-Sha256`` when it sent one) and, for a version,
    the sha256 of the version's stored blob (``X-Lorafleet-Version-Sha256``, as in its metadata)."""

    path: str
    size_bytes: int
    sha256: str
    version_sha256: str | None = None


class TaskEnrolledOut(_Out):
    task: str
    users: list[str]


# --- generation -----------------------------------------------------------------------------------------------
class _Sampling(BaseModel):
    """Decoding parameters shared by every generation body: temperature 0 is greedy, else at least
    ``MIN_TEMPERATURE`` (smaller ones overflow the sampling distribution)."""

    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    adapter_scale: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="lorafleet extension, the personalization dial: every adapter weight is multiplied by it "
        "(1: full personalization, 0: the base model).",
    )

    @field_validator("temperature", check_fields=False)
    @classmethod
    def _temperature_zero_or_usable(cls, value: float) -> float:
        if value != 0 and value < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or >= {MIN_TEMPERATURE:g}")
        return value


class GenerateRequest(_Sampling, _In):
    prompt: str = Field(min_length=1)
    max_tokens: StrictInt = Field(default=32, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    raw: bool = Field(
        default=False,
        description="Feed the prompt as is; by default it is one user turn of the backbone's chat template.",
    )


class ServedByOut(_Out):
    adapter: str
    adapter_id: int
    version: int
    version_id: int
    sha256: str
    weight: float


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ServingInfo(_Out):
    """Which adapter versions served a request: the exact list, and by adapter name."""

    served_by: list[ServedByOut]
    versions: dict[str, int] = Field(description="Adapter name -> version number.")
    gate_weights: dict[str, float] = Field(description="Adapter name -> the gate's weight.")
    bank_revision: str | None = None


class GenerateResponse(ServingInfo):
    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage


# --- OpenAI-compatible ------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``: ``include_usage`` adds a last chunk with the usage and no choices."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _OpenAIRequest(_Sampling):
    """Fields of OpenAI's bodies that lorafleet serves. A field it does not honour is refused (422 naming it),
    never silently ignored: an unknown field, and a known one set to anything but its no-op value (``tools``,
    ``response_format`` other than text, penalties other than 0, ``logit_bias``...).

    ``model`` says what serves the request (``lorafleet.serving.requests.ModelRef``): ``lorafleet`` (the
    default) the user's experts, ``base`` the base model, ``task:<name>[@<n>]`` or
    ``<user>/<adapter>[@<n>]`` one adapter, live or pinned; ``GET /v1/models`` lists them. ``user`` is optional
    as in OpenAI: without it ``lorafleet`` is the base model. ``n`` choices are sampled independently (with a
    ``seed``, choice ``i`` uses ``seed + i``, so they differ and are reproducible). ``stream`` sends the answer
    as server-sent events in OpenAI's chunk format."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default=BANK_MODEL, min_length=1, max_length=600)
    user: Name | None = Field(
        default=None, min_length=1, max_length=256, description="The user whose adapter bank serves this."
    )
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    stop: str | list[str] | None = None
    n: StrictInt = Field(
        default=1, ge=1, le=MAX_CHOICES, description=f"Choices per prompt (at most {MAX_CHOICES})."
    )
    stream: bool | None = Field(default=None, description="Stream the answer as server-sent events.")
    stream_options: StreamOptions | None = None
    # accepted at their no-op values only (refused otherwise, with the field named)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    service_tier: Literal["auto", "default"] | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only with stream true")
        return value

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return value

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported (0 or absent only)")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] = Field(description="One prompt, or several (``n`` choices each).")
    max_tokens: StrictInt = Field(default=16, ge=1, le=MAX_NEW_TOKENS)
    echo: bool | None = Field(default=None, description="Return the prompt before the completion.")
    logprobs: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Log probabilities of each generated token and of this many likely alternatives.",
    )
    best_of: StrictInt | None = Field(default=None, ge=1, le=1)
    suffix: None = None

    @field_validator("logprobs")
    @classmethod
    def _not_with_echo(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("echo"):
            raise ValueError(
                "not with echo: log probabilities of the prompt's tokens are not computed; ask for one or the other"
            )
        return value

    @field_validator("prompt")
    @classmethod
    def _prompts_not_empty(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError("must be a non-empty string or a non-empty list of non-empty strings")
        if len(prompts) > 64:
            raise ValueError("at most 64 prompts per request")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    """A text part of a message's content (OpenAI's ``{"type": "text", "text": ...}``); other parts (images,
    audio, files) are refused."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a chat request: OpenAI's ``developer`` role is taken as ``system``; content is a string or
    a list of text parts (joined); ``name`` is accepted (it does not change rendering). Tool and function
    messages, and tool calls, are refused."""

    model_config = ConfigDict(extra="forbid")

    role: FeedbackRole
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    """Only plain text: the JSON modes need constrained decoding, which lorafleet does not do; they are refused
    with that reason rather than answered with text that may not parse."""

    model_config = ConfigDict(extra="forbid")

    type: str

    @field_validator("type")
    @classmethod
    def _text_only(cls, value: str) -> str:
        if value != "text":
            raise ValueError(
                f"{value!r} is not supported: lorafleet does not constrain decoding to JSON, so it could not "
                "promise a parseable answer; use 'text'"
            )
        return value


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool | None = Field(default=None, description="Log probabilities of each generated token.")
    top_logprobs: StrictInt | None = Field(
        default=None, ge=0, le=MAX_LOGPROBS, description="Likely alternatives per token (needs logprobs)."
    )
    response_format: ResponseFormat | None = None
    # tools are not supported: absent, null, an empty list or tool_choice "none" only
    tools: list[Any] | None = Field(default=None, max_length=0)
    tool_choice: Literal["none"] | None = None
    parallel_tool_calls: Literal[False] | None = None
    functions: list[Any] | None = Field(default=None, max_length=0)
    function_call: Literal["none"] | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("only with logprobs true")
        return value

    def logprobs_wanted(self) -> int | None:
        """The engine's ``logprobs``: None, or how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class ModelOut(_Out):
    """One entry of ``GET /v1/models`` (OpenAI's model object)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    description: str | None = None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelOut]


class CompletionChoice(_Out):
    index: int
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: JsonValue = None


class _OpenAIAnswer(_Out):
    """What every OpenAI-style answer and streamed chunk starts with, in OpenAI's order; each subclass narrows
    ``object`` and ``choices``."""

    id: str
    object: str
    created: int
    model: str
    choices: list[Any]


class CompletionResponse(_OpenAIAnswer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage
    lorafleet: list[ServingInfo] = Field(description="Per choice: the versions that served it.")


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: JsonValue = None


class ChatCompletionResponse(_OpenAIAnswer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage
    lorafleet: ServingInfo


# --- health ---------------------------------------------------------------------------------------------------
class HealthOut(_Out):
    status: Literal["ok"] = "ok"


class ReadyOut(_Out):
    """``ready``: the database answers (and the engine is loaded when the service preloads it)."""

    ready: bool
    database: Literal["ok", "unavailable"]
    engine: Literal["not_loaded", "loading", "ready", "failed"]
    workers: Literal["off", "starting", "running", "failed", "stopped"] = "off"
    scheduler: Literal["off", "running", "stopped"] = "off"
    detail: str | None = None


# --- streaming (server-sent events, OpenAI's chunk format) -------------------------------------------------------
class _OpenAIChunk(_OpenAIAnswer):
    """One event of a stream: ``usage`` only on the final chunk (with ``include_usage``), ``lorafleet`` on a
    choice's last chunk."""

    usage: Usage | None = None
    lorafleet: ServingInfo | None = None


class CompletionChunkChoice(_Out):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: JsonValue = None


class CompletionChunk(_OpenAIChunk):
    """One event of a streamed ``/v1/completions``; the last chunk of a choice has its ``finish_reason`` and
    ``lorafleet`` (the versions that served it); with ``include_usage`` a final chunk has ``usage`` only."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]


class ChatDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: JsonValue = None


class ChatCompletionChunk(_OpenAIChunk):
    """One event of a streamed ``/v1/chat/completions`` (``object`` ``chat.completion.chunk``): the first chunk
    of a choice has the role, then content pieces, then the ``finish_reason`` with ``lorafleet``."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
