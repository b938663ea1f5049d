"""Running a mutating route under an ``Idempotency-Key`` (the store is ``lorafleet.store.sql.idempotency``).

Without a key the operation simply runs. With one: the first request reserves the key, runs, and stores its
response; a retry with the same key and the same method, path and body gets that response again (with
``Idempotent-Replayed: true``) and nothing runs twice; the same key with another request is 422
(``idempotency_key_reused``); a retry while the first is still running is 409 (``idempotency_key_in_flight``,
which the SDK retries). A request that fails releases the key, so its retry runs again.
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
    store = services.idempotency
    stored = store.reserve(tenant_id=tenant.id, key=key, request_hash=fingerprint)
    if stored is not None:
        return JSONResponse(stored.body, status_code=stored.status, headers={REPLAYED_HEADER: "true"})
    try:
        content = operation().model_dump(mode="json")
    except BaseException:
        store.release(tenant_id=tenant.id, key=key)
        raise
    store.complete(tenant_id=tenant.id, key=key, status=status_code, body=content)
    return JSONResponse(content, status_code=status_code)


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
