"""The console's pages and forms. GET pages need a session (else a redirect to sign-in); every POST needs the
session's CSRF token in its form (else 403, and nothing changes). Pages call the library as the API's routes do
(``services.console.views``); the forms move ``live`` through ``workflows.live_alias``, cancel jobs through
the job queue and forget records or a user through ``workflows.deletion`` / ``workflows.erasure``, recorded
with the actor ``console:<tenant>``."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool

from lorafleet.domain import Adapter, Tenant
from lorafleet.domain.subject import Subject
from lorafleet.errors import AuthError, NotFoundError, PermissionDeniedError, ValidationError
from lorafleet.serving.requests import BANK_MODEL, BASE_MODEL, GenerationRequest, GenerationResult
from lorafleet.workflows import deletion
from lorafleet.workflows.erasure import forget_user
from lorafleet.workflows.live_alias import move_live, promote_manually
from lorafleet.workflows.tasks import get_task_adapter, move_task_live
from services.api.deps import AdapterName, JobId, TaskName, UserId, VersionNumber
from services.api.runtime import ApiServices
from services.console import views
from services.console.forms import (
    ForgetRecordsForm,
    ForgetUserForm,
    PlaygroundForm,
    PromoteForm,
    RollbackForm,
    SignInForm,
    checked,
    parse_form,
)
from services.console.sessions import (
    SESSION_COOKIE,
    SIGN_IN_COOKIE,
    ConsoleSession,
    SessionStore,
    tokens_match,
)

router = APIRouter()
PREFIX = "/console"
RECEIPT_ID_PATTERN = r"^del_[0-9a-f]{32}$"
#: seconds between the overview's own reloads while jobs run or wait (their progress bars move)
OVERVIEW_REFRESH_S = 15
ReceiptId = Annotated[str, Path(pattern=RECEIPT_ID_PATTERN)]


class SignInNeeded(Exception):
    """A page asked for without a session: answered with a redirect to the sign-in page."""


def to_sign_in(_request: Request, _exc: Exception) -> Response:
    return RedirectResponse(f"{PREFIX}/sign-in", status_code=303)


@dataclass(frozen=True)
class Viewer:
    """Who is signed in: a tenant (``tenant``) or the admin (``tenant`` None)."""

    session: ConsoleSession
    tenant: Tenant | None

    @property
    def actor(self) -> str:
        """How the console's actions are recorded (alias history, job cancels)."""
        return f"console:{self.tenant.name if self.tenant else 'admin'}"[:256]


def _services(request: Request) -> ApiServices:
    services: ApiServices = request.app.state.services()
    return services


def _sessions(request: Request) -> SessionStore:
    sessions: SessionStore = request.app.state.sessions
    return sessions


def _session_viewer(request: Request) -> Viewer | None:
    """The signed-in viewer, with a tenant key checked again now (a revoked key ends the session)."""
    sessions = _sessions(request)
    session = sessions.find(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    if session.admin:
        return Viewer(session, None)
    assert session.api_key is not None
    try:
        return Viewer(session, _services(request).tenants.authenticate(api_key=session.api_key))
    except AuthError:
        sessions.end(session.id)
        return None


def any_viewer(request: Request) -> Viewer:
    viewer = _session_viewer(request)
    if viewer is None:
        raise SignInNeeded()
    return viewer


AnyViewer = Annotated[Viewer, Depends(any_viewer)]


def tenant_viewer(viewer: AnyViewer) -> Viewer:
    if viewer.tenant is None:
        raise PermissionDeniedError(
            "the admin key sees the tenants list; sign in with a tenant's key for its pages"
        )
    return viewer


TenantViewer = Annotated[Viewer, Depends(tenant_viewer)]


@dataclass(frozen=True)
class Posted:
    """A POSTed form whose CSRF token matched its session's."""

    viewer: Viewer
    fields: dict[str, str]

    @property
    def tenant(self) -> Tenant:
        if self.viewer.tenant is None:
            raise PermissionDeniedError("the admin key cannot change a tenant's adapters or jobs")
        return self.viewer.tenant


async def posted_form(request: Request) -> Posted:
    """The form of a POST from a signed-in browser with the session's CSRF token; 403 otherwise (checked
    before the form's fields, so a forged request learns nothing and changes nothing)."""
    viewer = await run_in_threadpool(_session_viewer, request)  # a key check reads the database
    fields = parse_form(await request.body())
    if viewer is None or not tokens_match(viewer.session.csrf_token, fields.get("csrf_token")):
        raise PermissionDeniedError("csrf_token: missing or wrong (reload the page and try again)")
    return Posted(viewer, fields)


Form = Annotated[Posted, Depends(posted_form)]


def page(request: Request, name: str, viewer: Viewer | None, **context: Any) -> Response:
    templates = request.app.state.templates
    csrf = None if viewer is None else viewer.session.csrf_token
    response: Response = templates.TemplateResponse(
        request, name, {"viewer": viewer, "csrf_token": csrf, "prefix": PREFIX, **context}
    )
    return response


def _see(path: str) -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}{path}", status_code=303)


