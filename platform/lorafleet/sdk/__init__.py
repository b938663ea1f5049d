"""The lorafleet SDK: a typed HTTP client of the lorafleet API (httpx + pydantic; never imports torch).

::

    from lorafleet import Client

    with Client("http://127.0.0.1:8000", api_key="lf_...") as client:
        client.submit_feedback("alice", [{"kind": "sft", "prompt": "Hi", "completion": "Hello!"}])
        job = client.wait_for_job(client.train("alice").job.id)
        print(client.generate("alice", "Hi").text)

``Client`` / ``AsyncClient`` (``client``), the request and response models (``schemas``, shared with the
service) and typed exceptions mirroring the service's error codes (``errors``).
"""

from __future__ import annotations

from lorafleet.sdk import errors, schemas
from lorafleet.sdk.client import AsyncClient, Client, RetryPolicy
from lorafleet.sdk.errors import (
    AlreadyExists,
    ApiError,
    Conflict,
    ConnectionFailed,
    Forbidden,
    InvalidState,
    JobFinished,
    JobTimeout,
    NotFound,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    ValidationFailed,
)

__all__ = [
    "AlreadyExists",
    "ApiError",
    "AsyncClient",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "InvalidState",
    "JobFinished",
    "JobTimeout",
    "NotFound",
    "PayloadTooLarge",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "ValidationFailed",
    "errors",
    "schemas",
]
