"""``Client`` (sync) and ``AsyncClient``: every endpoint of the lorafleet API as a typed method.

Retries: connection errors and 5xx answers are retried with exponential backoff and jitter (``backoff`` *
2**attempt seconds, capped; a ``Retry-After`` header is honoured), up to ``max_retries`` times; a 4xx is never
retried, except "this idempotency key is still in flight" (409), which the service answers while the first
copy of a retried request is still running. Every mutating call sends an ``Idempotency-Key`` (a fresh UUID per
call unless one is passed) and re-sends the same key on each retry, so a retry never creates anything twice.
Errors are the typed exceptions of ``lorafleet.sdk.errors``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import httpx

from lorafleet.sdk import calls as c
from lorafleet.sdk import schemas as s
from lorafleet.sdk.errors import ApiError, JobTimeout
from lorafleet.sdk.transport import (
    ClientBase,
    RetryPolicy,
    answer,
    connection_failed,
    headers_for,
    may_retry_error,
    may_retry_transport,
    request_args,
)

T = TypeVar("T")
#: ``wait_for_job``'s ``on_progress``: called with each new progress report of the job
OnProgress = Callable[[s.JobProgressOut], None]

__all__ = ["AsyncClient", "Client", "RetryPolicy"]


def _report_progress(job: s.JobOut, *, seen: list[s.JobProgressOut], on_progress: OnProgress | None) -> None:
    """Call ``on_progress`` when the job's progress differs from the last one reported (kept in ``seen``)."""
    if on_progress is None or job.progress is None or (seen and seen[-1] == job.progress):
        return
    seen[:] = [job.progress]
    on_progress(job.progress)


