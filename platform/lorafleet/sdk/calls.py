"""Every endpoint of the API as a ``Call``: method, path, query, body and how to parse the answer.

This is the SDK's one definition of its calls: each builder here has the signature and docstring of the client
method of the same name, and ``Client`` (sync) and ``AsyncClient`` (async) expose them through their own
transport, so the two cannot drift apart. Mutating calls carry an
idempotency key (a fresh UUID per call unless the caller passes one), sent as ``Idempotency-Key`` on every
retry of that call, so a retried request never creates anything twice.
"""

from __future__ import annotations

import base64
import gzip
import io
import tarfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from pydantic import BaseModel, TypeAdapter

from lorafleet.domain.text import MAX_IMPORT_ARCHIVE_BYTES
from lorafleet.errors import PayloadTooLargeError, ValidationError
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
    #: a binary answer: its body is written to this file (``parse`` gets the ``DownloadedFile`` fields)
    save_to: Path | None = None

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


def _overrides(overrides: Overrides) -> dict[str, Any]:
    return overrides.given() if isinstance(overrides, s.TrainingOverrides) else dict(overrides)


def _train_body(training: Overrides | None) -> dict[str, Any] | None:
    """No body without overrides (the request as before they existed), else ``{"training": {...}}``."""
    return None if training is None else {"training": _overrides(training)}


# --- what a user's adapter and a task's adapter share (only the path differs) ----------------------------------
def _submit_records(
    path: str, records: Sequence[Record], idempotency_key: str | None
) -> Call[s.FeedbackSubmitted]:
    body = {"records": [_dump(r) for r in records]}
    key = _key(idempotency_key)
    return Call("POST", f"{path}/feedback", _parser(s.FeedbackSubmitted), body=body, idempotency_key=key)


def _list_records(path: str, after_id: int | None, limit: int) -> Call[list[s.FeedbackRecordOut]]:
    params = _query(after_id=after_id, limit=limit)
    return Call("GET", f"{path}/feedback", _parser(list[s.FeedbackRecordOut]), params=params)


def _get_version(path: str, number: int, qa_document: bool) -> Call[s.VersionDetail]:
    params = {"qa_document": "true"} if qa_document else None
    return Call("GET", f"{path}/versions/{int(number)}", _parser(s.VersionDetail), params=params)


def _lineage(path: str, number: int, depth: int | None) -> Call[s.LineageOut]:
    path = f"{path}/versions/{int(number)}/lineage"
    return Call("GET", path, _parser(s.LineageOut), params=_query(depth=depth))


def _move_live(path: str, action: str, body: BaseModel, idempotency_key: str | None) -> Call[s.AliasEventOut]:
    body_json = body.model_dump(mode="json")
    key = _key(idempotency_key)
    return Call("POST", f"{path}/{action}", _parser(s.AliasEventOut), body=body_json, idempotency_key=key)


def _download(path: str, dest: str | Path) -> Call[s.DownloadedFile]:
    """A GET whose body is written to ``dest`` (a partial file renamed into place once complete)."""
    return Call("GET", path, _parser(s.DownloadedFile), save_to=Path(dest))


def _train(path: str, training: Overrides | None, idempotency_key: str | None) -> Call[s.TrainSubmitted]:
    body, key = _train_body(training), _key(idempotency_key)
    return Call("POST", f"{path}/train", _parser(s.TrainSubmitted), body=body, idempotency_key=key)


# --- feedback ---------------------------------------------------------------------------------------------------
def submit_feedback(
    user: str, records: Sequence[Record], *, idempotency_key: str | None = None
) -> Call[s.FeedbackSubmitted]:
    """Store a batch of records for ``user`` (created on first sight); repeats are deduplicated. An ``sft``
    record is ``prompt`` + ``completion`` or OpenAI-style ``messages`` ending with the assistant's turn."""
    return _submit_records(_user(user), records, idempotency_key)


