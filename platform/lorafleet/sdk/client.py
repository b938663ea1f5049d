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
import functools
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar, overload

import httpx

from lorafleet.domain.closing import ClosesOnExit
from lorafleet.sdk import calls as c
from lorafleet.sdk import schemas as s
from lorafleet.sdk.errors import JobTimeout
from lorafleet.sdk.transport import DONE as _DONE
from lorafleet.sdk.transport import (
    ClientBase,
    FileSink,
    Retry,
    RetryPolicy,
    answer,
    connection_failed,
    request_args,
    sse_event,
)

T = TypeVar("T")
P = ParamSpec("P")
#: ``wait_for_job``'s ``on_progress``: called with each new progress report of the job
OnProgress = Callable[[s.JobProgressOut], None]

__all__ = ["AsyncClient", "Client", "RetryPolicy"]


class _JobWait:
    """What ``wait_for_job`` does with each poll of the job, for both clients (they differ only in how they get
    the job and sleep): report progress that differs from the last, end once the job finished, raise
    ``JobTimeout`` past the deadline, else say how long to sleep before the next poll."""

    def __init__(self, job_id: int, *, timeout: float, poll: float, on_progress: OnProgress | None) -> None:
        self.job_id, self.timeout, self.poll, self.on_progress = job_id, timeout, poll, on_progress
        self.deadline = time.monotonic() + timeout
        self.last: s.JobProgressOut | None = None

    def pause(self, job: s.JobOut) -> float | None:
        """None when ``job`` has finished; else the seconds to sleep before polling again."""
        if self.on_progress is not None and job.progress is not None and job.progress != self.last:
            self.last = job.progress
            self.on_progress(job.progress)
        if job.finished:
            return None
        if time.monotonic() >= self.deadline:
            raise JobTimeout(f"job {self.job_id} still {job.state} after {self.timeout:g} s")
        return min(self.poll, max(self.deadline - time.monotonic(), 0.0))


class _Method(Generic[P, T]):
    """A call builder of ``lorafleet.sdk.calls`` as a client method (its signature and docstring are the
    method's); subclasses say what it is on a ``Client`` and on an ``AsyncClient``."""

    def __init__(self, build: Callable[P, c.Call[T]]) -> None:
        self.build = build
        self.__doc__ = build.__doc__


class _Endpoint(_Method[P, T]):
    """A call as a client method: on a ``Client`` it runs the call and returns the answer, on an
    ``AsyncClient`` it is a coroutine function."""

    @overload
    def __get__(self, client: None, owner: type[Any]) -> _Endpoint[P, T]: ...

    @overload
    def __get__(self, client: Client, owner: type[Any]) -> Callable[P, T]: ...

    @overload
    def __get__(self, client: AsyncClient, owner: type[Any]) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(self, client: Client | AsyncClient | None, owner: type[Any]) -> Any:
        if client is None:
            return self
        build = self.build
        if isinstance(client, AsyncClient):
            run_async = client._run

            @functools.wraps(build)
            async def call_async(*args: P.args, **kwargs: P.kwargs) -> T:
                return await run_async(build(*args, **kwargs))

            return call_async
        run = client._run

        @functools.wraps(build)
        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            return run(build(*args, **kwargs))

        return call


class _StreamEndpoint(_Method[P, T]):
    """A streaming call as a client method: on a ``Client`` it returns an iterator of the parsed events, on an
    ``AsyncClient`` an async iterator. An error answer raises before the first event; an ``error`` event raises
    where it arrives. Leaving the loop early closes the connection, which stops the generation on the service."""

    def __get__(self, client: Client | AsyncClient | None, owner: type[Any]) -> Any:
        if client is None:
            return self
        build, stream = self.build, client._stream  # a generator on a Client, an async one on an AsyncClient

        @functools.wraps(build)
        def call(*args: P.args, **kwargs: P.kwargs) -> Iterator[T] | AsyncIterator[T]:
            return stream(build(*args, **kwargs))

        return call


