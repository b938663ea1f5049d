"""Running a mutating route under an ``Idempotency-Key`` (the store is ``lorafleet.store.sql.idempotency``).

Without a key the operation simply runs. With one: the first request reserves the key, runs, and stores its
response; a retry with the same key and the same method, path and body gets that response again (with
``Idempotent-Replayed: true``) and nothing runs twice; the same key with another request is 422
(``idempotency_key_reused``); a retry while the first is still running is 409 (``idempotency_key_in_flight``,
which the SDK retries). A request that fails releases the key, so its retry runs again.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from lorafleet.domain import Tenant
from lorafleet.store.sql.idempotency import request_hash
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


__all__ = ["REPLAYED_HEADER", "run_idempotent"]
