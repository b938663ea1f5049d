"""Typed exceptions of the SDK, mirroring the service's error codes and HTTP statuses.

Each class also derives from the matching ``lorafleet.errors`` class, so code that catches the library's
``NotFoundError`` or ``ValidationError`` catches the SDK's ``NotFound`` or ``ValidationFailed`` too, and has
that class's ``code`` unless it sets its own (the service answers with the library's codes). The
server's ``code``, ``message`` and ``field`` (e.g. ``records[2].prompt``) are kept on the exception.
"""

from __future__ import annotations

from typing import Any

from lorafleet import errors as lib

__all__ = [
    "AlreadyExists",
    "ApiError",
    "BadGateway",
    "Conflict",
    "ConnectionFailed",
    "Forbidden",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyReused",
    "InvalidState",
    "JobFinished",
    "JobTimeout",
    "NotFound",
    "PayloadTooLarge",
    "QAUndecided",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "ValidationFailed",
    "WeightsOutOfBounds",
    "error_for",
]


class ApiError(lib.LorafleetError):
    """An error answered by (or on the way to) the lorafleet service."""

    code = "api_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        field: str | None = None,
        body: Any = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code or type(self).code
        self.field = field
        self.body = body
        #: seconds the service asked the client to wait (``Retry-After``), if it did
        self.retry_after = retry_after

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that names a library error among its bases and sets no ``code`` takes that error's."""
        super().__init_subclass__(**kwargs)
        mirrored = [
            b for b in cls.__bases__ if issubclass(b, lib.LorafleetError) and not issubclass(b, ApiError)
        ]
        if mirrored and "code" not in vars(cls):
            cls.code = mirrored[0].code

    def __str__(self) -> str:
        where = f" [{self.field}]" if self.field else ""
        status = f"{self.status} " if self.status is not None else ""
        return f"{status}{self.code}{where}: {self.message}"


class Unauthorized(ApiError, lib.AuthError):
    """401: the API key is missing, unknown or revoked."""


class Forbidden(ApiError, lib.PermissionDeniedError):
    """403: the key is valid but may not do this (e.g. a tenant key on an admin route)."""


class NotFound(ApiError, lib.NotFoundError):
    """404: no such user, adapter, version or job for this tenant (another tenant's look the same)."""


class ValidationFailed(ApiError, lib.ValidationError):
    """422: the input was refused before anything was written; ``field`` says where."""


class IdempotencyKeyReused(ValidationFailed):
    """422: the idempotency key was already used for a different request."""

    code = "idempotency_key_reused"


class WeightsOutOfBounds(ValidationFailed, lib.WeightBoundsError):
    """422: an imported adapter's weights (or its ``lora_alpha``) are beyond the weight bounds; the message
    names the tensor or field. Nothing was stored."""


class PayloadTooLarge(ApiError, lib.PayloadTooLargeError):
    """413: the body, a batch or a record is over a size limit."""


class Conflict(ApiError, lib.ConflictError):
    """409: conflicts with the current state."""


class AlreadyExists(Conflict, lib.AlreadyExistsError):
    """409: the name is taken (a tenant) or the user is already enrolled."""


class InvalidState(Conflict, lib.InvalidStateError):
    """409: e.g. promoting the live version again, or rolling back with nothing live."""


class QAUndecided(InvalidState, lib.QAUndecidedError):
    """409: under the promote rule ``qa``, a promote of a version QA has not passed, without ``force``."""


class JobFinished(InvalidState, lib.JobFinishedError):
    """409: the job already succeeded or failed, so it cannot be cancelled; ``state`` says which."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        detail = self.body.get("error") if isinstance(self.body, dict) else None
        self.state = str(detail.get("state") or "") if isinstance(detail, dict) else ""


class IdempotencyKeyInFlight(Conflict):
    """409: a request with this idempotency key is still running (the SDK retries these)."""

    code = "idempotency_key_in_flight"


class ServerError(ApiError):
    """5xx: the service failed; the SDK retried (with the same idempotency key) before raising this."""

    code = "server_error"


class BadGateway(ServerError, lib.BlobStoreError):
    """502: the object store failed or returned corrupted bytes."""

    code = "bad_gateway"


class ServiceUnavailable(ServerError, lib.CapacityError):
    """503: no capacity now (queue full, engine not loadable); retry later."""

    code = "service_unavailable"


class ConnectionFailed(ApiError):
    """The service could not be reached (after the retries)."""

    code = "connection_failed"


class JobTimeout(ApiError, lib.JobError):
    """``wait_for_job`` ran out of time before the job finished."""

    code = "job_timeout"


_BY_CODE: dict[str, type[ApiError]] = {
    cls.code: cls
    for cls in (
        Unauthorized,
        Forbidden,
        NotFound,
        ValidationFailed,
        WeightsOutOfBounds,
        IdempotencyKeyReused,
        PayloadTooLarge,
        Conflict,
        AlreadyExists,
        InvalidState,
        QAUndecided,
        JobFinished,
        IdempotencyKeyInFlight,
    )
}
_BY_STATUS: dict[int, type[ApiError]] = {
    400: ValidationFailed,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
    502: BadGateway,
    503: ServiceUnavailable,
}


def error_for(*, status: int, body: Any, retry_after: float | None = None) -> ApiError:
    """The exception for an error response: by the server's ``code`` when known, else by status."""
    detail = body.get("error") if isinstance(body, dict) else None
    detail = detail if isinstance(detail, dict) else {}
    code = str(detail.get("code") or "")
    message = str(detail.get("message") or f"HTTP {status}")
    field = detail.get("field")
    cls = _BY_CODE.get(code) if status < 500 else None
    if cls is None:
        cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return cls(message, status=status, code=code or None, field=field, body=body, retry_after=retry_after)