class _Calls:
    """Every endpoint of the API as a method, one definition for both clients (``lorafleet.sdk.calls``)."""

    # --- feedback -------------------------------------------------------------------------------------------
    submit_feedback = _Endpoint(c.submit_feedback)
    list_feedback = _Endpoint(c.list_feedback)
    export_feedback = _Endpoint(c.export_feedback)

    # --- users and the audit log ----------------------------------------------------------------------------
    list_users = _Endpoint(c.list_users)
    list_audit = _Endpoint(c.list_audit)

    # --- adapters -------------------------------------------------------------------------------------------
    list_adapters = _Endpoint(c.list_adapters)
    list_versions = _Endpoint(c.list_versions)
    get_version = _Endpoint(c.get_version)
    lineage = _Endpoint(c.lineage)
    download_version = _Endpoint(c.download_version)
    import_adapter = _Endpoint(c.import_adapter)
    alias_history = _Endpoint(c.alias_history)
    promote = _Endpoint(c.promote)
    rollback = _Endpoint(c.rollback)

    # --- jobs -----------------------------------------------------------------------------------------------
    train = _Endpoint(c.train)
    get_job = _Endpoint(c.get_job)
    list_jobs = _Endpoint(c.list_jobs)
    cancel_job = _Endpoint(c.cancel_job)

    # --- training config ------------------------------------------------------------------------------------
    get_training_config = _Endpoint(c.get_training_config)
    set_training_config = _Endpoint(c.set_training_config)

    # --- enrolments -----------------------------------------------------------------------------------------
    enrol = _Endpoint(c.enrol)
    unenrol = _Endpoint(c.unenrol)
    list_enrolments = _Endpoint(c.list_enrolments)

    # --- shared task adapters -------------------------------------------------------------------------------
    list_tasks = _Endpoint(c.list_tasks)
    submit_task_feedback = _Endpoint(c.submit_task_feedback)
    list_task_feedback = _Endpoint(c.list_task_feedback)
    export_task_feedback = _Endpoint(c.export_task_feedback)
    download_task_version = _Endpoint(c.download_task_version)
    import_task_adapter = _Endpoint(c.import_task_adapter)
    train_task = _Endpoint(c.train_task)
    task_enrolments = _Endpoint(c.task_enrolments)
    list_task_versions = _Endpoint(c.list_task_versions)
    get_task_version = _Endpoint(c.get_task_version)
    task_lineage = _Endpoint(c.task_lineage)
    task_history = _Endpoint(c.task_history)
    promote_task = _Endpoint(c.promote_task)
    rollback_task = _Endpoint(c.rollback_task)

    # --- generation -----------------------------------------------------------------------------------------
    generate = _Endpoint(c.generate)
    complete = _Endpoint(c.complete)
    models = _Endpoint(c.models)
    chat = _Endpoint(c.chat)
    stream_complete = _StreamEndpoint(c.stream_complete)
    stream_chat = _StreamEndpoint(c.stream_chat)

    # --- admin and health -----------------------------------------------------------------------------------
    create_tenant = _Endpoint(c.create_tenant)
    create_api_key = _Endpoint(c.create_api_key)
    list_api_keys = _Endpoint(c.list_api_keys)
    revoke_api_key = _Endpoint(c.revoke_api_key)
    list_tenants = _Endpoint(c.list_tenants)
    verify_blobs = _Endpoint(c.verify_blobs)
    admin_audit = _Endpoint(c.admin_audit)
    health = _Endpoint(c.health)
    ready = _Endpoint(c.ready)

    # --- data deletion --------------------------------------------------------------------------------------
    forget_user = _Endpoint(c.forget_user)
    forget_records = _Endpoint(c.forget_records)
    forget_task_records = _Endpoint(c.forget_task_records)
    deletion_receipt = _Endpoint(c.deletion_receipt)
    list_deletions = _Endpoint(c.list_deletions)


