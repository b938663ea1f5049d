"""The console's forms: URL-encoded bodies read without a multipart parser, and checked by pydantic models so a
bad field is a ``ValidationError`` naming it (a 422 page) and changes nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qsl

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from lorafleet.domain.text import MAX_INT32, MAX_INT64, free_text, printable_name
from lorafleet.errors import ValidationError
from lorafleet.workflows.deletion import RecordSelection

#: a form body larger than this is refused (the console's forms hold a prompt at most)
MAX_FORM_BYTES = 64 * 1024
#: the most tokens the playground generates per answer
PLAYGROUND_MAX_TOKENS = 128

Reason = Annotated[str, Field(min_length=1, max_length=2000), AfterValidator(free_text)]
Number = Annotated[int, Field(ge=1, le=MAX_INT32)]
Name = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(printable_name)]


class _Form(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)


class SignInForm(_Form):
    api_key: Annotated[str, Field(min_length=1, max_length=512), AfterValidator(printable_name)]


class PromoteForm(_Form):
    version: Number
    reason: Reason
    force: bool = False


class RollbackForm(_Form):
    #: absent or empty: no adapter at all (the base model answers)
    to_version: Number | None = None
    reason: Reason


class PlaygroundForm(_Form):
    user: Name
    prompt: Annotated[str, Field(min_length=1, max_length=4000), AfterValidator(free_text)]
    max_tokens: int = Field(default=32, ge=1, le=PLAYGROUND_MAX_TOKENS)
    adapter_scale: float = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False)


class ForgetRecordsForm(_Form):
    """Which of a subject's records to forget: ``ids``, or a filter of ``since``/``until`` (times in UTC; a
    browser's ``datetime-local`` field sends them without a timezone) and ``metadata`` (a JSON object whose
    every key a record's metadata must hold with an equal value), as ``DELETE /v1/users/{id}/feedback`` takes."""

    #: the records' ids, comma-separated (``record_ids`` makes them numbers)
    ids: Annotated[str | None, Field(min_length=1, max_length=MAX_FORM_BYTES)] = None
    since: datetime | None = None
    until: datetime | None = None
    metadata: Annotated[str | None, Field(min_length=1, max_length=MAX_FORM_BYTES)] = None
    purge: bool = False

    def record_ids(self) -> list[int]:
        """The ids as numbers; a ``ValidationError`` naming ``ids`` for anything but comma-separated integers."""
        found = []
        for part in (self.ids or "").split(","):
            text = part.strip()
            if not text.isascii() or not text.isdigit() or len(text) > len(str(MAX_INT64)):
                raise ValidationError(f"ids: {text[:40]!r} is not a record id (give ids like 12, 15)")
            found.append(int(text))
        return found

    def selection(self) -> RecordSelection:
        """The checked selection (``RecordSelection.parse``): ids, or the filter; neither, or both, is a
        ``ValidationError`` naming the field."""
        if self.ids is None and self.since is None and self.until is None and self.metadata is None:
            raise ValidationError("ids: give record ids, or a filter (since, until or metadata)")
        metadata = None
        if self.metadata is not None:
            try:
                metadata = json.loads(self.metadata)
            except ValueError:
                raise ValidationError(
                    'metadata: not JSON (give an object, e.g. {"session": "s-12"})'
                ) from None
            if not isinstance(metadata, dict):
                raise ValidationError('metadata: must be a JSON object, e.g. {"session": "s-12"}')
        return RecordSelection.parse(
            ids=None if self.ids is None else self.record_ids(),
            since=_utc(self.since),
            until=_utc(self.until),
            metadata=metadata,
        )


def _utc(moment: datetime | None) -> datetime | None:
    """A form's time: one without a timezone is UTC (what the console's pages show)."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


class ForgetUserForm(_Form):
    #: the user's id typed again
    confirm: Annotated[str, Field(min_length=1, max_length=256)]
    purge: bool = False


F = TypeVar("F", bound=_Form)


def parse_form(body: bytes) -> dict[str, str]:
    """A URL-encoded body as field -> value (the last value of a repeated field); empty values are left out so
    optional fields fall back to their defaults."""
    if len(body) > MAX_FORM_BYTES:
        raise ValidationError(f"form: larger than {MAX_FORM_BYTES} bytes")
    try:
        text = body.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise ValidationError("form: not a URL-encoded UTF-8 form") from None
    return {key: value for key, value in pairs if value != ""}


def checked(model: type[F], fields: dict[str, Any]) -> F:
    """``model`` over the form's fields; the first bad field is a ``ValidationError`` naming it."""
    try:
        return model.model_validate(fields)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(part) for part in first["loc"]) or "form"
        raise ValidationError(f"{name}: {first['msg']}") from None


__all__ = [
    "MAX_FORM_BYTES",
    "ForgetRecordsForm",
    "ForgetUserForm",
    "PLAYGROUND_MAX_TOKENS",
    "PlaygroundForm",
    "PromoteForm",
    "RollbackForm",
    "SignInForm",
    "checked",
    "parse_form",
]