class Client(ClientBase):
    """A synchronous client; use it as a context manager or call ``close``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(timeout=timeout, max_retries=max_retries, backoff=backoff)
        self._http = httpx.Client(
            base_url=base_url, headers=headers_for(api_key), timeout=timeout, transport=transport
        )

    def _run(self, call: c.Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, **request_args(call))
            except httpx.TransportError as exc:
                error: ApiError = connection_failed(call, exc)
                retryable = may_retry_transport(call, exc)
            else:
                try:
                    return answer(call, response)
                except ApiError as exc:
                    error, retryable = exc, may_retry_error(exc)
            if self._give_up(attempt=attempt, retryable=retryable):
                raise error
            time.sleep(self.retry.delay(attempt=attempt, error=error))
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- feedback ---------------------------------------------------------------------------------------------
    def submit_feedback(
        self, user: str, records: Sequence[c.Record], *, idempotency_key: str | None = None
    ) -> s.FeedbackSubmitted:
        """Store a batch of records for ``user`` (created on first sight); repeats are deduplicated. An ``sft``
        record is ``prompt`` + ``completion`` or OpenAI-style ``messages`` ending with the assistant's turn."""
        return self._run(c.submit_feedback(user, records, idempotency_key=idempotency_key))

    def list_feedback(
        self, user: str, *, after_id: int | None = None, limit: int = 100
    ) -> list[s.FeedbackRecordOut]:
        return self._run(c.list_feedback(user, after_id=after_id, limit=limit))

    # --- adapters ---------------------------------------------------------------------------------------------
    def list_adapters(self, user: str) -> list[s.AdapterOut]:
        return self._run(c.list_adapters(user))

    def list_versions(self, user: str, adapter: str) -> list[s.VersionOut]:
        return self._run(c.list_versions(user, adapter))

    def get_version(
        self, user: str, adapter: str, number: int, *, qa_document: bool = False
    ) -> s.VersionDetail:
        return self._run(c.get_version(user, adapter, number, qa_document=qa_document))

    def lineage(self, user: str, adapter: str, number: int, *, depth: int | None = None) -> s.LineageOut:
        return self._run(c.lineage(user, adapter, number, depth=depth))

    def alias_history(self, user: str, adapter: str) -> list[s.AliasEventOut]:
        return self._run(c.alias_history(user, adapter))

    def promote(
        self, user: str, adapter: str, version: int, *, reason: str = "", idempotency_key: str | None = None
    ) -> s.AliasEventOut:
        return self._run(c.promote(user, adapter, version, reason=reason, idempotency_key=idempotency_key))

    def rollback(
        self,
        user: str,
        adapter: str,
        to_version: int | None = None,
        *,
        reason: str = "",
        idempotency_key: str | None = None,
    ) -> s.AliasEventOut:
        """Move ``live`` back to ``to_version`` (an earlier number) or to no adapter (None)."""
        call = c.rollback(user, adapter, to_version, reason=reason, idempotency_key=idempotency_key)
        return self._run(call)

    # --- jobs -------------------------------------------------------------------------------------------------
    def train(
        self, user: str, *, training: c.Overrides | None = None, idempotency_key: str | None = None
    ) -> s.TrainSubmitted:
        """Queue a training job for ``user`` now; ``training`` overrides the tenant's config for this job."""
        return self._run(c.train(user, training=training, idempotency_key=idempotency_key))

    def get_job(self, job_id: int) -> s.JobOut:
        return self._run(c.get_job(job_id))

    def list_jobs(
        self, *, user: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[s.JobOut]:
        return self._run(c.list_jobs(user=user, state=state, limit=limit))

    def cancel_job(self, job_id: int, *, idempotency_key: str | None = None) -> s.JobOut:
        """Cancel a job: a queued one at once, a running one at its next step (returned still ``running``,
        with ``cancel_requested_at``). A succeeded or failed job raises ``JobFinished`` (its ``state``)."""
        return self._run(c.cancel_job(job_id, idempotency_key=idempotency_key))

    def wait_for_job(
        self, job_id: int, *, timeout: float = 600.0, poll: float = 1.0, on_progress: OnProgress | None = None
    ) -> s.JobOut:
        """Poll until the job is succeeded, failed or cancelled (returned as it ended); ``JobTimeout`` after
        ``timeout`` seconds. ``on_progress`` is called with each progress report that differs from the last."""
        deadline = time.monotonic() + timeout
        seen: list[s.JobProgressOut] = []
        while True:
            job = self.get_job(job_id)
            _report_progress(job, seen=seen, on_progress=on_progress)
            if job.finished:
                return job
            if time.monotonic() >= deadline:
                raise JobTimeout(f"job {job_id} still {job.state} after {timeout:g} s")
            time.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))

    # --- training config --------------------------------------------------------------------------------------
    def get_training_config(self) -> s.TrainingConfigOut:
        """The tenant's training overrides and the effective config its next jobs get."""
        return self._run(c.get_training_config())

    def set_training_config(self, overrides: c.Overrides) -> s.TrainingConfigOut:
        """Replace the tenant's training overrides (``{}`` resets them); a bad field is ``ValidationFailed``."""
        return self._run(c.set_training_config(overrides))

    # --- enrolments -------------------------------------------------------------------------------------------
    def enrol(self, user: str, task: str, *, idempotency_key: str | None = None) -> s.EnrolmentOut:
        return self._run(c.enrol(user, task, idempotency_key=idempotency_key))

    def unenrol(self, user: str, task: str) -> None:
        self._run(c.unenrol(user, task))

    def list_enrolments(self, user: str) -> list[s.EnrolmentOut]:
        return self._run(c.list_enrolments(user))

    # --- shared task adapters ---------------------------------------------------------------------------------
    def list_tasks(self) -> list[s.TaskOut]:
        """The tenant's shared task adapters, with live version and counts."""
        return self._run(c.list_tasks())

    def submit_task_feedback(
        self, task: str, records: Sequence[c.Record], *, idempotency_key: str | None = None
    ) -> s.FeedbackSubmitted:
        """Store records for a shared task (its adapter is created on first sight); trained like a user's."""
        return self._run(c.submit_task_feedback(task, records, idempotency_key=idempotency_key))

    def list_task_feedback(
        self, task: str, *, after_id: int | None = None, limit: int = 100
    ) -> list[s.FeedbackRecordOut]:
        return self._run(c.list_task_feedback(task, after_id=after_id, limit=limit))

    def import_task_adapter(
        self,
        task: str,
        source: str | Path | bytes,
        example_prompts: Sequence[str],
        *,
        reason: str = "",
        idempotency_key: str | None = None,
    ) -> s.TaskImportSubmitted:
        """Import a PEFT adapter (a folder, a .tar/.tar.gz/.zip file, or its bytes) as a candidate version of
        the task; returns the ``import`` job (``wait_for_job`` it). QA then decides as for a trained version."""
        archive = c.adapter_archive(source)
        call = c.import_task_adapter(
            task, archive, example_prompts, reason=reason, idempotency_key=idempotency_key
        )
        return self._run(call)

    def train_task(
        self, task: str, *, training: c.Overrides | None = None, idempotency_key: str | None = None
    ) -> s.TrainSubmitted:
        return self._run(c.train_task(task, training=training, idempotency_key=idempotency_key))

    def task_enrolments(self, task: str) -> s.TaskEnrolledOut:
        return self._run(c.task_enrolments(task))

    def list_task_versions(self, task: str) -> list[s.VersionOut]:
        return self._run(c.list_task_versions(task))

    def get_task_version(self, task: str, number: int, *, qa_document: bool = False) -> s.VersionDetail:
        return self._run(c.get_task_version(task, number, qa_document=qa_document))

    def task_lineage(self, task: str, number: int, *, depth: int | None = None) -> s.LineageOut:
        return self._run(c.task_lineage(task, number, depth=depth))

    def task_history(self, task: str) -> list[s.AliasEventOut]:
        return self._run(c.task_history(task))

    def promote_task(
        self, task: str, version: int, *, reason: str = "", idempotency_key: str | None = None
    ) -> s.AliasEventOut:
        return self._run(c.promote_task(task, version, reason=reason, idempotency_key=idempotency_key))

    def rollback_task(
        self,
        task: str,
        to_version: int | None = None,
        *,
        reason: str = "",
        idempotency_key: str | None = None,
    ) -> s.AliasEventOut:
        """Move the task's ``live`` back (to an earlier number, or none); enrolled users follow at once."""
        return self._run(c.rollback_task(task, to_version, reason=reason, idempotency_key=idempotency_key))

    # --- generation -------------------------------------------------------------------------------------------
    def generate(
        self,
        user: str,
        prompt: str,
        *,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        raw: bool = False,
    ) -> s.GenerateResponse:
        """Generate for ``user`` through their adapter bank (temperature 0 = greedy). The prompt is one user turn
        of the backbone's chat template, as feedback trains; ``raw=True`` feeds it as is."""
        request = s.GenerateRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=list(stop),
            raw=raw,
        )
        return self._run(c.generate(user, request))

    def complete(
        self,
        user: str,
        prompt: str | list[str],
        *,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        model: str = "lorafleet",
    ) -> s.CompletionResponse:
        """OpenAI-style ``/v1/completions`` for ``user`` (OpenAI's defaults: 16 tokens, temperature 1)."""
        request = s.CompletionRequest(
            user=user,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            model=model,
        )
        return self._run(c.complete(request))

    def chat(
        self,
        user: str,
        messages: Sequence[c.Message],
        *,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        model: str = "lorafleet",
    ) -> s.ChatCompletionResponse:
        """OpenAI-style ``/v1/chat/completions`` for ``user`` (messages as dicts or ``ChatMessage``), rendered with
        the backbone's chat template and ended at its end-of-turn token."""
        request = s.ChatCompletionRequest(
            user=user,
            messages=c.chat_messages(messages),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            model=model,
        )
        return self._run(c.chat(request))

    # --- admin and health -------------------------------------------------------------------------------------
    def create_tenant(self, name: str) -> s.TenantCreated:
        """Admin key only: a new tenant and its first API key (shown only now)."""
        return self._run(c.create_tenant(name))

    def create_api_key(self, tenant: str) -> s.ApiKeyCreated:
        return self._run(c.create_api_key(tenant))

    def list_tenants(self) -> list[s.TenantOut]:
        return self._run(c.list_tenants())

    def health(self) -> s.HealthOut:
        return self._run(c.health())

    def ready(self) -> s.ReadyOut:
        return self._run(c.ready())


