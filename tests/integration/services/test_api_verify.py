"""``POST /v1/admin/verify`` over the real server (PostgreSQL, S3 over HTTP): the admin key only, every tenant's
versions or one tenant's, typed 4xx for bad input, and a repair that shows in the tenant's version list and
history. Each test uses adapter seeds of its own: blobs are content-addressed, so a flipped byte in a blob
another test registered too would break that test's versions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from api_helpers import ADMIN_KEY, ApiServer, Library, TenantHandle, live_personal_version
from services.api.runtime import ApiOptions, ApiServices, BackgroundRuntime
from tests.blob_corruption import flip_byte
from tests.polling import wait_for
from tests.unit.registry.registry_helpers import write_adapter_dir

from lorafleet.config import load_settings
from lorafleet.sdk import AsyncClient, Client, Forbidden, NotFound, schemas


def _by_tenant(report: schemas.VerifyReportOut, *names: str) -> list[tuple[str, int, str, str]]:
    return [(v.tenant, v.number, v.result, v.status) for v in report.versions if v.tenant in names]


def test_admin_verify_reports_every_tenant_or_one_and_repairs(
    api: ApiServer,
    admin: Client,
    make_tenant: Callable[[], TenantHandle],
    library: Library,
    adapter_folder: Callable[[int], Path],
    moto_endpoint: str,
) -> None:
    a, b = make_tenant(), make_tenant()
    for seed in (1801, 1802):
        live_personal_version(library, tenant_id=a.id, user="alice", folder=adapter_folder(seed))
    live_personal_version(library, tenant_id=b.id, user="bob", folder=adapter_folder(1803))
    v2 = a.client.get_version("alice", "personal", 2)
    flip_byte(library.blobs, v2.sha256, s3_endpoint=moto_endpoint)

    everyone = admin.verify_blobs()  # the admin sees every tenant
    assert _by_tenant(everyone, a.name, b.name) == [
        (a.name, 1, "ok", "archived"),
        (a.name, 2, "corrupt", "live"),
        (b.name, 1, "ok", "live"),
    ]
    only_a = admin.verify_blobs(tenant=a.name)  # one tenant's versions only
    assert {v.tenant for v in only_a.versions} == {a.name} and only_a.counts.checked == 2
    assert only_a.counts.corrupt == 1 and only_a.counts.ok == 1 and only_a.counts.repaired == 0
    bad = admin.verify_blobs(tenant=a.name, only_bad=True)
    assert [(v.number, v.result, v.owner, v.adapter) for v in bad.versions] == [
        (2, "corrupt", "alice", "personal")
    ]
    assert [v.status for v in a.client.list_versions("alice", "personal")] == [
        "archived",
        "live",
    ]  # untouched

    # a tenant's key may not (403, even for its own name); no key or a wrong one is 401; unknown names are 404
    with pytest.raises(Forbidden):
        a.client.verify_blobs(tenant=a.name)
    with httpx.Client(base_url=api.url) as http:
        assert http.post("/v1/admin/verify", json={}).status_code == 401
    with pytest.raises(NotFound):
        admin.verify_blobs(tenant="no-such-tenant")
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as http:
        for body, field in (
            ({"repair": "yes"}, "repair"),  # a flag that moves aliases is a JSON boolean, nothing else
            ({"repair": 1}, "repair"),
            ({"only_bad": "true"}, "only_bad"),
            ({"tenant": "a\x00b"}, "tenant"),
            ({"tenant": ""}, "tenant"),
            ({"tenant": 5}, "tenant"),
            ({"repiar": True}, "repiar"),
        ):
            answer = http.post("/v1/admin/verify", json=body)
            assert answer.status_code == 422 and answer.json()["error"]["field"] == field, answer.text

    repaired = admin.verify_blobs(tenant=a.name, repair=True)
    (fixed,) = [v for v in repaired.versions if v.result != "ok"]
    assert (fixed.number, fixed.result, fixed.status, fixed.repaired, fixed.was_live, fixed.live_after) == (
        2,
        "corrupt",
        "corrupt",
        True,
        True,
        1,
    )
    assert [v.status for v in a.client.list_versions("alice", "personal")] == ["live", "corrupt"]
    last = a.client.alias_history("alice", "personal")[-1]
    assert (last.from_version, last.to_version, last.actor, last.reason) == (
        2,
        1,
        "api:admin",
        "blob-corrupt",
    )
    assert [v.status for v in b.client.list_versions("bob", "personal")] == ["live"]

    again = admin.verify_blobs(tenant=a.name, repair=True)  # nothing new
    assert again.counts.quarantined == 1 and again.counts.ok == 1 and again.counts.repaired == 0
    assert len(a.client.alias_history("alice", "personal")) == 3


def test_the_async_client_verifies_too(api: ApiServer, make_tenant: Callable[[], TenantHandle]) -> None:
    tenant = make_tenant()  # no versions: an empty report

    async def run() -> schemas.VerifyReportOut:
        async with AsyncClient(api.url, ADMIN_KEY, max_retries=0) as client:
            return await client.verify_blobs(tenant=tenant.name)

    report = asyncio.run(run())
    assert report.counts.checked == 0 and report.versions == []


def test_the_api_process_scheduler_loop_runs_the_scrub(tmp_path: Path) -> None:
    """``lorafleet serve``'s in-process scheduler (``BackgroundRuntime``) scrubs after its ticks, as the settings ask:
    here on SQLite and a local blob directory, with repair on."""
    settings = load_settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'lorafleet.db'}",
        object_store_url=(tmp_path / "blobs").as_uri(),
        scrub_versions_per_tick=4,
        scrub_repair=True,
    )
    services = ApiServices.build(
        settings, ApiOptions(run_scheduler=True, scheduler_interval=0.05, migrate=True)
    )
    try:
        tenant, _ = services.tenants.create_tenant(name="acme")
        user = services.tenants.get_or_create_user(tenant_id=tenant.id, external_id="alice")
        adapter = services.registry.create_adapter(
            tenant_id=tenant.id, owner_user_id=user.id, name="personal", target_config={}
        )
        for seed in (1, 2):
            version = services.registry.register_version(
                tenant_id=tenant.id,
                adapter_id=adapter.id,
                adapter_dir=write_adapter_dir(tmp_path / f"adapter-{seed}", seed=seed),
                base_fingerprint="fp",
            )
            services.registry.promote(
                tenant_id=tenant.id, adapter_id=adapter.id, number=version.number, actor="t"
            )
        flip_byte(services.registry.blobs, version.sha256)

        runtime = BackgroundRuntime(services)
        runtime.start()
        try:
            wait_for(
                "the scrub to quarantine v2",
                lambda: (
                    [
                        v.status
                        for v in services.registry.list_versions(tenant_id=tenant.id, adapter_id=adapter.id)
                    ]
                    == ["live", "corrupt"]
                ),
            )
        finally:
            runtime.stop()
        last = services.registry.alias_history(tenant_id=tenant.id, adapter_id=adapter.id)[-1]
        assert (last.actor, last.reason) == ("scrub", "blob-corrupt")
    finally:
        services.close()
