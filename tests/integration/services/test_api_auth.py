"""Authentication and tenant isolation over every route of the published OpenAPI schema.

Every operation must be listed in ``ROUTES`` with what another tenant gets when it names tenant A's user,
adapter, version, job, task or tenant: 404 (exactly as for ids that do not exist), 403 on admin routes, or
``"own"`` for the routes that act in the caller's own namespace (feedback, task feedback and import, listing
tasks, generation: tenant B's "alice" or "summarise" is another user or task than tenant A's, and nothing of
A's is read or changed). A route missing from the table fails the
test, so a new route cannot skip the check.
"""

from __future__ import annotations

import base64
import gzip
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import (
    ADMIN_KEY,
    ApiServer,
    Library,
    TenantHandle,
    live_personal_version,
    live_task_version,
    sft,
)
from fastapi.routing import APIRoute
from services.console.routes import router as console_router

from lorafleet.sdk import Client
from lorafleet.sdk.calls import adapter_archive

PUBLIC = "public"
OWN = "own"
#: a placeholder archive for the import route (gzip magic); the test sends a real adapter archive instead, since
#: the route checks the files before it queues B's import job (in B's namespace, nothing of A's)
GZIP_B64 = base64.b64encode(gzip.compress(b"not really a tar")).decode("ascii")
IMPORT_ROUTES = {("POST", "/v1/tasks/{task}/import"), ("POST", "/v1/users/{user_id}/adapters/{name}/import")}

