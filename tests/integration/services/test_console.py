"""The web console through FastAPI's TestClient, over SQLite, a local blob dir and the built-in tiny backbone:
sign-in and sessions, CSRF refusals, another tenant's pages (404), each page's content, the forms' effects in
the database, bad input (422 naming the field, nothing changed) and the playground."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from api_helpers import ADMIN_KEY, SERVING_OPTIONS, sft
from console_data import Fleet, build_fleet
from fastapi.testclient import TestClient
from services.api.app import create_app
from services.api.runtime import ApiServices
from services.console.sessions import SESSION_COOKIE

from lorafleet.config import load_settings
from lorafleet.errors import NotFoundError
from lorafleet.store.sql.feedback import list_feedback
from lorafleet.workflows import deletion
from lorafleet.workflows.tasks import ingest_task_feedback, list_task_feedback


@dataclass
class Console:
    client: TestClient
    services: ApiServices
    fleet: Fleet

    def live_number(self, adapter_id: int | None = None) -> int | None:
        """The live version of alice's adapter, or of ``adapter_id`` (the task's: ``fleet.task_adapter_id``)."""
        live = self.services.registry.live_version(
            tenant_id=self.fleet.tenant_id, adapter_id=adapter_id or self.fleet.adapter_id
        )
        return None if live is None else live.number


@pytest.fixture(scope="module")
def console_app(
    api_data_dir: Path, _sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, ApiServices]]:
    """One app for this module, over a copy of the migrated SQLite template and a local blob dir; each test
    builds its own tenants in it (``build_fleet``), so tests never see each other's data."""
    root = tmp_path_factory.mktemp("console")
    shutil.copy(_sqlite_template, root / "lorafleet.db")
    settings = load_settings(
        data_dir=api_data_dir,
        database_url=f"sqlite:///{root / 'lorafleet.db'}",
        object_store_url=(root / "blobs").as_uri(),
        device="cpu",
        ray_address="",
        admin_key=ADMIN_KEY,
        promote_rule="never",
    )
    with TestClient(create_app(settings, options=SERVING_OPTIONS), base_url="https://testserver") as client:
        yield client, client.app.state.services  # type: ignore[attr-defined]


@pytest.fixture
def console(
    console_app: tuple[TestClient, ApiServices], adapter_folder: Callable[[int], Path]
) -> Iterator[Console]:
    client, services = console_app
    client.cookies.clear()  # a new browser for each test
    yield Console(client, services, build_fleet(services, adapter_folder))
    client.cookies.clear()


def sign_in(client: TestClient, key: str) -> str:
    """Sign in through the form; the session's CSRF token (read from the next page's forms)."""
    form = client.get("/console/sign-in")
    token = _csrf(form.text)
    answer = client.post(
        "/console/sign-in", data={"api_key": key, "csrf_token": token}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    return _csrf(client.get(answer.headers["location"]).text)


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found is not None, html[:500]
    return found.group(1)


def test_pages_need_a_session_and_sign_in_sets_a_strict_http_only_cookie(console: Console) -> None:
    client = console.client
    for path in ("/console/overview", "/console/users/alice", "/console/playground", "/console/tenants"):
        answer = client.get(path, follow_redirects=False)
        assert (answer.status_code, answer.headers["location"]) == (303, "/console/sign-in"), path

    token = _csrf(client.get("/console/sign-in").text)
    refused = client.post("/console/sign-in", data={"api_key": console.fleet.api_key}, follow_redirects=False)
    assert refused.status_code == 403 and "csrf_token" in refused.text  # no token: no session
    wrong = client.post("/console/sign-in", data={"api_key": "lf_nope", "csrf_token": token})
    assert wrong.status_code == 401 and "not accepted" in wrong.text
    assert SESSION_COOKIE not in client.cookies

    token = _csrf(client.get("/console/sign-in").text)
    signed = client.post(
        "/console/sign-in",
        data={"api_key": console.fleet.api_key, "csrf_token": token},
        follow_redirects=False,
    )
    assert (signed.status_code, signed.headers["location"]) == (303, "/console/overview")
    cookie = signed.headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=") and console.fleet.api_key not in cookie
    assert all(flag in cookie for flag in ("HttpOnly", "SameSite=strict", "Secure", "Path=/console"))
    page = client.get("/console/overview")
    assert page.status_code == 200 and console.fleet.tenant_name in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]

    value = cookie.split(";")[0].split("=", 1)[1]
    forged = value[:-1] + ("1" if value.endswith("0") else "0")  # the same id, a wrong signature
    client.cookies.set(SESSION_COOKIE, forged)
    assert client.get("/console/overview", follow_redirects=False).status_code == 303