# --- signing in and out ---------------------------------------------------------------------------------------
@router.get("/")
def home(request: Request) -> Response:
    viewer = _session_viewer(request)
    if viewer is None:
        return _see("/sign-in")
    return _see("/overview" if viewer.tenant else "/tenants")


@router.get("/sign-in")
def sign_in_page(request: Request) -> Response:
    """The sign-in form, with a token of its own (the form's CSRF token before there is a session)."""
    token = secrets.token_urlsafe(24)
    response = page(request, "sign_in.html", None, sign_in_token=token, error=None)
    _set_cookie(request, response, SIGN_IN_COOKIE, _sessions(request).sign(token), max_age=3600)
    return response


@router.post("/sign-in")
async def sign_in(request: Request) -> Response:
    sessions = _sessions(request)
    fields = parse_form(await request.body())
    expected = sessions.unsign(request.cookies.get(SIGN_IN_COOKIE))
    if expected is None or not tokens_match(expected, fields.get("csrf_token")):
        raise PermissionDeniedError("csrf_token: missing or wrong (reload the sign-in page and try again)")
    key = checked(SignInForm, fields).api_key
    services = _services(request)
    admin = services.settings.admin_key
    if admin and secrets.compare_digest(key.encode(), admin.encode()):
        session = sessions.create(api_key=None, admin=True)
    else:
        try:
            await run_in_threadpool(services.tenants.authenticate, api_key=key)
        except AuthError:
            token = secrets.token_urlsafe(24)
            response = page(
                request, "sign_in.html", None, sign_in_token=token, error="That key was not accepted."
            )
            response.status_code = 401
            _set_cookie(request, response, SIGN_IN_COOKIE, sessions.sign(token), max_age=3600)
            return response
        session = sessions.create(api_key=key, admin=False)
    response = _see("/overview" if not session.admin else "/tenants")
    _set_cookie(request, response, SESSION_COOKIE, sessions.sign(session.id), max_age=None)
    response.delete_cookie(SIGN_IN_COOKIE, path=PREFIX)
    return response


@router.post("/sign-out")
def sign_out(request: Request, form: Form) -> Response:
    _sessions(request).end(form.viewer.session.id)
    response = _see("/sign-in")
    response.delete_cookie(SESSION_COOKIE, path=PREFIX)
    return response