#: (method, path) -> (what tenant B gets on tenant A's ids, the JSON body to send)
ROUTES: dict[tuple[str, str], tuple[int | str, Any]] = {
    ("GET", "/healthz"): (PUBLIC, None),
    ("GET", "/readyz"): (PUBLIC, None),
    ("GET", "/metrics"): (PUBLIC, None),
    ("GET", "/v1/tenants"): (403, None),
    ("POST", "/v1/tenants"): (403, {"name": "intruder"}),
    ("POST", "/v1/tenants/{tenant_name}/keys"): (403, None),
    ("GET", "/v1/tenants/{tenant_name}/keys"): (403, None),
    ("POST", "/v1/tenants/{tenant_name}/keys/{key_id}/revoke"): (403, None),
    ("POST", "/v1/admin/verify"): (403, {"repair": False}),
    ("GET", "/v1/admin/audit"): (403, None),
    ("GET", "/v1/users"): (OWN, None),  # B's own users only (checked in test_api_users_and_audit)
    ("GET", "/v1/audit"): (OWN, None),  # B's own events only (checked in test_api_users_and_audit)
    ("DELETE", "/v1/users/{user_id}"): (404, None),
    ("GET", "/v1/users/{user_id}/feedback"): (404, None),
    ("GET", "/v1/users/{user_id}/feedback/export"): (404, None),
    # A's receipt and A's alice's records: 404 for B; B's own receipts only in the listing
    ("DELETE", "/v1/users/{user_id}/feedback"): (404, {"ids": [1]}),
    ("DELETE", "/v1/tasks/{task}/feedback"): (404, {"ids": [1]}),
    ("GET", "/v1/deletions/{receipt_id}"): (404, None),
    ("GET", "/v1/deletions"): (OWN, None),
    ("POST", "/v1/users/{user_id}/feedback"): (OWN, {"records": [sft("from tenant B")]}),
    ("GET", "/v1/users/{user_id}/adapters"): (404, None),
    ("GET", "/v1/users/{user_id}/adapters/{name}/versions"): (404, None),
    ("GET", "/v1/users/{user_id}/adapters/{name}/versions/{n}"): (404, None),
    ("GET", "/v1/users/{user_id}/adapters/{name}/versions/{n}/lineage"): (404, None),
    ("GET", "/v1/users/{user_id}/adapters/{name}/versions/{n}/download"): (404, None),
    # B's own alice gets B's own import job (in B's namespace, nothing of A's)
    ("POST", "/v1/users/{user_id}/adapters/{name}/import"): (
        OWN,
        {"archive_base64": GZIP_B64, "example_prompts": ["Hi"]},
    ),
    ("GET", "/v1/users/{user_id}/adapters/{name}/history"): (404, None),
    ("POST", "/v1/users/{user_id}/adapters/{name}/promote"): (404, {"version": 1}),
    ("POST", "/v1/users/{user_id}/adapters/{name}/rollback"): (404, {"to_version": None}),
    ("POST", "/v1/users/{user_id}/train"): (404, None),
    ("GET", "/v1/jobs/{job_id}"): (404, None),
    ("GET", "/v1/jobs"): (404, None),  # with ?user=alice
    ("POST", "/v1/jobs/{job_id}/cancel"): (404, None),
    ("GET", "/v1/users/{user_id}/enrolments"): (404, None),
    ("POST", "/v1/users/{user_id}/enrolments"): (404, {"task": "summarise"}),
    ("DELETE", "/v1/users/{user_id}/enrolments/{task}"): (404, None),
    ("GET", "/v1/tasks"): (OWN, None),
    ("GET", "/v1/models"): (OWN, None),  # the caller's own models only (checked below)
    ("POST", "/v1/tasks/{task}/feedback"): (OWN, {"records": [sft("task data from tenant B")]}),
    ("GET", "/v1/tasks/{task}/feedback"): (404, None),
    ("GET", "/v1/tasks/{task}/feedback/export"): (404, None),
    ("POST", "/v1/tasks/{task}/import"): (OWN, {"archive_base64": GZIP_B64, "example_prompts": ["Hi"]}),
    ("POST", "/v1/tasks/{task}/train"): (404, None),
    ("GET", "/v1/tasks/{task}/enrolments"): (404, None),
    ("GET", "/v1/tasks/{task}/versions"): (404, None),
    ("GET", "/v1/tasks/{task}/versions/{n}"): (404, None),
    ("GET", "/v1/tasks/{task}/versions/{n}/lineage"): (404, None),
    ("GET", "/v1/tasks/{task}/versions/{n}/download"): (404, None),
    ("GET", "/v1/tasks/{task}/history"): (404, None),
    ("POST", "/v1/tasks/{task}/promote"): (404, {"version": 1}),
    ("POST", "/v1/tasks/{task}/rollback"): (404, {"to_version": None}),
    ("GET", "/v1/training-config"): (OWN, None),
    ("PUT", "/v1/training-config"): (OWN, {"max_steps": 3}),  # B's own settings; A's stay as they were
    ("POST", "/v1/users/{user_id}/generate"): (OWN, {"prompt": "Hi", "max_tokens": 2}),
    ("POST", "/v1/completions"): (OWN, {"prompt": "Hi", "max_tokens": 2, "user": "alice", "temperature": 0}),
    ("POST", "/v1/chat/completions"): (
        OWN,
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "user": "alice", "temperature": 0},
    ),
}


#: the web console's routes (HTML under ``/console``, a cookie session instead of a bearer key, outside the OpenAPI
#: schema): (method, path) -> (what tenant B, signed in, gets on tenant A's ids; the form to post). Without a
#: session every page redirects to sign-in (303) and every POST is 403 (no CSRF token). Every console route must
#: be here (``test_every_console_route_is_classified``).
CONSOLE_ROUTES: dict[tuple[str, str], tuple[int | str, dict[str, str] | None]] = {
    ("GET", "/console/"): (PUBLIC, None),
    ("GET", "/console/sign-in"): (PUBLIC, None),
    ("POST", "/console/sign-in"): (PUBLIC, None),  # its own token (a cookie of the sign-in page)
    ("POST", "/console/sign-out"): (OWN, None),
    ("GET", "/console/tenants"): (403, None),
    ("GET", "/console/overview"): (OWN, None),
    ("POST", "/console/jobs/{job_id}/cancel"): (404, {}),
    ("GET", "/console/users/{user_id}"): (404, None),
    ("POST", "/console/users/{user_id}/adapters/{name}/rollback"): (404, {"reason": "intruder"}),
    ("POST", "/console/users/{user_id}/adapters/{name}/promote"): (
        404,
        {"version": "1", "reason": "intruder"},
    ),
    ("GET", "/console/users/{user_id}/adapters/{name}/versions/{n}/qa"): (404, None),
    ("POST", "/console/users/{user_id}/feedback/forget"): (404, {"ids": "1"}),
    ("POST", "/console/users/{user_id}/forget"): (404, {"confirm": "alice"}),
    ("GET", "/console/deletions/{receipt_id}"): (404, None),
    ("GET", "/console/tasks/{task}"): (404, None),
    ("POST", "/console/tasks/{task}/promote"): (404, {"version": "1", "reason": "intruder"}),
    ("POST", "/console/tasks/{task}/rollback"): (404, {"reason": "intruder"}),
    ("GET", "/console/tasks/{task}/versions/{n}/qa"): (404, None),
    ("POST", "/console/tasks/{task}/feedback/forget"): (404, {"ids": "1"}),
    ("GET", "/console/playground"): (OWN, None),
    ("POST", "/console/playground"): (OWN, {"user": "alice", "prompt": "Hi", "max_tokens": "2"}),
}


