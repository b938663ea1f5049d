"""Tenant management, with the admin key: create a tenant (its API key is shown once), more keys, list the
keys (prefix, created, last used, revoked) and revoke one, list tenants. Creating a tenant, creating a key and
revoking one are audited (actor ``api:admin``)."""

from __future__ import annotations

from fastapi import APIRouter

from lorafleet.sdk import schemas as s
from services.api import convert
from services.api.deps import Admin, KeyId, Services, TenantName
from services.api.routes.admin import ADMIN_ACTOR

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])


@router.post("", response_model=s.TenantCreated, status_code=201)
def create_tenant(services: Services, _admin: Admin, body: s.TenantCreate) -> s.TenantCreated:
    """A new tenant and its first API key (stored hashed: this response is the only time it is shown)."""
    tenant, api_key = services.tenants.create_tenant(name=body.name, actor=ADMIN_ACTOR)
    return s.TenantCreated(id=tenant.id, name=tenant.name, created_at=tenant.created_at, api_key=api_key)


@router.post("/{tenant_name}/keys", response_model=s.ApiKeyCreated, status_code=201)
def create_api_key(services: Services, _admin: Admin, tenant_name: TenantName) -> s.ApiKeyCreated:
    """Another API key for the tenant (e.g. to rotate keys); shown only in this response."""
    tenant = services.tenants.get_tenant(name=tenant_name)
    return s.ApiKeyCreated(
        tenant=tenant.name, api_key=services.tenants.create_api_key(tenant_id=tenant.id, actor=ADMIN_ACTOR)
    )


@router.get("/{tenant_name}/keys", response_model=list[s.ApiKeyOut])
def list_api_keys(services: Services, _admin: Admin, tenant_name: TenantName) -> list[s.ApiKeyOut]:
    """The tenant's API keys, by id: prefix, when made, last used and revoked (never the keys)."""
    tenant = services.tenants.get_tenant(name=tenant_name)
    return [convert.api_key(k) for k in services.tenants.list_api_keys(tenant_id=tenant.id)]


@router.post("/{tenant_name}/keys/{key_id}/revoke", response_model=s.ApiKeyOut)
def revoke_api_key(services: Services, _admin: Admin, tenant_name: TenantName, key_id: KeyId) -> s.ApiKeyOut:
    """Revoke one of the tenant's keys: it is refused (401) from now on. Idempotent (the first revocation time
    is kept); another tenant's key id is 404."""
    tenant = services.tenants.get_tenant(name=tenant_name)
    return convert.api_key(
        services.tenants.revoke_api_key_by_id(tenant_id=tenant.id, key_id=key_id, actor=ADMIN_ACTOR)
    )


@router.get("", response_model=list[s.TenantOut])
def list_tenants(services: Services, _admin: Admin) -> list[s.TenantOut]:
    """Every tenant, by id."""
    return [
        s.TenantOut(id=t.id, name=t.name, created_at=t.created_at) for t in services.tenants.list_tenants()
    ]
