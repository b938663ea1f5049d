"""Every endpoint of the API as a ``Call``: method, path, query, body and how to parse the answer.

``Client`` and ``AsyncClient`` run the same calls, so the two stay in step. Mutating calls carry an
idempotency key (a fresh UUID per call unless the caller passes one), sent as ``Idempotency-Key`` on every
retry of that call, so a retried request never creates anything twice.
"""

from __future__ import annotations

import base64
import io
import tarfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, TypeAdapter

from lorafleet.sdk import schemas as s

T = TypeVar("T")
Record = BaseModel | Mapping[str, Any]
Message = s.ChatMessage | Mapping[str, str]
#: ``TrainingConfig`` overrides: the typed model, or a plain mapping (the service validates either)
Overrides = s.TrainingOverrides | Mapping[str, Any]


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request of the API and the parser of its successful answer."""

    method: str
    path: str
    parse: Callable[[Any], T]
    params: Mapping[str, Any] | None = None
    body: Any = None
    idempotency_key: str | None = None
    #: False for a request that must not be re-sent once it may have reached the service
    retry_after_send: bool = True
    #: error statuses whose body is still the answer (``/readyz`` answers 503 with its report)
    ok_statuses: frozenset[int] = frozenset()

    @property
    def headers(self) -> dict[str, str]:
        return {"Idempotency-Key": self.idempotency_key} if self.idempotency_key else {}


def _parser(kind: Any) -> Callable[[Any], Any]:
    adapter: TypeAdapter[Any] = TypeAdapter(kind)
    return adapter.validate_python


def _none(_: Any) -> None:
    return None


def _key(key: str | None) -> str:
    return key or str(uuid.uuid4())


def _seg(value: str | int) -> str:
    """A path segment, percent-encoded (a ``/`` inside an id cannot be addressed: ids avoid it)."""
    return quote(str(value), safe="")


def _user(user: str) -> str:
    return f"/v1/users/{_seg(user)}"


def _adapter(user: str, adapter: str) -> str:
    return f"{_user(user)}/adapters/{_seg(adapter)}"


def _dump(record: Record) -> Any:
    """A record as JSON; a model's absent optional fields (an ``sft`` record's other form) are left out."""
    return (
        record.model_dump(mode="json", exclude_none=True) if isinstance(record, BaseModel) else dict(record)
    )


def _query(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


# --- feedback ---------------------------------------------------------------------------------------------------
def submit_feedback(user: str, records: Sequence[Record], *, idempotency_key: str | None) -> Call[Any]:
    return Call(
        "POST",
        f"{_user(user)}/feedback",
        _parser(s.FeedbackSubmitted),
        body={"records": [_dump(r) for r in records]},
        idempotency_key=_key(idempotency_key),
    )


def list_feedback(user: str, *, after_id: int | None, limit: int) -> Call[Any]:
    params = _query(after_id=after_id, limit=limit)
    return Call("GET", f"{_user(user)}/feedback", _parser(list[s.FeedbackRecordOut]), params=params)


# --- adapters ---------------------------------------------------------------------------------------------------
def list_adapters(user: str) -> Call[Any]:
    return Call("GET", f"{_user(user)}/adapters", _parser(list[s.AdapterOut]))


def list_versions(user: str, adapter: str) -> Call[Any]:
    return Call("GET", f"{_adapter(user, adapter)}/versions", _parser(list[s.VersionOut]))


def get_version(user: str, adapter: str, number: int, *, qa_document: bool) -> Call[Any]:
    path = f"{_adapter(user, adapter)}/versions/{int(number)}"
    params = {"qa_document": "true"} if qa_document else None
    return Call("GET", path, _parser(s.VersionDetail), params=params)


def lineage(user: str, adapter: str, number: int, *, depth: int | None) -> Call[Any]:
    path = f"{_adapter(user, adapter)}/versions/{int(number)}/lineage"
    return Call("GET", path, _parser(s.LineageOut), params=_query(depth=depth))


def alias_history(user: str, adapter: str) -> Call[Any]:
    return Call("GET", f"{_adapter(user, adapter)}/history", _parser(list[s.AliasEventOut]))


def promote(user: str, adapter: str, version: int, *, reason: str, idempotency_key: str | None) -> Call[Any]:
    return Call(
        "POST",
        f"{_adapter(user, adapter)}/promote",
        _parser(s.AliasEventOut),
        body=s.PromoteRequest(version=version, reason=reason).model_dump(mode="json"),
        idempotency_key=_key(idempotency_key),
    )


def rollback(
    user: str, adapter: str, to_version: int | None, *, reason: str, idempotency_key: str | None
) -> Call[Any]:
    return Call(
        "POST",
        f"{_adapter(user, adapter)}/rollback",
        _parser(s.AliasEventOut),
        body=s.RollbackRequest(to_version=to_version, reason=reason).model_dump(mode="json"),
        idempotency_key=_key(idempotency_key),
    )


# --- jobs -------------------------------------------------------------------------------------------------------
def _overrides(overrides: Overrides) -> dict[str, Any]:
    return overrides.given() if isinstance(overrides, s.TrainingOverrides) else dict(overrides)


def _train_body(training: Overrides | None) -> dict[str, Any] | None:
    """No body without overrides (the request as before they existed), else ``{"training": {...}}``."""
    return None if training is None else {"training": _overrides(training)}


def train(user: str, *, training: Overrides | None, idempotency_key: str | None) -> Call[Any]:
    return Call(
        "POST",
        f"{_user(user)}/train",
        _parser(s.TrainSubmitted),
        body=_train_body(training),
        idempotency_key=_key(idempotency_key),
    )


def get_job(job_id: int) -> Call[Any]:
    return Call("GET", f"/v1/jobs/{int(job_id)}", _parser(s.JobOut))


def list_jobs(*, user: str | None, state: str | None, limit: int) -> Call[Any]:
    params = _query(user=user, state=state, limit=limit)
    return Call("GET", "/v1/jobs", _parser(list[s.JobOut]), params=params)


def cancel_job(job_id: int, *, idempotency_key: str | None) -> Call[Any]:
    path = f"/v1/jobs/{int(job_id)}/cancel"
    return Call("POST", path, _parser(s.JobOut), idempotency_key=_key(idempotency_key))


# --- training config --------------------------------------------------------------------------------------------
def get_training_config() -> Call[Any]:
    return Call("GET", "/v1/training-config", _parser(s.TrainingConfigOut))


def set_training_config(overrides: Overrides) -> Call[Any]:
    # a PUT: sending it again sets the same overrides, so a retry is safe without an idempotency key
    body = _overrides(overrides)
    return Call("PUT", "/v1/training-config", _parser(s.TrainingConfigOut), body=body)


# --- enrolments -------------------------------------------------------------------------------------------------
def enrol(user: str, task: str, *, idempotency_key: str | None) -> Call[Any]:
    return Call(
        "POST",
        f"{_user(user)}/enrolments",
        _parser(s.EnrolmentOut),
        body=s.EnrolRequest(task=task).model_dump(mode="json"),
        idempotency_key=_key(idempotency_key),
    )


def unenrol(user: str, task: str) -> Call[None]:
    return Call("DELETE", f"{_user(user)}/enrolments/{_seg(task)}", _none)


def list_enrolments(user: str) -> Call[Any]:
    return Call("GET", f"{_user(user)}/enrolments", _parser(list[s.EnrolmentOut]))


# --- shared task adapters ---------------------------------------------------------------------------------------
def _task(task: str) -> str:
    return f"/v1/tasks/{_seg(task)}"


def list_tasks() -> Call[Any]:
    return Call("GET", "/v1/tasks", _parser(list[s.TaskOut]))


def submit_task_feedback(task: str, records: Sequence[Record], *, idempotency_key: str | None) -> Call[Any]:
    return Call(
        "POST",
        f"{_task(task)}/feedback",
        _parser(s.FeedbackSubmitted),
        body={"records": [_dump(r) for r in records]},
        idempotency_key=_key(idempotency_key),
    )


def list_task_feedback(task: str, *, after_id: int | None, limit: int) -> Call[Any]:
    params = _query(after_id=after_id, limit=limit)
    return Call("GET", f"{_task(task)}/feedback", _parser(list[s.FeedbackRecordOut]), params=params)


def import_task_adapter(
    task: str, archive: bytes, example_prompts: Sequence[str], *, reason: str, idempotency_key: str | None
) -> Call[Any]:
    body = {
        "archive_base64": base64.b64encode(archive).decode("ascii"),
        "example_prompts": list(example_prompts),
        "reason": reason,
    }
    return Call(
        "POST",
        f"{_task(task)}/import",
        _parser(s.TaskImportSubmitted),
        body=body,
        idempotency_key=_key(idempotency_key),
    )


def train_task(task: str, *, training: Overrides | None, idempotency_key: str | None) -> Call[Any]:
    return Call(
        "POST",
        f"{_task(task)}/train",
        _parser(s.TrainSubmitted),
        body=_train_body(training),
        idempotency_key=_key(idempotency_key),
    )


def task_enrolments(task: str) -> Call[Any]:
    return Call("GET", f"{_task(task)}/enrolments", _parser(s.TaskEnrolledOut))


def list_task_versions(task: str) -> Call[Any]:
    return Call("GET", f"{_task(task)}/versions", _parser(list[s.VersionOut]))


def get_task_version(task: str, number: int, *, qa_document: bool) -> Call[Any]:
    params = {"qa_document": "true"} if qa_document else None
    return Call("GET", f"{_task(task)}/versions/{int(number)}", _parser(s.VersionDetail), params=params)


def task_lineage(task: str, number: int, *, depth: int | None) -> Call[Any]:
    path = f"{_task(task)}/versions/{int(number)}/lineage"
    return Call("GET", path, _parser(s.LineageOut), params=_query(depth=depth))


def task_history(task: str) -> Call[Any]:
    return Call("GET", f"{_task(task)}/history", _parser(list[s.AliasEventOut]))


def promote_task(task: str, version: int, *, reason: str, idempotency_key: str | None) -> Call[Any]:
    return Call(
        "POST",
        f"{_task(task)}/promote",
        _parser(s.AliasEventOut),
        body=s.PromoteRequest(version=version, reason=reason).model_dump(mode="json"),
        idempotency_key=_key(idempotency_key),
    )


def rollback_task(
    task: str, to_version: int | None, *, reason: str, idempotency_key: str | None
) -> Call[Any]:
    return Call(
        "POST",
        f"{_task(task)}/rollback",
        _parser(s.AliasEventOut),
        body=s.RollbackRequest(to_version=to_version, reason=reason).model_dump(mode="json"),
        idempotency_key=_key(idempotency_key),
    )


def pack_adapter_folder(folder: Path) -> bytes:
    """A PEFT folder's regular files as an in-memory .tar.gz (sorted, fixed times: same folder, same bytes)."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink()):
            info = tarfile.TarInfo(path.name)
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)
    return buffer.getvalue()