class Client(ClientBase[httpx.BaseTransport], _Calls, ClosesOnExit):
    """A synchronous client; use it as a context manager or call ``close``."""

    def _open(self, **options: Any) -> None:
        self._http = httpx.Client(**options)

    def _run(self, call: c.Call[T]) -> T:
        if call.save_to is not None:
            return self._save(call)
        attempt = 0
        while True:
            sent: httpx.Response | httpx.TransportError
            try:
                sent = self._http.request(call.method, call.path, **request_args(call))
            except httpx.TransportError as exc:
                sent = exc
            outcome = self._settle(call, sent, attempt=attempt)
            if not isinstance(outcome, Retry):
                return outcome
            time.sleep(outcome.seconds)
            attempt += 1

    def _save(self, call: c.Call[T]) -> T:
        """A binary answer written to ``call.save_to`` (``FileSink``); one attempt, an error answer raises."""
        try:
            with self._http.stream(call.method, call.path, **request_args(call)) as response:
                if not response.is_success:
                    response.read()
                    answer(call, response)  # raises the typed error
                with FileSink(call) as sink:
                    for chunk in response.iter_bytes():
                        sink.write(chunk)
                return sink.finish(response.headers)  # type: ignore[no-any-return]
        except httpx.TransportError as exc:
            raise connection_failed(call, exc) from exc

    def _stream(self, call: c.Call[T]) -> Iterator[T]:
        with self._http.stream(call.method, call.path, **request_args(call)) as response:
            if not response.is_success:
                response.read()
                answer(call, response)  # raises the typed error
            for line in response.iter_lines():
                event = sse_event(call, line)
                if event is _DONE:
                    return
                if event is not None:
                    yield event  # type: ignore[misc]

    def close(self) -> None:
        self._http.close()

    def wait_for_job(
        self, job_id: int, *, timeout: float = 600.0, poll: float = 1.0, on_progress: OnProgress | None = None
    ) -> s.JobOut:
        """Poll until the job is succeeded, failed or cancelled (returned as it ended); ``JobTimeout`` after
        ``timeout`` seconds. ``on_progress`` is called with each progress report that differs from the last."""
        wait = _JobWait(job_id, timeout=timeout, poll=poll, on_progress=on_progress)
        while True:
            job = self.get_job(job_id)
            pause = wait.pause(job)
            if pause is None:
                return job
            time.sleep(pause)


class AsyncClient(ClientBase[httpx.AsyncBaseTransport], _Calls):
    """The same methods as ``Client``, as coroutines; use ``async with`` or ``await aclose()``."""

    def _open(self, **options: Any) -> None:
        self._http = httpx.AsyncClient(**options)

    async def _run(self, call: c.Call[T]) -> T:
        if call.save_to is not None:
            return await self._save(call)
        attempt = 0
        while True:
            sent: httpx.Response | httpx.TransportError
            try:
                sent = await self._http.request(call.method, call.path, **request_args(call))
            except httpx.TransportError as exc:
                sent = exc
            outcome = self._settle(call, sent, attempt=attempt)
            if not isinstance(outcome, Retry):
                return outcome
            await asyncio.sleep(outcome.seconds)
            attempt += 1

    async def _save(self, call: c.Call[T]) -> T:
        try:
            async with self._http.stream(call.method, call.path, **request_args(call)) as response:
                if not response.is_success:
                    await response.aread()
                    answer(call, response)  # raises the typed error
                with FileSink(call) as sink:
                    async for chunk in response.aiter_bytes():
                        sink.write(chunk)
                return sink.finish(response.headers)  # type: ignore[no-any-return]
        except httpx.TransportError as exc:
            raise connection_failed(call, exc) from exc

    async def _stream(self, call: c.Call[T]) -> AsyncIterator[T]:
        async with self._http.stream(call.method, call.path, **request_args(call)) as response:
            if not response.is_success:
                await response.aread()
                answer(call, response)  # raises the typed error
            async for line in response.aiter_lines():
                event = sse_event(call, line)
                if event is _DONE:
                    return
                if event is not None:
                    yield event  # type: ignore[misc]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def wait_for_job(
        self, job_id: int, *, timeout: float = 600.0, poll: float = 1.0, on_progress: OnProgress | None = None
    ) -> s.JobOut:
        wait = _JobWait(job_id, timeout=timeout, poll=poll, on_progress=on_progress)
        while True:
            job = await self.get_job(job_id)
            pause = wait.pause(job)
            if pause is None:
                return job
            await asyncio.sleep(pause)
