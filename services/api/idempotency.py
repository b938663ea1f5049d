"""Running a mutating route under an ``Idempotency-Key`` (the store is ``lorafleet.store.sql.idempotency``).

Without a key the operation simply runs. With one, the operation runs inside one database transaction that
also stores its response under the key (``IdempotencyRepository.run_once``): the write and its response commit
together or not at all, so a crash at any point leaves a retry either a response to replay or nothing done. A
retry with the same key and the same method, path and body gets that response again (with
``Idempotent-Replayed: true``) and nothing runs twice; the same key with another request is 422
(``idempotency_key_reused``); a retry while the first is still running is 409 (``idempotency_key_in_flight``,
which the SDK retries). A request that fails rolls back with its key, so its retry runs again.

The operation's store calls must go through ``services.db`` (every repository and workflow of ``ApiServices``
does): that is how they join the transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from lorafleet.domain import Tenant
from lorafleet.store.sql.idempotency import request_hash
from services.api.deps import CurrentTenant, IdempotencyKey, Services
from services.api.runtime import ApiServices

REPLAYED_HEADER = "Idempotent-Replayed"


def request_subject(request: Request) -> str | None:
    """The user (external id) a request's path is about (``/v1/users/{user_id}/...``), else None: stored with
    its idempotent response, so forgetting the user deletes the response too."""
    value = request.path_params.get("user_id")
    return value if isinstance(value, str) else None


def run_idempotent(
    *,
    services: ApiServices,
    tenant: Tenant,
    key: str | None,
    request: Request,
    body: BaseModel | None,
    status_code: int,
    operation: Callable[[], BaseModel],
) -> JSONResponse:
    """Run ``operation`` at most once per ``(tenant, key)``; its result is the JSON response."""
    if key is None:
        return JSONResponse(operation().model_dump(mode="json"), status_code=status_code)
    fingerprint = request_hash(
        method=request.method,
        path=request.url.path,
        body=None if body is None else body.model_dump(mode="json"),
    )
    outcome = services.idempotency.run_once(
        tenant_id=tenant.id,
        key=key,
        request_hash=fingerprint,
        status=status_code,
        operation=lambda: operation().model_dump(mode="json"),
        subject=request_subject(request),
    )
    headers = {REPLAYED_HEADER: "true"} if outcome.replayed else None
    return JSONResponse(outcome.response.body, status_code=outcome.response.status, headers=headers)


@dataclass(frozen=True)
class IdempotentCall:
    """What a mutating route needs to run under its ``Idempotency-Key``: the services, the tenant, the key (None:
    no key) and the request. Routes take it as the ``Idempotent`` dependency."""

    services: ApiServices
    tenant: Tenant
    key: str | None
    request: Request

    def run(
        self, operation: Callable[[], BaseModel], *, body: BaseModel | None, status_code: int = 200
    ) -> JSONResponse:
        """``run_idempotent`` for this request: ``operation`` at most once per key, its result the response."""
        return run_idempotent(
            services=self.services,
            tenant=self.tenant,
            key=self.key,
            request=self.request,
            body=body,
            status_code=status_code,
            operation=operation,
        )


def idempotent_call(
    services: Services, tenant: CurrentTenant, request: Request, idempotency_key: IdempotencyKey = None
) -> IdempotentCall:
    return IdempotentCall(services, tenant, idempotency_key, request)


Idempotent = Annotated[IdempotentCall, Depends(idempotent_call)]

__all__ = ["REPLAYED_HEADER", "Idempotent", "IdempotentCall", "run_idempotent"]