def list_feedback(
    user: str, *, after_id: int | None = None, limit: int = 100
) -> Call[list[s.FeedbackRecordOut]]:
    return _list_records(_user(user), after_id, limit)


def list_users(*, limit: int = 100, offset: int = 0) -> Call[list[s.UserOut]]:
    """The tenant's users by id, one page: each with live versions, last feedback time and counts."""
    return Call("GET", "/v1/users", _parser(list[s.UserOut]), params=_query(limit=limit, offset=offset))


def list_audit(
    *, action: str | None = None, limit: int = 100, offset: int = 0
) -> Call[list[s.AuditEventOut]]:
    """The tenant's audit events, oldest first, one page (``action``: only that one)."""
    params = _query(action=action, limit=limit, offset=offset)
    return Call("GET", "/v1/audit", _parser(list[s.AuditEventOut]), params=params)


# --- adapters ---------------------------------------------------------------------------------------------------
def export_feedback(user: str, path: str | Path) -> Call[s.DownloadedFile]:
    """Write all of the user's records to ``path`` as JSON Lines, oldest first (one record per line, in the
    shape ``list_feedback`` returns)."""
    return _download(f"{_user(user)}/feedback/export", path)


def list_adapters(user: str) -> Call[list[s.AdapterOut]]:
    return Call("GET", f"{_user(user)}/adapters", _parser(list[s.AdapterOut]))


def list_versions(user: str, adapter: str) -> Call[list[s.VersionOut]]:
    return Call("GET", f"{_adapter(user, adapter)}/versions", _parser(list[s.VersionOut]))


def get_version(user: str, adapter: str, number: int, *, qa_document: bool = False) -> Call[s.VersionDetail]:
    return _get_version(_adapter(user, adapter), number, qa_document)


def lineage(user: str, adapter: str, number: int, *, depth: int | None = None) -> Call[s.LineageOut]:
    return _lineage(_adapter(user, adapter), number, depth)


def download_version(user: str, adapter: str, number: int, path: str | Path) -> Call[s.DownloadedFile]:
    """Write the version as a PEFT folder archive (``.tar.gz``) to ``path``; unpacked, it loads with
    ``AutoPeftModelForCausalLM.from_pretrained`` (``docs/data-rights.md``) and imports back into lorafleet."""
    return _download(f"{_adapter(user, adapter)}/versions/{int(number)}/download", path)


def import_adapter(
    user: str,
    adapter: str,
    source: str | Path | bytes,
    example_prompts: Sequence[str],
    *,
    reason: str = "",
    examples: Sequence[tuple[str, str]] | None = None,
    idempotency_key: str | None = None,
) -> Call[s.TaskImportSubmitted]:
    """Import the user's own PEFT adapter (a folder, a .tar/.tar.gz/.zip file such as ``download_version``
    writes, or its bytes) as a candidate version of their adapter ``adapter`` (created when absent), with the
    checks and QA of ``import_task_adapter``; returns the ``import`` job (``wait_for_job`` it)."""
    return _import(_adapter(user, adapter), source, example_prompts, reason, examples, idempotency_key)


def alias_history(user: str, adapter: str) -> Call[list[s.AliasEventOut]]:
    return Call("GET", f"{_adapter(user, adapter)}/history", _parser(list[s.AliasEventOut]))


def promote(
    user: str,
    adapter: str,
    version: int,
    *,
    reason: str = "",
    force: bool = False,
    idempotency_key: str | None = None,
) -> Call[s.AliasEventOut]:
    """Make ``version`` live. Under the promote rule ``qa`` a version QA has not passed is refused
    (``InvalidState``, code ``qa_undecided``) unless ``force``: then the move is recorded as forced and QA still
    evaluates the version, rolling it back if it fails."""
    body = s.PromoteRequest(version=version, reason=reason, force=force)
    return _move_live(_adapter(user, adapter), "promote", body, idempotency_key)