class AsyncClient(ClientBase):
    """The same methods as ``Client``, as coroutines; use ``async with`` or ``await aclose()``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(timeout=timeout, max_retries=max_retries, backoff=backoff)
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers_for(api_key), timeout=timeout, transport=transport
        )

    async def _run(self, call: c.Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, **request_args(call))
            except httpx.TransportError as exc:
                error: ApiError = connection_failed(call, exc)
                retryable = may_retry_transport(call, exc)
            else:
                try:
                    return answer(call, response)
                except ApiError as exc:
                    error, retryable = exc, may_retry_error(exc)
            if self._give_up(attempt=attempt, retryable=retryable):
                raise error
            await asyncio.sleep(self.retry.delay(attempt=attempt, error=error))
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def submit_feedback(
        self, user: str, records: Sequence[c.Record], *, idempotency_key: str | None = None
    ) -> s.FeedbackSubmitted:
        return await self._run(c.submit_feedback(user, records, idempotency_key=idempotency_key))

    async def list_feedback(
        self, user: str, *, after_id: int | None = None, limit: int = 100
    ) -> list[s.FeedbackRecordOut]:
        return await self._run(c.list_feedback(user, after_id=after_id, limit=limit))

    async def list_adapters(self, user: str) -> list[s.AdapterOut]:
        return await self._run(c.list_adapters(user))

    async def list_versions(self, user: str, adapter: str) -> list[s.VersionOut]:
        return await self._run(c.list_versions(user, adapter))

    async def get_version(
        self, user: str, adapter: str, number: int, *, qa_document: bool = False
    ) -> s.VersionDetail:
        return await self._run(c.get_version(user, adapter, number, qa_document=qa_document))

    async def lineage(
        self, user: str, adapter: str, number: int, *, depth: int | None = None
    ) -> s.LineageOut:
        return await self._run(c.lineage(user, adapter, number, depth=depth))

    async def alias_history(self, user: str, adapter: str) -> list[s.AliasEventOut]:
        return await self._run(c.alias_history(user, adapter))

    async def promote(
        self, user: str, adapter: str, version: int, *, reason: str = "", idempotency_key: str | None = None
    ) -> s.AliasEventOut:
        call = c.promote(user, adapter, version, reason=reason, idempotency_key=idempotency_key)
        return await self._run(call)

    async def rollback(
        self,
        user: str,
        adapter: str,
        to_version: int | None = None,
        *,
        reason: str = "",
        idempotency_key: str | None = None,
    ) -> s.AliasEventOut:
        call = c.rollback(user, adapter, to_version, reason=reason, idempotency_key=idempotency_key)
        return await self._run(call)

    async def train(
        self, user: str, *, training: c.Overrides | None = None, idempotency_key: str | None = None
    ) -> s.TrainSubmitted:
        return await self._run(c.train(user, training=training, idempotency_key=idempotency_key))

    async def get_job(self, job_id: int) -> s.JobOut:
        return await self._run(c.get_job(job_id))

    async def list_jobs(
        self, *, user: str | None = None, state: str | None = None, limit: int = 100
    ) -> list[s.JobOut]:
        return await self._run(c.list_jobs(user=user, state=state, limit=limit))

    async def cancel_job(self, job_id: int, *, idempotency_key: str | None = None) -> s.JobOut:
        return await self._run(c.cancel_job(job_id, idempotency_key=idempotency_key))

    async def wait_for_job(
        self, job_id: int, *, timeout: float = 600.0, poll: float = 1.0, on_progress: OnProgress | None = None
    ) -> s.JobOut:
        deadline = time.monotonic() + timeout
        seen: list[s.JobProgressOut] = []
        while True:
            job = await self.get_job(job_id)
            _report_progress(job, seen=seen, on_progress=on_progress)
            if job.finished:
                return job
            if time.monotonic() >= deadline:
                raise JobTimeout(f"job {job_id} still {job.state} after {timeout:g} s")
            await asyncio.sleep(min(poll, max(deadline - time.monotonic(), 0.0)))

    async def get_training_config(self) -> s.TrainingConfigOut:
        return await self._run(c.get_training_config())

    async def set_training_config(self, overrides: c.Overrides) -> s.TrainingConfigOut:
        return await self._run(c.set_training_config(overrides))

    async def enrol(self, user: str, task: str, *, idempotency_key: str | None = None) -> s.EnrolmentOut:
        return await self._run(c.enrol(user, task, idempotency_key=idempotency_key))

    async def unenrol(self, user: str, task: str) -> None:
        await self._run(c.unenrol(user, task))

    async def list_enrolments(self, user: str) -> list[s.EnrolmentOut]:
        return await self._run(c.list_enrolments(user))

    # --- shared task adapters ---------------------------------------------------------------------------------
    async def list_tasks(self) -> list[s.TaskOut]:
        """The tenant's shared task adapters, with live version and counts."""
        return await self._run(c.list_tasks())

    async def submit_task_feedback(
        self, task: str, records: Sequence[c.Record], *, idempotency_key: str | None = None
    ) -> s.FeedbackSubmitted:
        """Store records for a shared task (its adapter is created on first sight); trained like a user's."""
        return await self._run(c.submit_task_feedback(task, records, idempotency_key=idempotency_key))

    async def list_task_feedback(
        self, task: str, *, after_id: int | None = None, limit: int = 100
    ) -> list[s.FeedbackRecordOut]:
        return await self._run(c.list_task_feedback(task, after_id=after_id, limit=limit))

    async def import_task_adapter(
        self,
        task: str,
        source: str | Path | bytes,
        example_prompts: Sequence[str],
        *,
        reason: str = "",
        idempotency_key: str | None = None,
    ) -> s.TaskImportSubmitted:
        """Import a PEFT adapter (a folder, a .tar/.tar.gz/.zip file, or its bytes) as a candidate version of
        the task; returns the ``import`` job (``wait_for_job`` it). QA then decides as for a trained version."""
        archive = c.adapter_archive(source)
        call = c.import_task_adapter(
            task, archive, example_prompts, reason=reason, idempotency_key=idempotency_key
        )
        return await self._run(call)

    async def train_task(
        self, task: str, *, training: c.Overrides | None = None, idempotency_key: str | None = None
    ) -> s.TrainSubmitted:
        return await self._run(c.train_task(task, training=training, idempotency_key=idempotency_key))

    async def task_enrolments(self, task: str) -> s.TaskEnrolledOut:
        return await self._run(c.task_enrolments(task))

    async def list_task_versions(self, task: str) -> list[s.VersionOut]:
        return await self._run(c.list_task_versions(task))

    async def get_task_version(self, task: str, number: int, *, qa_document: bool = False) -> s.VersionDetail:
        return await self._run(c.get_task_version(task, number, qa_document=qa_document))

    async def task_lineage(self, task: str, number: int, *, depth: int | None = None) -> s.LineageOut:
        return await self._run(c.task_lineage(task, number, depth=depth))

    async def task_history(self, task: str) -> list[s.AliasEventOut]:
        return await self._run(c.task_history(task))

    async def promote_task(
        self, task: str, version: int, *, reason: str = "", idempotency_key: str | None = None
    ) -> s.AliasEventOut:
        return await self._run(c.promote_task(task, version, reason=reason, idempotency_key=idempotency_key))

    async def rollback_task(
        self,
        task: str,
        to_version: int | None = None,
        *,
        reason: str = "",
        idempotency_key: str | None = None,
    ) -> s.AliasEventOut:
        """Move the task's ``live`` back (to an earlier number, or none); enrolled users follow at once."""
        return await self._run(
            c.rollback_task(task, to_version, reason=reason, idempotency_key=idempotency_key)
        )

    async def generate(
        self,
        user: str,
        prompt: str,
        *,
        max_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        raw: bool = False,
    ) -> s.GenerateResponse:
        request = s.GenerateRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=list(stop),
            raw=raw,
        )
        return await self._run(c.generate(user, request))

    async def complete(
        self,
        user: str,
        prompt: str | list[str],
        *,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        model: str = "lorafleet",
    ) -> s.CompletionResponse:
        request = s.CompletionRequest(
            user=user,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            model=model,
        )
        return await self._run(c.complete(request))

    async def chat(
        self,
        user: str,
        messages: Sequence[c.Message],
        *,
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        model: str = "lorafleet",
    ) -> s.ChatCompletionResponse:
        request = s.ChatCompletionRequest(
            user=user,
            messages=c.chat_messages(messages),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            model=model,
        )
        return await self._run(c.chat(request))

    async def create_tenant(self, name: str) -> s.TenantCreated:
        return await self._run(c.create_tenant(name))

    async def create_api_key(self, tenant: str) -> s.ApiKeyCreated:
        return await self._run(c.create_api_key(tenant))

    async def list_tenants(self) -> list[s.TenantOut]:
        return await self._run(c.list_tenants())

    async def health(self) -> s.HealthOut:
        return await self._run(c.health())

    async def ready(self) -> s.ReadyOut:
        return await self._run(c.ready())