def test_sign_out_needs_the_csrf_token_and_ends_the_session(console: Console) -> None:
    client = console.client
    csrf = sign_in(client, console.fleet.api_key)
    assert client.post("/console/sign-out", follow_redirects=False).status_code == 403
    assert client.get("/console/overview").status_code == 200  # still signed in
    out = client.post("/console/sign-out", data={"csrf_token": csrf}, follow_redirects=False)
    assert (out.status_code, out.headers["location"]) == (303, "/console/sign-in")
    assert client.get("/console/overview", follow_redirects=False).status_code == 303


def test_a_revoked_key_ends_its_sessions(console: Console) -> None:
    sign_in(console.client, console.fleet.api_key)
    console.services.tenants.revoke_api_key(api_key=console.fleet.api_key)
    assert console.client.get("/console/overview", follow_redirects=False).status_code == 303


def test_the_admin_key_sees_the_tenants_list_and_no_tenant_pages(console: Console) -> None:
    client = console.client
    sign_in(client, ADMIN_KEY)
    page = client.get("/console/tenants")
    assert page.status_code == 200
    assert console.fleet.tenant_name in page.text and console.fleet.other_tenant_name in page.text
    assert client.get("/console/overview").status_code == 403
    assert client.get("/console/users/alice").status_code == 403


def test_the_overview_shows_users_jobs_with_progress_and_tasks(console: Console) -> None:
    client, fleet = console.client, console.fleet
    sign_in(client, fleet.api_key)
    page = client.get("/console/overview").text
    row = re.search(r'<tr data-user="alice">(.*?)</tr>', page, re.S)
    assert row is not None
    assert "personal v2" in row.group(1) and "<td>4</td>" in row.group(1)  # live version, feedback records
    assert "personal v2: passed (promote)" in row.group(1)
    assert "current" in row.group(1)  # v2 was made after the newest feedback
    job = re.search(rf'<tr data-job="{fleet.running_job_id}">(.*?)</tr>', page, re.S)
    assert job is not None and "running" in job.group(1)
    assert '<progress max="6" value="2"' in job.group(1)
    assert f'action="/console/jobs/{fleet.running_job_id}/cancel"' in job.group(1)
    assert re.search(r'href="/console/tasks/summarise">summarise</a></th>\s*<td>v1</td>.*?alice', page, re.S)
    assert '<meta http-equiv="refresh" content="15">' in page  # a job runs: the page reloads itself
    queue = console.services.queue
    queue.cancel(tenant_id=fleet.tenant_id, job_id=fleet.running_job_id, actor="test")
    job = queue.get(tenant_id=fleet.tenant_id, job_id=fleet.running_job_id)
    queue.acknowledge_cancel(
        job_id=job.id, worker_id=job.kind
    )  # the fleet's worker (named as its kind) stops
    idle = client.get("/console/overview").text
    assert "http-equiv" not in idle and "data-refresh" not in idle  # nothing runs or waits: no reloads