def rollback(
    user: str,
    adapter: str,
    to_version: int | None = None,
    *,
    reason: str = "",
    idempotency_key: str | None = None,
) -> Call[s.AliasEventOut]:
    """Move ``live`` back to ``to_version`` (an earlier number) or to no adapter (None)."""
    body = s.RollbackRequest(to_version=to_version, reason=reason)
    return _move_live(_adapter(user, adapter), "rollback", body, idempotency_key)


# --- jobs -------------------------------------------------------------------------------------------------------
def train(
    user: str, *, training: Overrides | None = None, idempotency_key: str | None = None
) -> Call[s.TrainSubmitted]:
    """Queue a training job for ``user`` now; ``training`` overrides the tenant's config for this job."""
    return _train(_user(user), training, idempotency_key)


def get_job(job_id: int) -> Call[s.JobOut]:
    return Call("GET", f"/v1/jobs/{int(job_id)}", _parser(s.JobOut))


def list_jobs(*, user: str | None = None, state: str | None = None, limit: int = 100) -> Call[list[s.JobOut]]:
    params = _query(user=user, state=state, limit=limit)
    return Call("GET", "/v1/jobs", _parser(list[s.JobOut]), params=params)


def cancel_job(job_id: int, *, idempotency_key: str | None = None) -> Call[s.JobOut]:
    """Cancel a job: a queued one at once, a running one at its next step (returned still ``running``,
    with ``cancel_requested_at``). A succeeded or failed job raises ``JobFinished`` (its ``state``)."""
    path = f"/v1/jobs/{int(job_id)}/cancel"
    return Call("POST", path, _parser(s.JobOut), idempotency_key=_key(idempotency_key))


# --- training config --------------------------------------------------------------------------------------------
def get_training_config() -> Call[s.TrainingConfigOut]:
    """The tenant's training overrides and the effective config its next jobs get."""
    return Call("GET", "/v1/training-config", _parser(s.TrainingConfigOut))


def set_training_config(overrides: Overrides) -> Call[s.TrainingConfigOut]:
    """Replace the tenant's training overrides (``{}`` resets them); a bad field is ``ValidationFailed``."""
    body = _overrides(overrides)
    return Call("PUT", "/v1/training-config", _parser(s.TrainingConfigOut), body=body)


# --- enrolments -------------------------------------------------------------------------------------------------
def enrol(user: str, task: str, *, idempotency_key: str | None = None) -> Call[s.EnrolmentOut]:
    return Call(
        "POST",
        f"{_user(user)}/enrolments",
        _parser(s.EnrolmentOut),
        body=s.EnrolRequest(task=task).model_dump(mode="json"),
        idempotency_key=_key(idempotency_key),
    )


def unenrol(user: str, task: str) -> Call[None]:
    return Call("DELETE", f"{_user(user)}/enrolments/{_seg(task)}", _none)


def list_enrolments(user: str) -> Call[list[s.EnrolmentOut]]:
    return Call("GET", f"{_user(user)}/enrolments", _parser(list[s.EnrolmentOut]))


# --- shared task adapters ---------------------------------------------------------------------------------------
def _task(task: str) -> str:
    return f"/v1/tasks/{_seg(task)}"


def list_tasks() -> Call[list[s.TaskOut]]:
    """The tenant's shared task adapters, with live version and counts."""
    return Call("GET", "/v1/tasks", _parser(list[s.TaskOut]))


def submit_task_feedback(
    task: str, records: Sequence[Record], *, idempotency_key: str | None = None
) -> Call[s.FeedbackSubmitted]:
    """Store records for a shared task (its adapter is created on first sight); trained like a user's."""
    return _submit_records(_task(task), records, idempotency_key)


def list_task_feedback(
    task: str, *, after_id: int | None = None, limit: int = 100
) -> Call[list[s.FeedbackRecordOut]]:
    return _list_records(_task(task), after_id, limit)


