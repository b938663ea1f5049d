"""Feedback records: the record schemas and batch validation (storing them: ``lorafleet.workflows.feedback``).

Three kinds of record, told apart by ``kind``:

- ``sft``: ``prompt`` + ``completion`` (a demonstration to imitate), or instead ``messages``: an OpenAI-style
  conversation, a list of ``{"role", "content"}`` with roles ``system``, ``user``, ``assistant`` (``developer`` is
  stored as ``system``), at least one user turn, ending with the assistant turn that is the target;
- ``preference``: ``prompt`` + ``chosen`` + ``rejected`` (a pairwise preference; the two must differ);
- ``rating``: ``prompt`` + ``response`` + ``score``, a float in [0, 1] (1 is best). One scale only, because
  an integer 1 would mean "best" on [0, 1] and "worst" on 1..5; clients map stars with ``(stars - 1) / 4``.

Every record may carry a ``metadata`` object (any JSON). Text fields (and message contents) must be non-blank
strings; no string of a record (metadata's keys and values included) may hold NUL, which PostgreSQL's JSON
operators cannot read back (``payload->>'prompt'``); unknown fields are refused, so a typo cannot silently drop data. Errors name the field inside the
record, e.g. ``records[3].messages[2].role``. Preference and rating records stay prompt-based (a prompt is one
user turn).

The content hash is sha256 of the canonical JSON (sorted keys, no whitespace, UTF-8) of ``kind`` and the
training fields that are present (an absent optional field is not hashed as null, so the prompt form hashes
as it always did), *without* ``metadata``: metadata (timestamps, session ids, client versions) does not change
what a model learns, so the same example sent twice is one record; the first one's metadata is kept.

This module imports no SQL, so the API and SDK can use the schemas alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    StringConstraints,
    TypeAdapter,
    ValidationInfo,
    field_validator,
)
from pydantic import ValidationError as PydanticValidationError

from lorafleet.config import Settings
from lorafleet.domain import FeedbackKind
from lorafleet.domain.text import free_text
from lorafleet.errors import PayloadTooLargeError, ValidationError


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _no_nul_inside(value: JsonValue) -> JsonValue:
    """``value`` if no string in it (object keys included) holds NUL."""
    if isinstance(value, str):
        free_text(value)
    elif isinstance(value, list):
        for item in value:
            _no_nul_inside(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            free_text(key)
            _no_nul_inside(item)
    return value


#: A text field: a real string (numbers are not coerced), not empty, not only whitespace, no NUL; kept verbatim.
FeedbackText = Annotated[
    str, StringConstraints(min_length=1, strict=True), AfterValidator(_not_blank), AfterValidator(free_text)
]
#: A rating: a finite number in [0, 1]; ints 0 and 1 are accepted, booleans and numeric strings are not.
Score = Annotated[float, Field(ge=0.0, le=1.0, strict=True, allow_inf_nan=False)]


def _developer_is_system(value: object) -> object:
    return "system" if value == "developer" else value


#: A message's role; OpenAI's ``developer`` is the ``system`` role of the models lorafleet serves.
FeedbackRole = Annotated[Literal["system", "user", "assistant"], BeforeValidator(_developer_is_system)]


class FeedbackMessage(BaseModel):
    """One turn of an ``sft`` conversation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: FeedbackRole
    content: FeedbackText


def _a_training_conversation(messages: list[FeedbackMessage]) -> list[FeedbackMessage]:
    """At least one user turn, and the last turn is the assistant's: the target the adapter learns."""
    if not any(m.role == "user" for m in messages):
        raise ValueError("needs at least one user turn")
    if messages[-1].role != "assistant":
        raise ValueError("must end with an assistant turn (the target)")
    return messages


Conversation = Annotated[list[FeedbackMessage], AfterValidator(_a_training_conversation)]


class _FeedbackBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    metadata: Annotated[dict[str, JsonValue], AfterValidator(_no_nul_inside)] = Field(default_factory=dict)

    def absent_fields(self) -> set[str]:
        """Optional fields left out (None): not stored and not hashed, so each form keeps its own shape."""
        return {name for name, value in self if value is None}

    def dump(self, *, mode: Literal["python", "json"] = "python") -> dict[str, Any]:
        """The record as stored and sent: every field but the absent ones."""
        return self.model_dump(mode=mode, exclude=self.absent_fields())

    def training_fields(self) -> dict[str, Any]:
        """``kind`` and the fields a model learns from: what the content hash covers."""
        return self.model_dump(exclude={"metadata", *self.absent_fields()})