def test_cancelling_a_job_needs_the_token_and_is_recorded_for_the_console(console: Console) -> None:
    client, fleet = console.client, console.fleet
    csrf = sign_in(client, fleet.api_key)
    path = f"/console/jobs/{fleet.running_job_id}/cancel"
    assert client.post(path, data={"csrf_token": "wrong"}).status_code == 403
    job = console.services.queue.get(tenant_id=fleet.tenant_id, job_id=fleet.running_job_id)
    assert job.cancel_requested_at is None
    assert client.post(path, data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    job = console.services.queue.get(tenant_id=fleet.tenant_id, job_id=fleet.running_job_id)
    assert job.cancel_requested_at is not None and job.cancelled_by == f"console:{fleet.tenant_name}"
    assert "Cancelling…" in client.get("/console/overview").text


def test_the_user_page_shows_lineage_versions_qa_history_and_loss_curves(console: Console) -> None:
    client, fleet = console.client, console.fleet
    sign_in(client, fleet.api_key)
    page = client.get("/console/users/alice").text
    v1, v2 = fleet.version_ids
    nodes = set(re.findall(r'data-node="([^"]+)"', page))
    assert nodes == {f"{kind}-{v}" for kind in ("version", "snapshot", "job") for v in (v1, v2)}
    assert "2 records" in page and "4 records" in page  # the snapshots' record counts
    assert page.count('class="edge edge-continued-from"') == 1
    assert 'data-version="2"' in page and "QA passed: promote" in page and "better on the own holdout" in page
    assert f"/console/users/alice/adapters/personal/versions/2/qa?report={fleet.report_id}" in page
    curves = re.findall(r'<polyline class="loss loss-1" points="([^"]+)"', page)
    assert len(curves) == 2 and all(len(c.split()) == 6 for c in curves)  # six steps each
    first = [tuple(map(float, p.split(","))) for p in curves[0].split()]
    assert [y for _, y in first] == sorted(y for _, y in first)  # the loss falls: y grows down the chart
    assert re.search(r'<tr data-to="2">.*?trained v2', page, re.S)
    assert 'id="data-rights"' in page and 'id="forget-records"' in page and 'id="forget-user"' in page
    assert 'name="reason" required' in page


def test_rollback_and_promote_move_live_with_a_reason_and_refuse_bad_input(console: Console) -> None:
    client, fleet = console.client, console.fleet
    csrf = sign_in(client, fleet.api_key)
    base = "/console/users/alice/adapters/personal"
    assert client.post(f"{base}/rollback", data={"to_version": "1", "reason": "no token"}).status_code == 403
    for bad, field in (({"to_version": "1"}, "reason"), ({"to_version": "one", "reason": "x"}, "to_version")):
        answer = client.post(f"{base}/rollback", data={**bad, "csrf_token": csrf})
        assert answer.status_code == 422 and f"{field}:" in answer.text, answer.text
    assert (
        client.post(
            f"{base}/rollback", data={"to_version": "7", "reason": "x", "csrf_token": csrf}
        ).status_code
        == 404
    )
    assert console.live_number() == 2  # nothing moved

    moved = client.post(
        f"{base}/rollback",
        data={"to_version": "1", "reason": "v2 is rude", "csrf_token": csrf},
        follow_redirects=False,
    )
    assert moved.status_code == 303 and console.live_number() == 1
    event = console.services.registry.alias_history(tenant_id=fleet.tenant_id, adapter_id=fleet.adapter_id)[
        -1
    ]
    assert (event.actor, event.reason) == (f"console:{fleet.tenant_name}", "v2 is rude")
    assert (
        client.post(
            f"{base}/promote", data={"version": "2", "reason": "fixed", "csrf_token": csrf}
        ).status_code
        == 200
    )
    assert console.live_number() == 2
    none = client.post(f"{base}/rollback", data={"to_version": "", "reason": "base only", "csrf_token": csrf})
    assert none.status_code == 200 and console.live_number() is None


def test_the_qa_page_draws_the_matrix_as_a_heatmap_with_rules_and_samples(console: Console) -> None:
    client, fleet = console.client, console.fleet
    sign_in(client, fleet.api_key)
    page = client.get(f"/console/users/alice/adapters/personal/versions/2/qa?report={fleet.report_id}")
    assert page.status_code == 200
    html = page.text
    assert re.findall(r'<th scope="col">(base|previous|candidate)</th>', html) == [
        "base",
        "previous",
        "candidate",
    ]
    holdout = re.search(r'<tr data-row="alice-holdout">(.*?)</tr>', html, re.S)
    assert holdout is not None
    colours = re.findall(r"background-color: (#[0-9a-f]{6})", holdout.group(1))
    assert colours[0] == "#ffffff" and colours[2] != colours[0]  # base against itself, the candidate greener
    assert "1.100 / 50%" in holdout.group(1)
    assert "probe loss rose 27%" in html and "user-holdout" in html and "Decision: promote" in html
    assert "hello" in html  # the candidate's greedy sample
    assert client.get("/console/users/alice/adapters/personal/versions/1/qa").status_code == 404  # no report
    assert (
        client.get(
            f"/console/users/alice/adapters/personal/versions/2/qa?report={fleet.report_id + 1}"
        ).status_code
        == 404
    )


def test_another_tenants_pages_and_forms_are_404(console: Console) -> None:
    client, fleet = console.client, console.fleet
    csrf = sign_in(client, fleet.other_key)
    base = "/console/users/alice/adapters/personal"
    task = "/console/tasks/summarise"
    for path in ("/console/users/alice", f"{base}/versions/2/qa", task, f"{task}/versions/1/qa"):
        answer = client.get(path)
        assert answer.status_code == 404 and "not found" in answer.text, path
    for path, data in (
        (f"{base}/rollback", {"to_version": "1", "reason": "intruder"}),
        (f"{base}/promote", {"version": "1", "reason": "intruder"}),
        (f"/console/jobs/{fleet.running_job_id}/cancel", {}),
        (f"{task}/rollback", {"reason": "intruder"}),
    ):
        assert client.post(path, data={**data, "csrf_token": csrf}).status_code == 404, path
    assert console.live_number() == 2 and console.live_number(fleet.task_adapter_id) == 1
    job = console.services.queue.get(tenant_id=fleet.tenant_id, job_id=fleet.running_job_id)
    assert job.cancel_requested_at is None
    assert "alice" not in client.get("/console/overview").text


def test_the_task_page_shows_its_versions_qa_enrolled_users_and_is_linked(console: Console) -> None:
    client, fleet = console.client, console.fleet
    sign_in(client, fleet.api_key)
    page = client.get("/console/tasks/summarise")
    assert page.status_code == 200
    html = page.text
    assert "Shared task summarise" in html and "Adapter summarise: v1 is live" in html
    assert 'Enrolled users: <a href="/console/users/alice">alice</a>' in html
    assert 'data-version="1"' in html and "QA passed: promote" in html
    assert f"/console/tasks/summarise/versions/1/qa?report={fleet.task_report_id}" in html
    for form in ("rollback", "feedback/forget"):
        assert f'action="/console/tasks/summarise/{form}"' in html, form
    assert 'action="/console/tasks/summarise/promote"' not in html  # its only version is live already
    assert 'class="edge' not in html and "data-node=" in html  # one version: a node and no edge
    for linked_from in ("/console/overview", "/console/users/alice"):
        assert 'href="/console/tasks/summarise"' in client.get(linked_from).text, linked_from
    assert client.get("/console/tasks/no-such-task").status_code == 404


def test_a_task_versions_qa_page_shows_its_evaluation_in_enrolled_users_experts(console: Console) -> None:
    client, fleet = console.client, console.fleet
    sign_in(client, fleet.api_key)
    page = client.get("/console/tasks/summarise/versions/1/qa")  # the latest report
    assert page.status_code == 200
    html = page.text
    assert f"QA report {fleet.task_report_id}: v1 of summarise" in html
    assert 'href="/console/tasks/summarise#v1">← task summarise</a>' in html
    assert "Decision: promote" in html and "probe loss rose 27%" in html  # evaluated alone
    bank = re.search(r'<section class="enrolled-bank" data-user="alice"(.*?)</section>', html, re.S)
    assert bank is not None
    assert "failed" in bank.group(1) and "holdout got worse" in bank.group(1)
    assert "gate-no-regression" in bank.group(1) and 'data-row="alice-holdout"' in bank.group(1)
    user_qa = client.get(
        f"/console/users/alice/adapters/personal/versions/2/qa?report={fleet.report_id}"
    ).text
    assert "enrolled-bank" not in user_qa and "← alice, adapter personal" in user_qa
    assert client.get("/console/tasks/summarise/versions/2/qa").status_code == 404  # no such version


def test_moving_a_tasks_live_queues_rechecks_of_its_users_and_refuses_bad_input(console: Console) -> None:
    client, fleet, services = console.client, console.fleet, console.services
    csrf = sign_in(client, fleet.api_key)
    base = "/console/tasks/summarise"
    task = fleet.task_adapter_id
    assert client.post(f"{base}/rollback", data={"reason": "no token"}).status_code == 403
    for bad, field in (({}, "reason"), ({"to_version": "one", "reason": "x"}, "to_version")):
        answer = client.post(f"{base}/rollback", data={**bad, "csrf_token": csrf})
        assert answer.status_code == 422 and f"{field}:" in answer.text, answer.text
    missing = client.post(f"{base}/promote", data={"version": "7", "reason": "x", "csrf_token": csrf})
    assert missing.status_code == 404
    assert console.live_number(task) == 1  # nothing moved

    def rechecks() -> list[int]:
        jobs = services.queue.list_jobs(tenant_id=fleet.tenant_id, state="queued")
        return [j.id for j in jobs if j.kind == "qa" and j.payload["recheck"]["changed_adapter_id"] == task]

    assert rechecks() == []
    moved = client.post(
        f"{base}/rollback",
        data={"to_version": "", "reason": "too long", "csrf_token": csrf},
        follow_redirects=False,
    )
    assert moved.status_code == 303 and moved.headers["location"] == f"{base}#history"
    assert console.live_number(task) is None and console.live_number() == 2  # alice's own adapter stays
    event = services.registry.alias_history(tenant_id=fleet.tenant_id, adapter_id=task)[-1]
    assert (event.actor, event.reason) == (f"console:{fleet.tenant_name}", "too long")
    assert len(rechecks()) == 1  # alice's experts changed: her live adapter is to be rechecked
    assert re.search(r'<tr data-to="none">.*?too long', client.get(base).text, re.S)

    promoted = client.post(f"{base}/promote", data={"version": "1", "reason": "back", "csrf_token": csrf})
    assert promoted.status_code == 200 and console.live_number(task) == 1
    assert "Adapter summarise: v1 is live" in promoted.text


def test_forgetting_a_tasks_records_through_the_form_shows_the_receipt(console: Console) -> None:
    client, fleet, services = console.client, console.fleet, console.services
    csrf = sign_in(client, fleet.api_key)
    ids = ingest_task_feedback(
        services.db, tenant_id=fleet.tenant_id, task_name="summarise", records=[sft("t1"), sft("t2")]
    ).ids
    path = "/console/tasks/summarise/feedback/forget"
    assert client.post(path, data={"ids": str(ids[0])}).status_code == 403  # no CSRF token
    assert client.post(path, data={"ids": f"{ids[0] + 10_000}", "csrf_token": csrf}).status_code == 404
    assert _task_records(console) == ids
    done = client.post(path, data={"ids": str(ids[0]), "csrf_token": csrf}, follow_redirects=False)
    assert done.status_code == 303
    (receipt,) = deletion.list_receipts(services.db, tenant_id=fleet.tenant_id)
    assert done.headers["location"] == f"/console/deletions/{receipt.id}"
    assert receipt.subject == "task:summarise" and _task_records(console) == ids[1:]
    page = client.get(done.headers["location"]).text
    assert 'href="/console/tasks/summarise">task:summarise</a>' in page
    assert receipt.id in client.get("/console/tasks/summarise").text  # listed in the data-rights section


def test_forgetting_records_by_a_filter_through_the_form(console: Console) -> None:
    """The form's filter (a time range in UTC, metadata values as a JSON object) selects as the API's does."""
    client, fleet, services = console.client, console.fleet, console.services
    csrf = sign_in(client, fleet.api_key)
    records = [sft("t1", session="s-1"), sft("t2", session="s-2"), sft("t3", session="s-1", app=2)]
    ids = ingest_task_feedback(
        services.db, tenant_id=fleet.tenant_id, task_name="summarise", records=records
    ).ids
    path = "/console/tasks/summarise/feedback/forget"
    later = (datetime.now(UTC) + timedelta(hours=1)).strftime(
        "%Y-%m-%dT%H:%M:%S"
    )  # as datetime-local sends it
    nothing = client.post(path, data={"since": later, "csrf_token": csrf}, follow_redirects=False)
    assert nothing.status_code == 303 and _task_records(console) == ids  # a receipt of no records
    done = client.post(
        path,
        data={"metadata": '{"session": "s-1"}', "until": later, "csrf_token": csrf},
        follow_redirects=False,
    )
    assert done.status_code == 303
    assert _task_records(console) == [ids[1]]
    receipt = deletion.list_receipts(services.db, tenant_id=fleet.tenant_id)[0]
    assert done.headers["location"] == f"/console/deletions/{receipt.id}"
    assert set(receipt.request["filter"]) == {"until", "metadata_sha256"}  # the value hashed, never in clear
    assert receipt.request["filter"]["until"] == f"{later}+00:00"  # a time without a timezone is UTC
    assert len(receipt.record_hashes) == 2


def _task_records(console: Console) -> list[int]:
    found = list_task_feedback(console.services.db, tenant_id=console.fleet.tenant_id, task_name="summarise")
    return [r.id for r in found]


def test_the_playground_answers_with_the_base_and_the_users_experts(console: Console) -> None:
    client, fleet = console.client, console.fleet
    csrf = sign_in(client, fleet.api_key)
    form = {
        "user": "alice",
        "prompt": "Hello there",
        "max_tokens": "3",
        "adapter_scale": "0.5",
        "csrf_token": csrf,
    }
    page = client.post("/console/playground", data=form)
    assert page.status_code == 200, page.text
    assert 'data-answer="base"' in page.text and 'data-answer="personal"' in page.text
    half = _weights(page.text)
    full = _weights(client.post("/console/playground", data={**form, "adapter_scale": "1"}).text)
    assert set(half) == set(full) and ("personal", 2) in full  # alice's live version serves her
    assert sum(half.values()) == pytest.approx(sum(full.values()) / 2, rel=1e-3)  # the dial scales the gate
    bad = client.post("/console/playground", data={**form, "adapter_scale": "2"})
    assert bad.status_code == 422 and "adapter_scale:" in bad.text


def _weights(html: str) -> dict[tuple[str, int], float]:
    """The playground's gate weights: (adapter, version) -> weight."""
    rows = re.findall(r'<td>([^<]+)</td><td>v(\d+)</td><td><meter min="0" max="1" value="([^"]+)"', html)
    return {(adapter, int(version)): float(weight) for adapter, version, weight in rows}


#: (path, form, the field the 422 must name): probes of every form field and path parameter's edge
BAD_FORMS: list[tuple[str, dict[str, str], str]] = [
    (
        "/users/alice/adapters/personal/rollback",
        {"to_version": "2147483648", "reason": "x"},
        "to_version",
    ),
    ("/users/alice/adapters/personal/rollback", {"to_version": "1", "reason": "a\x00b"}, "reason"),
    ("/users/alice/adapters/personal/promote", {"version": "true", "reason": "x"}, "version"),
    ("/users/alice/adapters/personal/promote", {"version": "1", "reason": "x" * 2001}, "reason"),
    ("/users/a%01b/adapters/personal/rollback", {"to_version": "1", "reason": "x"}, "user_id"),
    ("/jobs/9223372036854775808/cancel", {}, "job_id"),
    ("/playground", {"user": "alice", "prompt": "", "max_tokens": "2"}, "prompt"),
    ("/playground", {"user": "alice", "prompt": "Hi", "max_tokens": "999"}, "max_tokens"),
    ("/playground", {"user": "alice", "prompt": "Hi", "adapter_scale": "nan"}, "adapter_scale"),
    ("/users/alice/feedback/forget", {"ids": "1, two"}, "ids"),
    ("/users/alice/feedback/forget", {"ids": "1,,2"}, "ids"),
    ("/users/alice/feedback/forget", {"ids": "9" * 5000}, "ids"),
    ("/users/alice/feedback/forget", {"ids": "9223372036854775808"}, "ids"),
    ("/users/alice/feedback/forget", {"purge": "true"}, "ids"),
    ("/users/alice/feedback/forget", {"ids": "1", "purge": "maybe"}, "purge"),
    ("/users/alice/feedback/forget", {"ids": "1", "metadata": '{"session": "s-1"}'}, "ids"),  # both
    ("/users/alice/feedback/forget", {"metadata": "{session"}, "metadata"),
    ("/users/alice/feedback/forget", {"metadata": '["session"]'}, "metadata"),
    ("/users/alice/feedback/forget", {"since": "yesterday"}, "since"),
    (
        "/users/alice/feedback/forget",
        {"since": "2026-12-06T10:00", "until": "2026-12-06T09:00"},
        "filter.until",
    ),
    ("/tasks/summarise/feedback/forget", {"metadata": "{"}, "metadata"),
    ("/users/alice/forget", {"confirm": "bob"}, "confirm"),
    ("/users/alice/forget", {"confirm": "alice", "purge": "maybe"}, "purge"),
    ("/users/alice/forget", {}, "confirm"),
]


def test_bad_form_input_is_422_naming_the_field_and_changes_nothing(console: Console) -> None:
    fleet, services = console.fleet, console.services
    csrf = sign_in(console.client, fleet.api_key)
    for path, form, field in BAD_FORMS:
        answer = console.client.post(f"/console{path}", data={**form, "csrf_token": csrf})
        assert answer.status_code == 422 and f"{field}:" in answer.text, (path, field, answer.text[-600:])
    assert console.live_number() == 2
    assert len(services.registry.alias_history(tenant_id=fleet.tenant_id, adapter_id=fleet.adapter_id)) == 2
    job = services.queue.get(tenant_id=fleet.tenant_id, job_id=fleet.running_job_id)
    assert job.cancel_requested_at is None
    body = b"csrf_token=" + csrf.encode() + b"&reason=\xff\xfe"  # not UTF-8
    answer = console.client.post(
        "/console/users/alice/adapters/personal/rollback",
        content=body,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 422 and "form:" in answer.text
    assert console.live_number() == 2
    assert len(_records(console)) == 4  # nothing forgotten
    assert console.client.get("/console/deletions/del_nope").status_code == 422
    assert console.client.get("/console/overview?deleted=x").status_code == 422


def _records(console: Console) -> list[int]:
    found = list_feedback(console.services.db, tenant_id=console.fleet.tenant_id, external_id="alice")
    return [r.id for r in found]


def test_forgetting_records_through_the_form_revokes_their_versions_and_shows_the_receipt(
    console: Console,
) -> None:
    client, fleet, services = console.client, console.fleet, console.services
    csrf = sign_in(client, fleet.api_key)
    ids = _records(console)
    path = "/console/users/alice/feedback/forget"
    assert client.post(path, data={"ids": str(ids[3])}).status_code == 403  # no CSRF token
    unknown = client.post(path, data={"ids": f"{ids[3]}, {ids[3] + 10_000}", "csrf_token": csrf})
    assert unknown.status_code == 404
    assert _records(console) == ids and console.live_number() == 2  # nothing changed
    assert deletion.list_receipts(services.db, tenant_id=fleet.tenant_id) == []

    done = client.post(path, data={"ids": f" {ids[3]} ", "csrf_token": csrf}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"].startswith("/console/deletions/del_")
    assert _records(console) == ids[:3]
    assert console.live_number() == 1  # v2 was trained on the record: revoked, live back to v1
    (receipt,) = deletion.list_receipts(services.db, tenant_id=fleet.tenant_id)
    assert done.headers["location"] == f"/console/deletions/{receipt.id}"
    assert receipt.actor == f"console:{fleet.tenant_name}" and receipt.request == {"ids": [ids[3]]}
    page = client.get(done.headers["location"])
    assert page.status_code == 200
    assert (
        '<dd data-field="records">1</dd>' in page.text
        and f'data-revoked="{fleet.version_ids[1]}"' in page.text
    )
    assert receipt.record_hashes[0] in page.text and "held until" in page.text
    assert receipt.rebuild_job_id is not None  # alice has records newer than v1: a rebuild is queued
    assert f"job {receipt.rebuild_job_id}: queued" in page.text
    assert receipt.id in client.get("/console/users/alice").text  # listed in the data-rights section

    sign_in(client, fleet.other_key)  # another tenant's receipt is 404
    other = client.get(f"/console/deletions/{receipt.id}")
    assert other.status_code == 404 and receipt.record_hashes[0] not in other.text


def test_forgetting_the_user_needs_the_token_and_the_typed_id(console: Console) -> None:
    client, fleet, services = console.client, console.fleet, console.services
    csrf = sign_in(client, fleet.api_key)
    path = "/console/users/alice/forget"
    assert client.post(path, data={"confirm": "alice"}).status_code == 403
    wrong = client.post(path, data={"confirm": "Alice", "csrf_token": csrf})
    assert wrong.status_code == 422 and "confirm:" in wrong.text
    assert (
        client.post("/console/users/bob/forget", data={"confirm": "bob", "csrf_token": csrf}).status_code
        == 404
    )
    assert len(_records(console)) == 4 and console.live_number() == 2

    done = client.post(
        path, data={"confirm": "alice", "purge": "true", "csrf_token": csrf}, follow_redirects=False
    )
    assert done.status_code == 303
    (receipt,) = deletion.list_receipts(services.db, tenant_id=fleet.tenant_id)
    assert done.headers["location"] == f"/console/overview?deleted={receipt.id}"
    with pytest.raises(NotFoundError):
        services.tenants.get_user(tenant_id=fleet.tenant_id, external_id="alice")
    overview = client.get(done.headers["location"]).text
    assert f'href="/console/deletions/{receipt.id}"' in overview and 'data-user="alice"' not in overview
    page = client.get(f"/console/deletions/{receipt.id}").text
    assert '<dd data-field="records">4</dd>' in page and "user forgotten" in page
    assert client.get("/console/users/alice").status_code == 404