def import_task_adapter(
    task: str,
    source: str | Path | bytes,
    example_prompts: Sequence[str],
    *,
    reason: str = "",
    examples: Sequence[tuple[str, str]] | None = None,
    idempotency_key: str | None = None,
) -> Call[s.TaskImportSubmitted]:
    """Import a PEFT adapter (a folder, a .tar/.tar.gz/.zip file, or its bytes) as a candidate version of
    the task; returns the ``import`` job (``wait_for_job`` it). QA then decides as for a trained version.
    ``examples``: ``(prompt, expected)`` pairs, QA's evidence for the version (without them, and without task
    feedback, QA holds it for a promote with force)."""
    return _import(_task(task), source, example_prompts, reason, examples, idempotency_key)


def _import(
    path: str,
    source: str | Path | bytes,
    example_prompts: Sequence[str],
    reason: str,
    examples: Sequence[tuple[str, str]] | None,
    idempotency_key: str | None,
) -> Call[s.TaskImportSubmitted]:
    archive = adapter_archive(source)
    body: dict[str, Any] = {
        "archive_base64": base64.b64encode(archive).decode("ascii"),
        "example_prompts": list(example_prompts),
        "reason": reason,
    }
    if examples:
        body["examples"] = [{"prompt": prompt, "expected": expected} for prompt, expected in examples]
    return Call(
        "POST",
        f"{path}/import",
        _parser(s.TaskImportSubmitted),
        body=body,
        idempotency_key=_key(idempotency_key),
    )


def export_task_feedback(task: str, path: str | Path) -> Call[s.DownloadedFile]:
    """Write all of the task's records to ``path`` as JSON Lines, oldest first."""
    return _download(f"{_task(task)}/feedback/export", path)


def download_task_version(task: str, number: int, path: str | Path) -> Call[s.DownloadedFile]:
    """Write the task version as a PEFT folder archive (``.tar.gz``) to ``path``, as ``download_version``."""
    return _download(f"{_task(task)}/versions/{int(number)}/download", path)


def train_task(
    task: str, *, training: Overrides | None = None, idempotency_key: str | None = None
) -> Call[s.TrainSubmitted]:
    return _train(_task(task), training, idempotency_key)


def task_enrolments(task: str) -> Call[s.TaskEnrolledOut]:
    return Call("GET", f"{_task(task)}/enrolments", _parser(s.TaskEnrolledOut))


def list_task_versions(task: str) -> Call[list[s.VersionOut]]:
    return Call("GET", f"{_task(task)}/versions", _parser(list[s.VersionOut]))


def get_task_version(task: str, number: int, *, qa_document: bool = False) -> Call[s.VersionDetail]:
    return _get_version(_task(task), number, qa_document)


def task_lineage(task: str, number: int, *, depth: int | None = None) -> Call[s.LineageOut]:
    return _lineage(_task(task), number, depth)


def task_history(task: str) -> Call[list[s.AliasEventOut]]:
    return Call("GET", f"{_task(task)}/history", _parser(list[s.AliasEventOut]))


def promote_task(
    task: str, version: int, *, reason: str = "", force: bool = False, idempotency_key: str | None = None
) -> Call[s.AliasEventOut]:
    """Make a task version live (enrolled users follow); ``force`` as for ``promote``."""
    body = s.PromoteRequest(version=version, reason=reason, force=force)
    return _move_live(_task(task), "promote", body, idempotency_key)


def rollback_task(
    task: str,
    to_version: int | None = None,
    *,
    reason: str = "",
    idempotency_key: str | None = None,
) -> Call[s.AliasEventOut]:
    """Move the task's ``live`` back (to an earlier number, or none); enrolled users follow at once."""
    body = s.RollbackRequest(to_version=to_version, reason=reason)
    return _move_live(_task(task), "rollback", body, idempotency_key)


def pack_adapter_folder(folder: Path) -> bytes:
    """A PEFT folder's regular files as an in-memory .tar.gz (sorted, fixed times: same folder, same bytes)."""
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    buffer = io.BytesIO()
    # the gzip header's own mtime too (tarfile's "w:gz" writes the current time there)
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink()):
            info = tarfile.TarInfo(path.name)
            info.size, info.mtime, info.mode = path.stat().st_size, 0, 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)
    return buffer.getvalue()