class SftFeedback(_FeedbackBase):
    """A demonstration: ``prompt`` + ``completion``, or ``messages`` whose last (assistant) turn is the target."""

    kind: Literal["sft"]
    messages: Conversation | None = None
    prompt: FeedbackText | None = Field(default=None, validate_default=True)
    completion: FeedbackText | None = Field(default=None, validate_default=True)

    @field_validator("prompt", "completion")
    @classmethod
    def _one_form(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Either ``messages`` or both ``prompt`` and ``completion``; errors name the field at fault."""
        with_messages = info.data.get("messages") is not None
        if with_messages and value is not None:
            raise ValueError("not allowed together with messages")
        if not with_messages and value is None and "messages" in info.data:
            raise ValueError("Field required")
        return value


class PreferenceFeedback(_FeedbackBase):
    kind: Literal["preference"]
    prompt: FeedbackText
    chosen: FeedbackText
    rejected: FeedbackText

    @field_validator("rejected")
    @classmethod
    def _differs_from_chosen(cls, rejected: str, info: ValidationInfo) -> str:
        if rejected == info.data.get("chosen"):
            raise ValueError("must differ from chosen")
        return rejected


class RatingFeedback(_FeedbackBase):
    kind: Literal["rating"]
    prompt: FeedbackText
    response: FeedbackText
    score: Score


FeedbackIn = Annotated[SftFeedback | PreferenceFeedback | RatingFeedback, Field(discriminator="kind")]
_FEEDBACK_IN: TypeAdapter[SftFeedback | PreferenceFeedback | RatingFeedback] = TypeAdapter(FeedbackIn)


@dataclass(frozen=True)
class FeedbackLimits:
    """Size limits of one ingest call (defaults as in ``Settings``)."""

    max_records: int = Settings.model_fields["max_feedback_batch"].default
    max_record_bytes: int = Settings.model_fields["max_feedback_record_bytes"].default

    @classmethod
    def from_settings(cls, settings: Settings) -> FeedbackLimits:
        return cls(
            max_records=settings.max_feedback_batch, max_record_bytes=settings.max_feedback_record_bytes
        )


DEFAULT_LIMITS = FeedbackLimits()


class FeedbackRecordError(ValidationError):
    """One record of a batch was refused; ``index`` and ``field`` (dotted, "" for the whole record) say where."""

    def __init__(self, message: str, *, index: int, field: str) -> None:
        where = f"records[{index}]" + (f".{field}" if field else "")
        super().__init__(f"{where}: {message}")
        self.index = index
        self.field = field


class FeedbackRecordTooLargeError(PayloadTooLargeError, FeedbackRecordError):
    """One record is larger than ``max_record_bytes``; ``field`` names its largest field."""


@dataclass(frozen=True)
class PreparedFeedback:
    """A validated record, ready to store: ``payload`` is the fields and metadata, without ``kind``."""

    kind: FeedbackKind
    payload: dict[str, Any]
    content_hash: str


@dataclass(frozen=True)
class IngestResult:
    """Ids in input order (a duplicate gets the id of the record it repeats), and the counts."""

    ids: list[int]
    created: int
    duplicates: int


def canonical_json(value: Any) -> bytes:
    """The one encoding that hashes and sizes use: sorted keys, no whitespace, UTF-8, no NaN."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


def content_hash(record: SftFeedback | PreferenceFeedback | RatingFeedback) -> str:
    return hashlib.sha256(canonical_json(record.training_fields())).hexdigest()


def _field_of(error: Mapping[str, Any], *, kind: object) -> str:
    """The path of a pydantic error inside the record (without the union's tag): ``messages[2].role``."""
    if error["type"].startswith("union_tag"):
        return "kind"
    loc = list(error["loc"])
    if loc and loc[0] == kind:  # a discriminated union puts the tag first
        loc = loc[1:]
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _parse(raw: object, *, index: int) -> SftFeedback | PreferenceFeedback | RatingFeedback:
    if not isinstance(raw, Mapping):
        raise FeedbackRecordError("must be an object", index=index, field="")
    try:
        return _FEEDBACK_IN.validate_python(dict(raw))
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        field = _field_of(first, kind=raw.get("kind"))
        message = str(first["msg"]).removeprefix("Value error, ")
        raise FeedbackRecordError(message, index=index, field=field) from None


def _encode_fields(dumped: Mapping[str, Any], *, index: int) -> dict[str, int]:
    """Each top-level field's canonical size in bytes; a field JSON cannot carry is refused by name."""
    sizes: dict[str, int] = {}
    for name, value in dumped.items():
        try:
            sizes[name] = len(canonical_json(value))
        except (ValueError, UnicodeEncodeError) as exc:
            raise FeedbackRecordError(f"not encodable as JSON: {exc}", index=index, field=name) from None
    return sizes


def prepare_record(raw: object, *, index: int, limits: FeedbackLimits = DEFAULT_LIMITS) -> PreparedFeedback:
    """Validate one record (``index`` is its place in the batch, for the error) and hash it."""
    record = _parse(raw, index=index)
    dumped = record.dump()
    sizes = _encode_fields(dumped, index=index)
    size = len(canonical_json(dumped))
    if size > limits.max_record_bytes:
        largest = max(sizes, key=lambda name: sizes[name])
        message = f"record is {size} bytes, more than max_feedback_record_bytes={limits.max_record_bytes}"
        raise FeedbackRecordTooLargeError(message, index=index, field=largest)
    payload = {name: value for name, value in dumped.items() if name != "kind"}
    return PreparedFeedback(
        kind=FeedbackKind(record.kind), payload=payload, content_hash=content_hash(record)
    )


def validate_feedback_batch(
    records: Sequence[Mapping[str, Any]], *, limits: FeedbackLimits = DEFAULT_LIMITS
) -> list[PreparedFeedback]:
    """Validate a whole batch before anything is written; the first bad record raises, naming index and field."""
    if isinstance(records, str | bytes) or not isinstance(records, Sequence):
        raise ValidationError("records: must be a list of records")
    if not records:
        raise ValidationError("records: the batch is empty")
    if len(records) > limits.max_records:
        raise PayloadTooLargeError(
            f"records: {len(records)} records, more than max_feedback_batch={limits.max_records}"
        )
    return [prepare_record(raw, index=index, limits=limits) for index, raw in enumerate(records)]