def _set_cookie(request: Request, response: Response, name: str, value: str, *, max_age: int | None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path=PREFIX,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


# --- the admin's tenants list ---------------------------------------------------------------------------------
@router.get("/tenants")
def tenants_page(request: Request, viewer: AnyViewer) -> Response:
    if viewer.tenant is not None:
        raise PermissionDeniedError("the tenants list needs the admin key")
    return page(request, "tenants.html", viewer, tenants=_services(request).tenants.list_tenants())


# --- a tenant's pages -----------------------------------------------------------------------------------------
@router.get("/overview")
def overview_page(
    request: Request,
    viewer: TenantViewer,
    deleted: Annotated[str | None, Query(pattern=RECEIPT_ID_PATTERN)] = None,
) -> Response:
    """The tenant's users, jobs and tasks; ``deleted``: a receipt to link (after forgetting a user). While jobs run
    or wait it reloads itself every ``OVERVIEW_REFRESH_S`` seconds (a meta refresh: no script)."""
    assert viewer.tenant is not None
    view = views.overview(_services(request), viewer.tenant)
    return page(
        request, "overview.html", viewer, view=view, deleted=deleted, refresh_seconds=OVERVIEW_REFRESH_S
    )


@router.post("/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: JobId, form: Form) -> Response:
    """Cancel one of the tenant's jobs (another tenant's is 404), as ``POST /v1/jobs/{id}/cancel`` does."""
    _services(request).queue.cancel(tenant_id=form.tenant.id, job_id=job_id, actor=form.viewer.actor)
    return _see("/overview#jobs")


@router.get("/users/{user_id}")
def user_page(
    request: Request,
    viewer: TenantViewer,
    user_id: UserId,
    adapter: Annotated[str | None, Query(min_length=1, max_length=128)] = None,
) -> Response:
    assert viewer.tenant is not None
    view = views.user_page(_services(request), viewer.tenant, user_id, adapter)
    return page(request, "user.html", viewer, view=view)


def _user_adapter(services: ApiServices, tenant: Tenant, user_id: str, name: str) -> Adapter:
    user = services.tenants.get_user(tenant_id=tenant.id, external_id=user_id)
    found = services.registry.find_adapter(tenant_id=tenant.id, owner_user_id=user.id, name=name)
    if found is None:
        raise NotFoundError(f"adapter {name!r} not found")
    return found


@router.post("/users/{user_id}/adapters/{name}/rollback")
def rollback(request: Request, user_id: UserId, name: AdapterName, form: Form) -> Response:
    """Move ``live`` back to an earlier version (or to none), with the reason the form asked for."""
    services = _services(request)
    adapter = _user_adapter(services, form.tenant, user_id, name)
    body = checked(RollbackForm, form.fields)
    move_live(
        registry=services.registry,
        queue=services.queue,
        tenant_id=form.tenant.id,
        adapter=adapter,
        action="rollback",
        number=body.to_version,
        actor=form.viewer.actor,
        reason=body.reason,
    )
    return _see(_user_path(user_id, name, "#history"))


@router.post("/users/{user_id}/adapters/{name}/promote")
def promote(request: Request, user_id: UserId, name: AdapterName, form: Form) -> Response:
    """Make a version live under the promote rule, as ``POST .../promote`` does (``force`` for one QA has not
    passed; a rejected version is refused)."""
    services = _services(request)
    adapter = _user_adapter(services, form.tenant, user_id, name)
    body = checked(PromoteForm, form.fields)
    promote_manually(
        services.db,
        services.registry,
        tenant_id=form.tenant.id,
        adapter=adapter,
        number=body.version,
        actor=form.viewer.actor,
        reason=body.reason,
        promote_rule=services.settings.promote_rule,
        force=body.force,
        queue=services.queue,
    )
    return _see(_user_path(user_id, name, "#history"))


# --- data rights: forgetting records or the user -------------------------------------------------------------
@router.post("/users/{user_id}/feedback/forget")
def forget_records(request: Request, user_id: UserId, form: Form) -> Response:
    """Forget some of the user's records, by id or by a filter (``ForgetRecordsForm``), as
    ``DELETE /v1/users/{id}/feedback`` does (versions trained on them revoked, ``live`` rolled back, a rebuild
    queued); the receipt page shows what changed. Ids that are not the user's records are a 404 and nothing
    changes."""
    return _forget_records(request, form, Subject.user(user_id))


def _forget_records(request: Request, form: Posted, subject: Subject) -> Response:
    """``deletion.forget_records`` of the form's selection (ids or a filter) for the signed-in tenant, then the
    receipt page."""
    services = _services(request)
    body = checked(ForgetRecordsForm, form.fields)
    receipt = deletion.forget_records(
        services.db,
        services.registry,
        tenant_id=form.tenant.id,
        subject=subject,
        selection=body.selection(),
        actor=form.viewer.actor,
        purge=body.purge,
        scheduler=services.scheduler,
    )
    return _see(f"/deletions/{receipt.id}")


@router.post("/users/{user_id}/forget")
def forget_this_user(request: Request, user_id: UserId, form: Form) -> Response:
    """Forget the user, as ``DELETE /v1/users/{id}`` does, once the form's ``confirm`` repeats their id; back to
    the overview, which links the receipt."""
    services = _services(request)
    body = checked(ForgetUserForm, form.fields)
    if body.confirm != user_id:
        raise ValidationError("confirm: type this user's id exactly to confirm (nothing was deleted)")
    receipt = forget_user(
        services.db,
        services.registry,
        tenant_id=form.tenant.id,
        external_id=user_id,
        actor=form.viewer.actor,
        purge=body.purge,
    )
    return _see(f"/overview?deleted={receipt.id}")


@router.get("/deletions/{receipt_id}")
def receipt_page(request: Request, viewer: TenantViewer, receipt_id: ReceiptId) -> Response:
    """A deletion's receipt (another tenant's is 404): what was removed, and where the rebuild stands."""
    assert viewer.tenant is not None
    view = views.receipt_page(_services(request), viewer.tenant, receipt_id)
    return page(request, "receipt.html", viewer, view=view)


def _user_path(user_id: str, adapter: str, anchor: str = "") -> str:
    return f"{views.user_path(user_id)}?adapter={quote(adapter, safe='')}{anchor}"


ReportId = Annotated[int | None, Query(ge=1, le=2**63 - 1)]


@router.get("/users/{user_id}/adapters/{name}/versions/{n}/qa")
def qa_page(
    request: Request,
    viewer: TenantViewer,
    user_id: UserId,
    name: AdapterName,
    n: VersionNumber,
    report: ReportId = None,
) -> Response:
    assert viewer.tenant is not None
    services = _services(request)
    adapter = _user_adapter(services, viewer.tenant, user_id, name)
    back = _user_path(user_id, name, f"#v{n}")
    view = views.qa_page(
        services, viewer.tenant, adapter, n, report, back_path=back, back_label=f"{user_id}, adapter {name}"
    )
    return page(request, "qa.html", viewer, view=view)


# --- a shared task's pages ------------------------------------------------------------------------------------
@router.get("/tasks/{task}")
def task_page(request: Request, viewer: TenantViewer, task: TaskName) -> Response:
    """The task adapter's versions, QA, lineage and history, its enrolled users, jobs and deletions."""
    assert viewer.tenant is not None
    view = views.task_page(_services(request), viewer.tenant, task)
    return page(request, "task.html", viewer, view=view)


@router.post("/tasks/{task}/promote")
def promote_task(request: Request, task: TaskName, form: Form) -> Response:
    """Make a version of the task live, as ``POST /v1/tasks/{task}/promote`` does: under the promote rule, and
    with rechecks of every enrolled user's live adapters queued with the move (their experts changed)."""
    body = checked(PromoteForm, form.fields)
    return _move_task(request, task, form, "promote", body.version, body.reason, force=body.force)


@router.post("/tasks/{task}/rollback")
def rollback_task(request: Request, task: TaskName, form: Form) -> Response:
    """Move the task's ``live`` back to an earlier version or to none, with the enrolled users' rechecks."""
    body = checked(RollbackForm, form.fields)
    return _move_task(request, task, form, "rollback", body.to_version, body.reason)


def _move_task(
    request: Request,
    task: str,
    form: Posted,
    action: str,
    to_number: int | None,
    reason: str,
    *,
    force: bool = False,
) -> Response:
    """``move_task_live`` for the signed-in tenant, then back to the task's alias history."""
    services = _services(request)
    move_task_live(
        services.db,
        services.registry,
        tenant_id=form.tenant.id,
        task_name=task,
        to_number=to_number,
        action=action,
        actor=form.viewer.actor,
        reason=reason,
        promote_rule=services.settings.promote_rule,
        force=force,
    )
    return _see(f"{views.task_path(task)}#history")


@router.post("/tasks/{task}/feedback/forget")
def forget_task_records(request: Request, task: TaskName, form: Form) -> Response:
    """Forget records of the task's dataset, by id or by a filter, as ``DELETE /v1/tasks/{task}/feedback`` does;
    the receipt page shows what changed."""
    return _forget_records(request, form, Subject.task(task))


@router.get("/tasks/{task}/versions/{n}/qa")
def task_qa_page(
    request: Request, viewer: TenantViewer, task: TaskName, n: VersionNumber, report: ReportId = None
) -> Response:
    """A task version's QA report: evaluated alone, and in the sampled enrolled users' experts."""
    assert viewer.tenant is not None
    services = _services(request)
    adapter = get_task_adapter(services.registry, tenant_id=viewer.tenant.id, task_name=task)
    back = f"{views.task_path(adapter.name)}#v{n}"
    view = views.qa_page(
        services, viewer.tenant, adapter, n, report, back_path=back, back_label=f"task {task}"
    )
    return page(request, "qa.html", viewer, view=view)


# --- the playground -------------------------------------------------------------------------------------------
@router.get("/playground")
def playground_page(
    request: Request,
    viewer: TenantViewer,
    user: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
) -> Response:
    return page(request, "playground.html", viewer, form=None, answers=None, user=user or "")


@router.post("/playground")
def playground(request: Request, form: Form) -> Response:
    """The prompt answered twice in one batch: by the base model and by the user's experts (the gate over
    their bank, scaled by the personalization dial); the answer names the versions and gate weights."""
    body = checked(PlaygroundForm, form.fields)
    common: Mapping[str, Any] = {
        "tenant_id": form.tenant.id,
        "user": body.user,
        "prompt": body.prompt,
        "max_new_tokens": body.max_tokens,
    }
    base, personal = _services(request).engine.generate(
        [
            GenerationRequest(**common, model=BASE_MODEL),
            GenerationRequest(**common, model=BANK_MODEL, adapter_scale=body.adapter_scale),
        ]
    )
    answers = {"base": _answer(base), "personal": _answer(personal)}
    return page(request, "playground.html", form.viewer, form=body, answers=answers, user=body.user)


def _answer(result: GenerationResult) -> dict[str, Any]:
    return {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "served_by": [
            {"adapter": b.adapter, "version": b.version, "weight": b.weight} for b in result.served_by
        ],
    }


__all__ = ["PREFIX", "SignInNeeded", "Viewer", "router", "to_sign_in"]