def adapter_archive(source: str | Path | bytes, *, max_bytes: int = MAX_IMPORT_ARCHIVE_BYTES) -> bytes:
    """What ``import_task_adapter`` uploads: bytes as given, a folder packed, or an archive file's bytes. A
    source that is not a regular file or folder (a device such as ``/dev/zero``, a pipe) is refused, and a file
    is read only up to ``max_bytes`` (the import cap): a larger one is refused without reading it all."""
    if isinstance(source, bytes):
        return source
    path = Path(source)
    if path.is_dir():
        return pack_adapter_folder(path)
    if not path.is_file():  # follows links; a device, a pipe or a socket is not a regular file
        raise ValidationError(f"source: {path} is not a regular file or a folder")
    with path.open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PayloadTooLargeError(f"source: {path} is larger than the import cap of {max_bytes} bytes")
    return data


# --- generation -------------------------------------------------------------------------------------------------
def generate(
    user: str,
    prompt: str,
    *,
    max_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    raw: bool = False,
    adapter_scale: float = 1.0,
) -> Call[s.GenerateResponse]:
    """Generate for ``user`` through their adapter bank (temperature 0 = greedy). The prompt is one user turn
    of the backbone's chat template, as feedback trains; ``raw=True`` feeds it as is. ``adapter_scale``: the
    personalization dial (every adapter weight times it; 0 is the base model)."""
    request = s.GenerateRequest(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=list(stop),
        raw=raw,
        adapter_scale=adapter_scale,
    )
    # as before raw and the dial existed: only what differs from the old defaults is sent
    unchanged = {
        k for k, default in (("raw", False), ("adapter_scale", 1.0)) if getattr(request, k) == default
    }
    body = request.model_dump(mode="json", exclude=unchanged or None)
    return Call("POST", f"{_user(user)}/generate", _parser(s.GenerateResponse), body=body)


def complete(
    user: str | None,
    prompt: str | list[str],
    *,
    max_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    model: str = "lorafleet",
    adapter_scale: float = 1.0,
    n: int = 1,
    logprobs: int | None = None,
    echo: bool = False,
) -> Call[s.CompletionResponse]:
    """OpenAI-style ``/v1/completions`` for ``user`` (OpenAI's defaults: 16 tokens, temperature 1). ``model``:
    ``lorafleet`` (the user's experts; the base model for ``user=None``), ``base``, ``task:<name>[@<n>]`` or
    ``<user>/<adapter>[@<n>]`` (one adapter, live or pinned); see ``models()``. ``n`` choices per prompt;
    ``logprobs``: each token's log probability and that many alternatives; ``echo``: the prompt first."""
    request = s.CompletionRequest(
        user=user,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
        model=model,
        adapter_scale=adapter_scale,
        n=n,
        logprobs=logprobs,
        echo=echo or None,
    )
    return Call("POST", "/v1/completions", _parser(s.CompletionResponse), body=_openai_body(request))


def chat(
    user: str | None,
    messages: Sequence[Message],
    *,
    max_tokens: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | list[str] | None = None,
    model: str = "lorafleet",
    adapter_scale: float = 1.0,
    n: int = 1,
    logprobs: bool = False,
    top_logprobs: int | None = None,
) -> Call[s.ChatCompletionResponse]:
    """OpenAI-style ``/v1/chat/completions`` for ``user`` (messages as dicts or ``ChatMessage``), rendered with
    the backbone's chat template and ended at its end-of-turn token; ``model`` and ``n`` as for ``complete``;
    ``logprobs`` (and ``top_logprobs`` alternatives) per generated token."""
    request = s.ChatCompletionRequest(
        user=user,
        messages=chat_messages(messages),
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop,
        model=model,
        adapter_scale=adapter_scale,
        n=n,
        logprobs=logprobs or None,
        top_logprobs=top_logprobs,
    )
    return Call("POST", "/v1/chat/completions", _parser(s.ChatCompletionResponse), body=_openai_body(request))