@dataclass
class TenantA:
    tenant: TenantHandle
    job_id: int
    feedback_ids: list[int]
    receipt_id: str

    def url(self, path: str) -> str:
        values = {
            "user_id": "alice",
            "name": "personal",
            "n": "1",
            "job_id": str(self.job_id),
            "task": "summarise",
            "tenant_name": self.tenant.name,
            "key_id": "1",
            "receipt_id": self.receipt_id,
        }
        url = path.format(**values)
        return url + "?user=alice" if path == "/v1/jobs" else url


@pytest.fixture
def tenant_a(
    make_tenant: Callable[[], TenantHandle], library: Library, adapter_folder: Callable[[int], Path]
) -> TenantA:
    """Tenant A with everything a route can name: a user with feedback, a live adapter version, a queued job,
    a task adapter with feedback and a live version that the user is enrolled in, a deletion receipt."""
    handle = make_tenant()
    client = handle.client
    feedback = client.submit_feedback("alice", [sft("a1"), sft("a2"), sft("forgotten")]).ids
    receipt = client.forget_records("alice", [feedback.pop()])  # a receipt of A's (nothing was trained on it)
    live_personal_version(library, tenant_id=handle.id, user="alice", folder=adapter_folder(1))
    client.submit_task_feedback("summarise", [sft("t1")])
    live_task_version(library, tenant_id=handle.id, task="summarise", folder=adapter_folder(2))
    client.enrol("alice", "summarise")
    job = client.train("alice").job
    return TenantA(handle, job.id, feedback, receipt.id)


def _operations(api: ApiServer) -> list[tuple[str, str]]:
    spec = httpx.get(f"{api.url}/openapi.json").json()
    return [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]


