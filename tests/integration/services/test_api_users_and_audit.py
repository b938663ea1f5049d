"""Through the HTTP API and the SDK (PostgreSQL, S3 over moto): ``GET /v1/users`` lists a tenant's users with
live versions, last feedback and counts after feedback, registration and a promote, never another tenant's;
the audit log records key changes and rollbacks, a tenant reads only its own events, the admin reads all."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from api_helpers import ApiServer, LiveVersions, TenantHandle, sft

from lorafleet.sdk import AsyncClient, Client, errors, schemas


def test_users_are_listed_with_live_versions_and_counts(
    api: ApiServer, tenant: TenantHandle, make_tenant: Callable[[], TenantHandle], live: LiveVersions
) -> None:
    other = make_tenant()
    client = tenant.client
    client.submit_feedback("ada", [sft("q1"), sft("q2")])
    client.submit_feedback("bo", [sft("q3")])
    other.client.submit_feedback("eve", [sft("q4")])
    live.personal("ada", 1)
    live.personal("ada", 2)

    users = client.list_users()
    assert [u.external_id for u in users] == ["ada", "bo"]  # by id, no user of the other tenant
    ada, bo = users
    assert (ada.feedback_count, ada.version_count, ada.live_versions) == (2, 2, {"personal": 2})
    assert (bo.feedback_count, bo.version_count, bo.live_versions) == (1, 0, {})
    assert ada.last_feedback_at is not None and bo.last_feedback_at is not None
    assert [u.external_id for u in other.client.list_users()] == ["eve"]

    # after a rollback and more feedback, the listing follows at once
    client.rollback("ada", "personal", to_version=1, reason="worse")
    client.submit_feedback("ada", [sft("q5")])
    (ada,) = client.list_users(limit=1)
    assert (ada.feedback_count, ada.live_versions) == (3, {"personal": 1})
    assert [u.external_id for u in client.list_users(offset=1)] == ["bo"]

    async def listed() -> list[schemas.UserOut]:
        async with AsyncClient(api.url, tenant.api_key) as async_client:
            return await async_client.list_users(limit=5)

    assert [u.external_id for u in asyncio.run(listed())] == ["ada", "bo"]


@pytest.mark.parametrize(("params", "field"), [({"limit": 0}, "limit"), ({"offset": -1}, "offset")])
def test_a_bad_page_is_422_naming_it(tenant: TenantHandle, params: dict[str, int], field: str) -> None:
    client = tenant.client
    with pytest.raises(errors.ValidationFailed) as caught:
        client.list_users(**params)
    assert caught.value.status == 422 and caught.value.field == field, caught.value
    with pytest.raises(errors.ValidationFailed) as caught:
        client.list_audit(**params)
    assert caught.value.field == field


def test_the_audit_log_is_per_tenant_and_the_admin_reads_it_all(
    tenant: TenantHandle, make_tenant: Callable[[], TenantHandle], admin: Client, live: LiveVersions
) -> None:
    other = make_tenant()
    new_key = admin.create_api_key(tenant.name).api_key
    key_id = admin.list_api_keys(tenant.name)[-1].id
    admin.revoke_api_key(tenant.name, key_id)
    live.personal("ada", 1)
    live.personal("ada", 2)
    tenant.client.rollback("ada", "personal", to_version=1, reason="ada's private complaint")

    events = tenant.client.list_audit()
    assert [(e.action, e.actor, e.target, e.tenant) for e in events] == [
        ("tenant.created", "api:admin", f"tenant:{tenant.name}", tenant.name),
        ("key.created", "api:admin", f"key:{key_id}", tenant.name),
        ("key.revoked", "api:admin", f"key:{key_id}", tenant.name),
        ("rollback", f"api:{tenant.name}", "user:ada/personal@1", tenant.name),
    ]
    assert new_key not in str([e.details for e in events])
    assert "complaint" not in str([e.details for e in events])
    assert [e.action for e in tenant.client.list_audit(action="rollback")] == ["rollback"]

    # the other tenant sees only its own creation; the admin sees both tenants', filtered by name
    assert [e.target for e in other.client.list_audit()] == [f"tenant:{other.name}"]
    assert [e.id for e in admin.admin_audit(tenant=tenant.name)] == [e.id for e in events]
    everyone = admin.admin_audit(action="tenant.created", limit=1000)
    assert {tenant.name, other.name} <= {e.tenant for e in everyone}

    with pytest.raises(errors.ValidationFailed) as caught:
        tenant.client.list_audit(action="delete.everything")
    assert caught.value.field == "action"
    with pytest.raises(errors.NotFound):
        admin.admin_audit(tenant="no-such-tenant")
    with pytest.raises(errors.Forbidden):
        tenant.client.admin_audit()