def _openai_body(request: s.CompletionRequest | s.ChatCompletionRequest) -> dict[str, Any]:
    """The body as JSON; fields at their default (``n`` 1 included) are left out, as before they existed."""
    body = request.model_dump(mode="json", exclude_none=True)
    if body.get("n") == 1:
        del body["n"]
    return body


def stream_complete(user: str | None, prompt: str | list[str], **options: Any) -> Call[s.CompletionChunk]:
    """``complete`` as server-sent events: the client method yields each ``CompletionChunk`` as it is decoded
    (text pieces per choice, each choice's last chunk with its ``finish_reason`` and ``lorafleet``), then one
    with the ``usage``. Takes ``complete``'s options."""
    return _streamed(complete(user, prompt, **options), s.CompletionChunk)


def stream_chat(user: str | None, messages: Sequence[Message], **options: Any) -> Call[s.ChatCompletionChunk]:
    """``chat`` as server-sent events: the client method yields each ``ChatCompletionChunk`` (``delta.content``
    pieces), then one with the ``usage``. Takes ``chat``'s options."""
    return _streamed(chat(user, messages, **options), s.ChatCompletionChunk)


def _streamed(call: Call[Any], chunk: type[T]) -> Call[T]:
    body = {**call.body, "stream": True, "stream_options": {"include_usage": True}}
    # a stream is not retried once sent: its first chunks may already have been read
    return Call(call.method, call.path, _parser(chunk), body=body, retry_after_send=False)


def chat_messages(messages: Sequence[Message]) -> list[s.ChatMessage]:
    return [m if isinstance(m, s.ChatMessage) else s.ChatMessage.model_validate(dict(m)) for m in messages]


# --- tenants (admin) and health ---------------------------------------------------------------------------------
def create_tenant(name: str) -> Call[s.TenantCreated]:
    """Admin key only: a new tenant and its first API key (shown only now)."""
    body = s.TenantCreate(name=name).model_dump(mode="json")
    return Call("POST", "/v1/tenants", _parser(s.TenantCreated), body=body, retry_after_send=False)


def create_api_key(tenant: str) -> Call[s.ApiKeyCreated]:
    path = f"/v1/tenants/{_seg(tenant)}/keys"
    return Call("POST", path, _parser(s.ApiKeyCreated), retry_after_send=False)


def list_api_keys(tenant: str) -> Call[list[s.ApiKeyOut]]:
    """Admin key only: the tenant's API keys (id, prefix, created, last used, revoked; never the keys)."""
    return Call("GET", f"/v1/tenants/{_seg(tenant)}/keys", _parser(list[s.ApiKeyOut]))


def revoke_api_key(tenant: str, key_id: int) -> Call[s.ApiKeyOut]:
    """Admin key only: revoke one of the tenant's keys by its id (idempotent)."""
    return Call("POST", f"/v1/tenants/{_seg(tenant)}/keys/{key_id}/revoke", _parser(s.ApiKeyOut))


def list_tenants() -> Call[list[s.TenantOut]]:
    return Call("GET", "/v1/tenants", _parser(list[s.TenantOut]))


def verify_blobs(
    *, repair: bool = False, tenant: str | None = None, only_bad: bool = False
) -> Call[s.VerifyReportOut]:
    """Admin key only: re-hash the blob of every version (``tenant``: only that tenant's) and report each one ok,
    corrupt, missing, unreadable or quarantined, with counts. ``repair`` quarantines the corrupt and missing ones
    (status ``corrupt``; a live one is rolled back first, reason ``blob-corrupt``); running it again is safe."""
    body = s.VerifyRequest(repair=repair, tenant=tenant, only_bad=only_bad).model_dump(mode="json")
    return Call("POST", "/v1/admin/verify", _parser(s.VerifyReportOut), body=body)