def _call(http: httpx.Client, method: str, url: str, *, key: str | None, body: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return http.request(method, url, headers=headers, json=body)


def _adapters_used(body: dict[str, Any]) -> list[str]:
    """Adapters named in a generation answer (any of the three shapes); none for any other answer."""
    if not isinstance(body, dict):
        return []
    extension = body.get("lorafleet", body)
    infos = extension if isinstance(extension, list) else [extension]
    return [served["adapter"] for info in infos for served in info.get("served_by", [])]


def test_every_route_is_classified(api: ApiServer) -> None:
    assert sorted(_operations(api)) == sorted(ROUTES)


def test_another_tenant_gets_404_on_every_route_naming_tenant_as_ids(
    api: ApiServer,
    tenant_a: TenantA,
    make_tenant: Callable[[], TenantHandle],
    adapter_folder: Callable[[int], Path],
) -> None:
    b = make_tenant()
    archive = base64.b64encode(adapter_archive(adapter_folder(3))).decode("ascii")
    operations = _operations(api)
    scoped = [op for op in operations if ROUTES[op][0] not in (PUBLIC, OWN)]
    own = [op for op in operations if ROUTES[op][0] == OWN]  # last: they create B's own "alice"
    with httpx.Client(base_url=api.url, timeout=120) as http:
        for method, path in scoped:
            expected, body = ROUTES[(method, path)]
            answer = _call(http, method, tenant_a.url(path), key=b.api_key, body=body)
            assert answer.status_code == expected, (method, path, answer.text)
            code = "not_found" if expected == 404 else "forbidden"
            assert answer.json()["error"]["code"] == code, (method, path)
            if method == "GET" and expected == 404:  # the same URL is real for tenant A
                mine = _call(http, method, tenant_a.url(path), key=tenant_a.tenant.api_key, body=None)
                assert mine.status_code == 200, (method, path, mine.text)
        for method, path in own:
            body = ROUTES[(method, path)][1]
            if (method, path) in IMPORT_ROUTES:
                body = {**body, "archive_base64": archive}
            answer = _call(http, method, tenant_a.url(path), key=b.api_key, body=body)
            assert answer.status_code in (200, 202), (method, path, answer.text)
            assert _adapters_used(answer.json()) == [], (method, path)  # never served by A's adapters
    a = tenant_a.tenant.client
    assert [r.id for r in a.list_feedback("alice")] == tenant_a.feedback_ids
    assert [v.status for v in a.list_versions("alice", "personal")] == ["live"]
    assert [e.task for e in a.list_enrolments("alice")] == ["summarise"]
    assert [(t.name, t.live_version, t.feedback_records) for t in a.list_tasks()] == [("summarise", 1, 1)]
    assert [t.name for t in b.client.list_tasks()] == ["summarise"]  # B's own, created by B's own feedback
    assert [m.id for m in a.models().data] == ["lorafleet", "base", "task:summarise"]  # A's live task
    assert [m.id for m in b.client.models().data] == ["lorafleet", "base"]  # B's task has no live version
    assert a.get_job(tenant_a.job_id).state == "queued"
    assert a.get_training_config().overrides == {} != b.client.get_training_config().overrides
    assert len(b.client.list_feedback("alice")) == 1  # B's own alice
    assert a.generate("alice", "Hi", max_tokens=2).versions == {"personal": 1}


def test_missing_or_unknown_keys_are_401_on_every_non_public_route(api: ApiServer, tenant_a: TenantA) -> None:
    with httpx.Client(base_url=api.url, timeout=60) as http:
        for (method, path), (expected, body) in ROUTES.items():
            if expected == PUBLIC:
                continue
            for key in (None, "lf_not-a-real-key", "garbage"):
                answer = _call(http, method, tenant_a.url(path), key=key, body=body)
                assert answer.status_code == 401, (method, path, key, answer.text)
                assert answer.headers["www-authenticate"] == "Bearer"


def _console_operations() -> list[tuple[str, str]]:
    """Every route of the console (its router, which the sub-application mounted at ``/console`` serves)."""
    return [
        (method, f"/console{route.path}")
        for route in console_router.routes
        if isinstance(route, APIRoute)
        for method in sorted(route.methods)
    ]


def _console_session(api: ApiServer, key: str) -> tuple[httpx.Client, str]:
    """A client signed in to the console with ``key``, and its session's CSRF token."""
    http = httpx.Client(base_url=api.url, timeout=120, follow_redirects=True)
    form = http.get("/console/sign-in").text
    token = form.split('name="csrf_token" value="')[1].split('"')[0]
    signed = http.post("/console/sign-in", data={"api_key": key, "csrf_token": token})
    assert signed.status_code == 200, signed.text
    csrf = signed.text.split('name="csrf_token" value="')[1].split('"')[0]
    return http, csrf


def test_every_console_route_is_classified() -> None:
    assert sorted(_console_operations()) == sorted(CONSOLE_ROUTES)


def test_console_pages_need_a_session_and_keep_another_tenant_out(
    api: ApiServer, tenant_a: TenantA, make_tenant: Callable[[], TenantHandle]
) -> None:
    b = make_tenant()
    scoped = [op for op in _console_operations() if CONSOLE_ROUTES[op][0] not in (PUBLIC, OWN)]
    with httpx.Client(base_url=api.url, timeout=60) as anonymous:
        for method, path in scoped + [op for op in CONSOLE_ROUTES if CONSOLE_ROUTES[op][0] == OWN]:
            answer = anonymous.request(method, tenant_a.url(path), data=CONSOLE_ROUTES[(method, path)][1])
            if method == "GET":
                assert (answer.status_code, answer.headers["location"]) == (303, "/console/sign-in"), path
            else:
                assert answer.status_code == 403, (method, path)
    http, csrf = _console_session(api, b.api_key)
    mine, _ = _console_session(api, tenant_a.tenant.api_key)
    with closing(http), closing(mine):
        for method, path in scoped:
            expected, form = CONSOLE_ROUTES[(method, path)]
            data = None if form is None else {**form, "csrf_token": csrf}
            answer = http.request(method, tenant_a.url(path), data=data)
            assert answer.status_code == expected, (method, path, answer.text[:300])
            if method == "GET" and expected == 404 and not path.endswith("/qa"):  # A has no QA report here
                assert mine.get(tenant_a.url(path)).status_code == 200, path
        playground = {"user": "alice", "prompt": "Hi", "max_tokens": "2", "csrf_token": csrf}
        own = http.post("/console/playground", data=playground)
        assert own.status_code == 200 and "No adapter served this answer" in own.text  # B's own alice: none
        assert 'data-answer="personal"' in own.text
    a = tenant_a.tenant.client
    assert [v.status for v in a.list_versions("alice", "personal")] == ["live"]
    assert a.get_job(tenant_a.job_id).state == "queued"


def test_admin_routes_need_the_admin_key(api: ApiServer, tenant_a: TenantA) -> None:
    name = f"tenant-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=api.url) as http:
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        created = http.post("/v1/tenants", json={"name": name}, headers=admin)
        assert created.status_code == 201 and created.json()["api_key"].startswith("lf_")
        assert http.post("/v1/tenants", json={"name": name}, headers=admin).status_code == 409
        key = http.post(f"/v1/tenants/{name}/keys", headers=admin).json()["api_key"]
        assert key != created.json()["api_key"]
        assert http.post("/v1/tenants/no-such-tenant/keys", headers=admin).status_code == 404
        assert name in [t["name"] for t in http.get("/v1/tenants", headers=admin).json()]
        for tenant_key in (created.json()["api_key"], key):  # both keys of the new tenant work, as a tenant
            mine = {"Authorization": f"Bearer {tenant_key}"}
            assert http.get("/v1/jobs", headers=mine).status_code == 200
            assert http.get("/v1/tenants", headers=mine).status_code == 403
        assert http.get("/v1/jobs", headers=admin).status_code == 401  # the admin key is not a tenant

        # the tenant's keys: listed without the keys themselves, used ones stamped, one revoked by its id
        keys = http.get(f"/v1/tenants/{name}/keys", headers=admin).json()
        assert len(keys) == 2 and created.json()["api_key"].startswith(keys[0]["prefix"])
        assert key.startswith(keys[1]["prefix"]) and len(keys[1]["prefix"]) < len(key)
        assert all(k["last_used_at"] is not None and k["revoked_at"] is None for k in keys)
        assert all(created.json()["api_key"] not in str(k) and key not in str(k) for k in keys)
        revoked = http.post(f"/v1/tenants/{name}/keys/{keys[1]['id']}/revoke", headers=admin)
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
        again = http.post(f"/v1/tenants/{name}/keys/{keys[1]['id']}/revoke", headers=admin)
        assert again.json()["revoked_at"] == revoked.json()["revoked_at"]  # idempotent
        assert http.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
        first = {"Authorization": f"Bearer {created.json()['api_key']}"}
        assert http.get("/v1/jobs", headers=first).status_code == 200  # the other key still works
        other = http.get(f"/v1/tenants/{tenant_a.tenant.name}/keys", headers=admin).json()[0]["id"]
        assert http.post(f"/v1/tenants/{name}/keys/{other}/revoke", headers=admin).status_code == 404
    with Client(api.url, ADMIN_KEY, max_retries=0) as sdk:  # the same through the SDK
        assert [k.revoked_at is not None for k in sdk.list_api_keys(name)] == [False, True]
        assert sdk.revoke_api_key(name, keys[1]["id"]).revoked_at is not None