def adapter_archive(source: str | Path | bytes) -> bytes:
    """What ``import_task_adapter`` uploads: bytes as given, a folder packed, or an archive file's bytes."""
    if isinstance(source, bytes):
        return source
    path = Path(source)
    return pack_adapter_folder(path) if path.is_dir() else path.read_bytes()


# --- generation -------------------------------------------------------------------------------------------------
def generate(user: str, request: s.GenerateRequest) -> Call[Any]:
    body = request.model_dump(mode="json", exclude=None if request.raw else {"raw"})  # as before raw existed
    return Call("POST", f"{_user(user)}/generate", _parser(s.GenerateResponse), body=body)


def complete(request: s.CompletionRequest) -> Call[Any]:
    body = request.model_dump(mode="json", exclude_none=True)
    return Call("POST", "/v1/completions", _parser(s.CompletionResponse), body=body)


def chat(request: s.ChatCompletionRequest) -> Call[Any]:
    body = request.model_dump(mode="json", exclude_none=True)
    return Call("POST", "/v1/chat/completions", _parser(s.ChatCompletionResponse), body=body)


def chat_messages(messages: Sequence[Message]) -> list[s.ChatMessage]:
    return [m if isinstance(m, s.ChatMessage) else s.ChatMessage.model_validate(dict(m)) for m in messages]


# --- tenants (admin) and health ---------------------------------------------------------------------------------
def create_tenant(name: str) -> Call[Any]:
    # not idempotent on the service: re-sending after it may have arrived could answer "already exists"
    body = s.TenantCreate(name=name).model_dump(mode="json")
    return Call("POST", "/v1/tenants", _parser(s.TenantCreated), body=body, retry_after_send=False)


def create_api_key(tenant: str) -> Call[Any]:
    path = f"/v1/tenants/{_seg(tenant)}/keys"
    return Call("POST", path, _parser(s.ApiKeyCreated), retry_after_send=False)


def list_tenants() -> Call[Any]:
    return Call("GET", "/v1/tenants", _parser(list[s.TenantOut]))


def health() -> Call[Any]:
    return Call("GET", "/healthz", _parser(s.HealthOut))


def ready() -> Call[Any]:
    return Call("GET", "/readyz", _parser(s.ReadyOut), ok_statuses=frozenset({503}))