def admin_audit(
    *, tenant: str | None = None, action: str | None = None, limit: int = 100, offset: int = 0
) -> Call[list[s.AuditEventOut]]:
    """Admin key only: audit events of every tenant (``tenant``: only that one's), oldest first, one page."""
    params = _query(tenant=tenant, action=action, limit=limit, offset=offset)
    return Call("GET", "/v1/admin/audit", _parser(list[s.AuditEventOut]), params=params)


def models() -> Call[s.ModelList]:
    """``GET /v1/models``: what a generation's ``model`` may name (pinned adapter versions are not listed)."""
    return Call("GET", "/v1/models", _parser(s.ModelList))


def health() -> Call[s.HealthOut]:
    return Call("GET", "/healthz", _parser(s.HealthOut))


def ready() -> Call[s.ReadyOut]:
    return Call("GET", "/readyz", _parser(s.ReadyOut), ok_statuses=frozenset({503}))


# --- data deletion -----------------------------------------------------------------------------------------------
def forget_user(user: str, *, purge: bool = False) -> Call[s.DeletionReceiptOut]:
    """``DELETE /v1/users/{user}``: erase the user and everything of theirs; the receipt (ids and hashes only).
    ``purge``: delete the blobs now instead of after the gc grace period."""
    params = {"purge": "true"} if purge else None
    # not re-sent: a retry of a deletion that went through would answer 404 (the receipt is the answer)
    return Call("DELETE", _user(user), _parser(s.DeletionReceiptOut), params=params, retry_after_send=False)


def forget_records(
    user: str,
    ids: Sequence[int] | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    metadata: Mapping[str, Any] | None = None,
    purge: bool = False,
) -> Call[s.DeletionReceiptOut]:
    """Forget some of the user's records, by ``ids`` or by a filter (``since``/``until``: when they were stored;
    ``metadata``: key/value pairs their metadata holds): the versions trained on them are revoked and rebuilt;
    the answer is the deletion's receipt. Not re-sent once it may have reached the service."""
    return _forget(_user(user), ids, since=since, until=until, metadata=metadata, purge=purge)


def forget_task_records(
    task: str,
    ids: Sequence[int] | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    metadata: Mapping[str, Any] | None = None,
    purge: bool = False,
) -> Call[s.DeletionReceiptOut]:
    """``forget_records`` for a shared task's records (and its task adapter)."""
    return _forget(_task(task), ids, since=since, until=until, metadata=metadata, purge=purge)


def _forget(
    path: str,
    ids: Sequence[int] | None,
    *,
    since: datetime | None,
    until: datetime | None,
    metadata: Mapping[str, Any] | None,
    purge: bool,
) -> Call[s.DeletionReceiptOut]:
    chosen = since is not None or until is not None or metadata is not None
    given = s.RecordFilterIn(since=since, until=until, metadata=None if metadata is None else dict(metadata))
    body = s.ForgetRecordsRequest(
        ids=None if ids is None else list(ids), filter=given if chosen else None, purge=purge
    )
    return Call(
        "DELETE",
        f"{path}/feedback",
        _parser(s.DeletionReceiptOut),
        body=body.model_dump(mode="json", exclude_none=True),
        retry_after_send=False,
    )


def deletion_receipt(receipt_id: str) -> Call[s.DeletionReceiptOut]:
    """A deletion's receipt by id, with where its rebuild stands."""
    return Call("GET", f"/v1/deletions/{_seg(receipt_id)}", _parser(s.DeletionReceiptOut))


def list_deletions(subject: str | None = None, *, limit: int = 100) -> Call[list[s.DeletionReceiptOut]]:
    """The tenant's deletion receipts, newest first (``subject``: ``user:<id>`` or ``task:<name>``)."""
    params = _query(subject=subject, limit=limit)
    return Call("GET", "/v1/deletions", _parser(list[s.DeletionReceiptOut]), params=params)
