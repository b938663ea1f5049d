"""Dependencies of the routes, as ``Annotated`` types: the services, the tenant behind a bearer key, the
admin, a tenant's user and adapter by the names in the path, and the ``Idempotency-Key`` header.

Authentication: ``Authorization: Bearer <key>``. A tenant key (``lf_...``, stored hashed) makes the caller that
tenant; the admin key (``LORAFLEET_ADMIN_KEY``) is for tenant management and the operator routes (``/v1/admin``)
only. Library errors are raised (never ``HTTPException``); the one error handler turns them into 401, 403 and 404.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator

from lorafleet.domain import Adapter, Tenant, User
from lorafleet.domain.text import MAX_INT32, MAX_INT64, printable_name
from lorafleet.errors import AuthError, NotFoundError, PermissionDeniedError
from services.api.errors import ServerPaths, server_paths
from services.api.runtime import ApiServices

_bearer = HTTPBearer(
    auto_error=False, description="A tenant's API key, or the admin key for /v1/tenants and /v1/admin."
)


def get_services(request: Request) -> ApiServices:
    services: ApiServices = request.app.state.services
    return services


Services = Annotated[ApiServices, Depends(get_services)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _presented(credentials: HTTPAuthorizationCredentials | None) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    return credentials.credentials


def _is_admin(services: ApiServices, key: str) -> bool:
    admin = services.settings.admin_key
    return bool(admin) and hmac.compare_digest(key.encode(), admin.encode())


def current_tenant(services: Services, credentials: Credentials) -> Tenant:
    """The tenant whose active API key was presented; the admin key is not a tenant (401 here)."""
    return services.tenants.authenticate(api_key=_presented(credentials))


def actor_of(tenant: Tenant) -> str:
    """How a tenant key's actions are recorded (alias history, job cancels, enrolments, the audit log)."""
    return f"api:{tenant.name}"[:256]


def require_admin(services: Services, credentials: Credentials) -> None:
    """The admin key; a valid tenant key is 403 (it may not manage tenants), anything else 401."""
    key = _presented(credentials)
    if _is_admin(services, key):
        return
    services.tenants.authenticate(api_key=key)  # an invalid key raises AuthError (401)
    raise PermissionDeniedError("tenant management and operator routes need the admin key")


CurrentTenant = Annotated[Tenant, Depends(current_tenant)]
#: the server's folders, to hide in what a tenant reads (a job's error)
Paths = Annotated[ServerPaths, Depends(server_paths)]
Admin = Annotated[None, Depends(require_admin)]
#: names in paths and queries are printable (``lorafleet.domain.text``); numbers fit their database columns (a
#: version number an ``integer``, an id a ``bigint``): anything else is 422 naming the parameter, before any query
Printable = AfterValidator(printable_name)
UserId = Annotated[
    str,
    Path(min_length=1, max_length=256, description="The user's id in the tenant's system (printable)."),
    Printable,
]
AdapterName = Annotated[
    str, Path(min_length=1, max_length=128, description="The adapter's name (printable)."), Printable
]
TaskName = Annotated[
    str, Path(min_length=1, max_length=128, description="The task adapter's name (printable)."), Printable
]
TenantName = Annotated[str, Path(min_length=1, max_length=128, description="The tenant's name."), Printable]
VersionNumber = Annotated[int, Path(ge=1, le=MAX_INT32, description="The version number (1, 2, ...).")]
JobId = Annotated[int, Path(ge=1, le=MAX_INT64, description="The job's id.")]
KeyId = Annotated[int, Path(ge=1, le=MAX_INT32, description="The API key's id (from the list of keys).")]
AfterId = Annotated[
    int | None, Query(ge=0, le=MAX_INT64, description="Only records with a larger id (the last id seen).")
]
#: a page's size (``limit``) in listings, 100 unless given
PageLimit = Annotated[int, Query(ge=1, le=1000)]
#: how many rows of a listing to skip (``offset``), 0 unless given
PageOffset = Annotated[int, Query(ge=0, le=MAX_INT64)]
QADocument = Annotated[bool, Query(description="Include the latest QA report's full document.")]
LineageDepth = Annotated[int | None, Query(ge=0, le=1000, description="Edges to follow; all when absent.")]
UserFilter = Annotated[
    str | None, Query(min_length=1, max_length=256, description="Only jobs training this user."), Printable
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=255,
        description="Makes retries safe: the same key and body replay the first response.",
    ),
]


def tenant_user(services: Services, tenant: CurrentTenant, user_id: UserId) -> User:
    """The tenant's user named in the path (404 if the tenant has none by that id)."""
    return services.tenants.get_user(tenant_id=tenant.id, external_id=user_id)


CurrentUser = Annotated[User, Depends(tenant_user)]


def user_adapter(services: Services, user: CurrentUser, name: AdapterName) -> Adapter:
    """The user's own adapter named in the path (404 otherwise)."""
    adapter = services.registry.find_adapter(tenant_id=user.tenant_id, owner_user_id=user.id, name=name)
    if adapter is None:
        raise NotFoundError(f"adapter {name!r} not found")
    return adapter


UserAdapter = Annotated[Adapter, Depends(user_adapter)]

__all__ = [
    "actor_of",
    "Admin",
    "AdapterName",
    "AfterId",
    "JobId",
    "KeyId",
    "PageLimit",
    "PageOffset",
    "TaskName",
    "TenantName",
    "UserFilter",
    "Credentials",
    "CurrentTenant",
    "CurrentUser",
    "IdempotencyKey",
    "Paths",
    "Services",
    "UserAdapter",
    "UserId",
    "VersionNumber",
]
