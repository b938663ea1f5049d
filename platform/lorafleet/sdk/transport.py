"""The retry policy and the request/answer handling that ``Client`` and ``AsyncClient`` share."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx

from lorafleet import __version__
from lorafleet.config import ClientSettings
from lorafleet.sdk import calls as c
from lorafleet.sdk.errors import ApiError, ConnectionFailed, error_for

T = TypeVar("T")
#: the ``transport`` a client takes: ``httpx``'s sync or async one
TransportT = TypeVar("TransportT", httpx.BaseTransport, httpx.AsyncBaseTransport)
RETRY_STATUSES = frozenset({500, 502, 503, 504})
RETRY_CODES = frozenset({"idempotency_key_in_flight"})
#: the variable ``lorafleet.config.ClientSettings.api_key`` is read from
API_KEY_ENV = "LORAFLEET_API_KEY"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before re-sending a failed request."""

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 10.0

    def delay(self, *, attempt: int, error: ApiError) -> float:
        """Full jitter over ``backoff * 2**attempt`` (capped); a ``Retry-After`` wins when it is longer."""
        ceiling = min(self.backoff * 2**attempt, self.max_backoff)
        wait = random.uniform(ceiling / 2, ceiling)
        if error.retry_after is not None:
            wait = max(wait, min(error.retry_after, self.max_backoff))
        return wait


def headers_for(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else ClientSettings().api_key
    headers = {"User-Agent": f"lorafleet-sdk/{__version__}", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def answer(call: c.Call[T], response: httpx.Response) -> T:
    """The parsed body of a successful answer; an error answer raises its typed exception."""
    ok = response.is_success or response.status_code in call.ok_statuses
    body: Any = None
    if response.content:
        try:
            body = response.json()
        except ValueError:
            body = {"error": {"code": "bad_response", "message": response.text[:500]}}
    if not ok:
        raise error_for(status=response.status_code, body=body, retry_after=_retry_after(response))
    return call.parse(body)


#: what ``sse_event`` returns for the stream's last event, ``data: [DONE]``
DONE = object()


def sse_event(call: c.Call[T], line: str) -> T | object | None:
    """One line of a server-sent-events answer: the parsed event of a ``data:`` line, ``DONE`` at the end,
    None for anything else (blank lines, comments); an ``error`` event raises its typed exception."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:") :].strip()
    if data == "[DONE]":
        return DONE
    body = json.loads(data)
    if isinstance(body, dict) and "error" in body:
        raise error_for(status=500, body=body, retry_after=None)
    return call.parse(body)


def may_retry_error(error: ApiError) -> bool:
    return (error.status in RETRY_STATUSES) or (error.code in RETRY_CODES)


def may_retry_transport(call: c.Call[Any], exc: httpx.TransportError) -> bool:
    """A request that never left (no connection) may always be re-sent; others only if safe to repeat."""
    return call.retry_after_send or isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)


def connection_failed(call: c.Call[Any], exc: httpx.TransportError) -> ConnectionFailed:
    return ConnectionFailed(f"{call.method} {call.path}: {type(exc).__name__}: {exc}")


def request_args(call: c.Call[Any]) -> dict[str, Any]:
    args: dict[str, Any] = {"params": call.params, "headers": call.headers}
    if call.body is not None:
        args["json"] = call.body
    return args


#: headers of a version download: the stored blob's sha256, and the sha256 of the download itself
VERSION_SHA256_HEADER = "x-lorafleet-version-sha256"
ARCHIVE_SHA256_HEADER = "x-lorafleet-archive-sha256"


class FileSink:
    """Where a binary answer (``call.save_to``) is written: a partial file beside the destination, renamed into
    place by ``finish`` once complete and matching the sha256 the service sent; ``abort`` removes it."""

    def __init__(self, call: c.Call[T]) -> None:
        if call.save_to is None:
            raise ValueError("the call saves no file")
        self.call, self.dest = call, Path(call.save_to)
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.dest.with_name(f".{self.dest.name}.partial")
        self._file = self.partial.open("wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def __enter__(self) -> FileSink:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """A write that failed (or was interrupted) leaves no partial file."""
        if exc_type is not None:
            self.abort()

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._hash.update(chunk)
        self.size += len(chunk)

    def abort(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.partial.unlink()

    def finish(self, headers: Mapping[str, str]) -> Any:
        self._file.close()
        digest = self._hash.hexdigest()
        expected = headers.get(ARCHIVE_SHA256_HEADER)
        if expected is not None and expected != digest:
            self.abort()
            raise ApiError(
                f"{self.call.path}: the download's sha256 {digest} is not the {expected} the service sent",
                code="integrity_error",
            )
        os.replace(self.partial, self.dest)
        fields = {"path": str(self.dest), "size_bytes": self.size, "sha256": digest}
        return self.call.parse({**fields, "version_sha256": headers.get(VERSION_SHA256_HEADER)})


@dataclass(frozen=True)
class Retry:
    """A failed attempt that is retried after ``seconds``."""

    seconds: float


class ClientBase(Generic[TransportT]):
    """The constructor and the retry decisions shared by both clients; each opens its own ``httpx`` client."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        transport: TransportT | None = None,
    ) -> None:
        self.timeout = timeout
        self.retry = RetryPolicy(max_retries=max_retries, backoff=backoff)
        self._open(base_url=base_url, headers=headers_for(api_key), timeout=timeout, transport=transport)

    def _open(self, **options: Any) -> None:
        """Open the client's ``httpx`` client (``self._http``) with these options."""
        raise NotImplementedError

    def _settle(
        self, call: c.Call[T], sent: httpx.Response | httpx.TransportError, *, attempt: int
    ) -> T | Retry:
        """What attempt number ``attempt`` of ``call`` came to (``sent``: the response, or the transport error):
        the answer; or, for a failure that may be retried and has retries left, the ``Retry`` to wait for; else
        the failure is raised (the sync and the async client share this, and differ only in how they wait)."""
        if isinstance(sent, httpx.TransportError):
            error: ApiError = connection_failed(call, sent)
            retryable = may_retry_transport(call, sent)
        else:
            try:
                return answer(call, sent)
            except ApiError as exc:
                error, retryable = exc, may_retry_error(exc)
        if not retryable or attempt >= self.retry.max_retries:
            raise error
        return Retry(self.retry.delay(attempt=attempt, error=error))
