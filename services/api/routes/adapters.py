"""A user's adapters: versions (metrics, QA), lineage, the ``live`` alias's history, promote and rollback."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse
from starlette.background import BackgroundTask

from lorafleet.domain import Adapter, AdapterVersion, AliasEvent, Tenant
from lorafleet.domain.subject import Subject
from lorafleet.errors import ValidationError
from lorafleet.qa.reports import load_report, reports_for_version
from lorafleet.sdk import schemas as s
from lorafleet.workflows.exports import export_audited_version
from lorafleet.workflows.import_jobs import ImportSubmitted, import_weight_bounds, submit_import
from lorafleet.workflows.live_alias import VersionQA, promote_manually, versions_qa
from lorafleet.workflows.live_alias import move_live as move_alias
from lorafleet.workflows.workdirs import owned_tempdir
from services.api import convert
from services.api.deps import (
    AdapterName,
    CurrentTenant,
    CurrentUser,
    LineageDepth,
    QADocument,
    Services,
    UserAdapter,
    UserId,
    VersionNumber,
    actor_of,
)
from services.api.idempotency import Idempotent, IdempotentCall
from services.api.runtime import ApiServices

router = APIRouter(prefix="/v1/users/{user_id}/adapters", tags=["adapters"])
#: the sha256 of the version's stored blob (the registry's uncompressed tar of the two PEFT files)
VERSION_SHA256_HEADER = "X-Lorafleet-Version-Sha256"
#: the sha256 of the downloaded ``.tar.gz`` itself
ARCHIVE_SHA256_HEADER = "X-Lorafleet-Archive-Sha256"
DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/gzip": {}}, "description": "The PEFT folder as a .tar.gz"},
    404: {"description": "No such adapter or version"},
    409: {"description": "The version is marked corrupt"},
}


def event_out(services: ApiServices, adapter: Adapter, event: AliasEvent) -> s.AliasEventOut:
    versions = services.registry.list_versions(tenant_id=adapter.tenant_id, adapter_id=adapter.id)
    numbers = {v.id: v.number for v in versions}
    return convert.alias_event(event, adapter_name=adapter.name, numbers=numbers)


@router.get("", response_model=list[s.AdapterOut])
def list_adapters(services: Services, user: CurrentUser) -> list[s.AdapterOut]:
    """The user's own adapters, each with its live version number (None: no adapter live)."""
    registry = services.registry
    found = registry.list_adapters(tenant_id=user.tenant_id, owner_user_id=user.id)
    return [
        convert.adapter(a, live=registry.live_version(tenant_id=a.tenant_id, adapter_id=a.id)) for a in found
    ]


@router.get("/{name}/versions", response_model=list[s.VersionOut])
def list_versions(services: Services, adapter: UserAdapter) -> list[s.VersionOut]:
    """Every version by number, with its status, training metrics and QA state (``qa_decision``, ``qa_state``,
    and ``forced_live`` for a version a person made live before QA passed it)."""
    versions = services.registry.list_versions(tenant_id=adapter.tenant_id, adapter_id=adapter.id)
    qa = adapter_versions_qa(services, adapter, versions)
    return [convert.version(v, adapter_name=adapter.name, qa=qa[v.id]) for v in versions]


@router.get("/{name}/versions/{n}", response_model=s.VersionDetail)
def get_version(
    services: Services,
    adapter: UserAdapter,
    n: VersionNumber,
    qa_document: QADocument = False,
) -> s.VersionDetail:
    """One version: metrics, and its QA (the latest report's decision, every report, optionally the document)."""
    version = services.registry.get_version(tenant_id=adapter.tenant_id, adapter_id=adapter.id, number=n)
    reports = reports_for_version(services.db, tenant_id=adapter.tenant_id, version_id=version.id)
    document: dict[str, Any] | None = None
    if qa_document and reports:
        _, document = load_report(
            services.db, services.registry, report_id=reports[-1].id, tenant_id=adapter.tenant_id
        )
    qa = adapter_versions_qa(services, adapter, [version])
    return convert.version_detail(
        version, adapter_name=adapter.name, reports=reports, document=document, qa=qa[version.id]
    )


def adapter_versions_qa(
    services: ApiServices, adapter: Adapter, versions: Sequence[AdapterVersion]
) -> dict[int, VersionQA]:
    """Each of the adapter's ``versions``' QA state, by version id (as the API and the console show it)."""
    return versions_qa(
        services.db,
        services.registry,
        tenant_id=adapter.tenant_id,
        adapter_id=adapter.id,
        version_ids=[v.id for v in versions],
    )


@router.get("/{name}/versions/{n}/download", response_class=FileResponse, responses=DOWNLOAD_RESPONSES)
def download_version(
    services: Services, tenant: CurrentTenant, user: CurrentUser, adapter: UserAdapter, n: VersionNumber
) -> FileResponse:
    """The version as a PEFT folder archive (``<adapter>-v<n>.tar.gz`` holding ``<adapter>-v<n>/`` with
    ``adapter_config.json``, ``adapter_model.safetensors`` and ``lorafleet_export.json``) that
    ``AutoPeftModelForCausalLM.from_pretrained`` loads once unpacked; ``base_model_name_or_path`` names a base PEFT
    accepts (``docs/data-rights.md``). The stored blob is verified against its sha256 first.
    ``X-Lorafleet-Version-Sha256``: the sha256 of the version's stored blob (as in its metadata);
    ``X-Lorafleet-Archive-Sha256``: the sha256 of this download. 404: no such version; 409: a corrupt one.
    Each download is an ``export.version`` event in the audit log."""
    return exported_version_response(
        services, adapter, n, owner=Subject.user(user.external_id), actor=actor_of(tenant)
    )


def exported_version_response(
    services: ApiServices, adapter: Adapter, n: int, *, owner: Subject | None, actor: str
) -> FileResponse:
    """Export version ``n`` of ``adapter`` (a user's, or a task's with ``owner`` None), audit it, and answer with
    the archive; its folder is removed once the answer is sent."""
    # the archive's folder lives until the answer is sent (a crashed process's is swept at the next start)
    work = ExitStack()
    folder = work.enter_context(owned_tempdir("lorafleet-export-"))
    try:
        exported = export_audited_version(
            services.db,
            services.registry,
            adapter=adapter,
            owner=owner,
            number=n,
            backbone=services.settings.backbone,
            dest_dir=folder,
            actor=actor,
        )
    except BaseException:
        work.close()
        raise
    return FileResponse(
        exported.path,
        media_type="application/gzip",
        filename=exported.filename,
        headers={
            VERSION_SHA256_HEADER: exported.version_sha256,
            ARCHIVE_SHA256_HEADER: exported.archive_sha256,
        },
        background=BackgroundTask(work.close),
    )


@router.get("/{name}/versions/{n}/lineage", response_model=s.LineageOut)
def get_lineage(
    services: Services,
    adapter: UserAdapter,
    n: VersionNumber,
    depth: LineageDepth = None,
) -> s.LineageOut:
    """Ancestors and descendants of a version, with the data snapshot, job and QA decisions of each."""
    registry, tenant_id = services.registry, adapter.tenant_id
    version = registry.get_version(tenant_id=tenant_id, adapter_id=adapter.id, number=n)
    found = registry.lineage(tenant_id=tenant_id, version_id=version.id, depth=depth)
    nodes = [found.root, *found.ancestors, *found.descendants]
    ids = {node.version.adapter_id for node in nodes}
    names = {i: registry.get_adapter(tenant_id=tenant_id, adapter_id=i).name for i in ids}
    return convert.lineage(found, adapter_names=names)


@router.get("/{name}/history", response_model=list[s.AliasEventOut])
def alias_history(services: Services, adapter: UserAdapter) -> list[s.AliasEventOut]:
    """Every move of ``live``, oldest first: who, when, from, to, why."""
    registry = services.registry
    events = registry.alias_history(tenant_id=adapter.tenant_id, adapter_id=adapter.id)
    versions = registry.list_versions(tenant_id=adapter.tenant_id, adapter_id=adapter.id)
    numbers = {v.id: v.number for v in versions}
    return [convert.alias_event(e, adapter_name=adapter.name, numbers=numbers) for e in events]


@router.post("/{name}/import", response_model=s.TaskImportSubmitted, status_code=202)
def import_adapter(
    services: Services,
    tenant: CurrentTenant,
    user_id: UserId,
    name: AdapterName,
    body: s.TaskImportRequest,
    call: Idempotent,
) -> JSONResponse:
    """Queue an ``import`` job for the user's own PEFT adapter (one exported from lorafleet, or trained
    elsewhere on the same backbone), as ``POST /v1/tasks/{task}/import`` does for a task: the same body, checks
    (safetensors only, shapes, rank, finite values, weight bounds, backbone fingerprint) and 422s; the version is
    registered as a ``candidate`` of the user's adapter ``name`` (created when absent; lineage ``imported``)
    and QA decides under the promote rule. The user is created on first sight; a refusal stores nothing."""

    args = import_args(services, tenant, body)

    def submit() -> s.TaskImportSubmitted:
        return import_submitted(submit_import(**args, user=user_id, adapter=name))

    return call.run(submit, body=body, status_code=202)


def import_args(services: ApiServices, tenant: Tenant, body: s.TaskImportRequest) -> dict[str, Any]:
    """What an import request (a user's or a task's) passes to ``submit_import``: the
    archive (422 naming ``archive_base64`` when it is not base64), prompts, evidence, actor, reason, bounds."""
    try:
        archive = base64.b64decode(body.archive_base64, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError("archive_base64: not valid base64") from None
    return {
        "db": services.db,
        "registry": services.registry,
        "tenant_id": tenant.id,
        "archive": archive,
        "example_prompts": body.example_prompts,
        "actor": actor_of(tenant),
        "reason": body.reason,
        "weight_bounds": import_weight_bounds(services.settings.qa_policy),
        "examples": [e.model_dump() for e in body.examples],
    }


def import_submitted(submitted: ImportSubmitted) -> s.TaskImportSubmitted:
    return s.TaskImportSubmitted(
        job=convert.job(submitted.job), created=submitted.created, archive_sha256=submitted.archive_sha256
    )


@router.post("/{name}/promote", response_model=s.AliasEventOut)
def promote(adapter: UserAdapter, body: s.PromoteRequest, call: Idempotent) -> JSONResponse:
    """Make a version live (the previous live one is archived); a rejected version cannot go live (409). Under
    the promote rule ``qa`` a version QA has not passed needs ``force`` (else 409 ``qa_undecided``, nothing
    changes); a forced promote is recorded as such and QA still evaluates the version (and rolls it back if
    it fails)."""
    services = call.services

    def move(actor: str) -> AliasEvent:
        return promote_manually(
            services.db,
            services.registry,
            tenant_id=call.tenant.id,
            adapter=adapter,
            number=body.version,
            actor=actor,
            reason=body.reason,
            promote_rule=services.settings.promote_rule,
            force=body.force,
            queue=services.queue,
        )

    return move_live(call, adapter, body, move)


@router.post("/{name}/rollback", response_model=s.AliasEventOut)
def rollback(adapter: UserAdapter, body: s.RollbackRequest, call: Idempotent) -> JSONResponse:
    """Move ``live`` back to an earlier version, or to none (``to_version`` null: the base model answers)."""

    def move(actor: str) -> AliasEvent:
        return move_alias(
            registry=call.services.registry,
            queue=call.services.queue,
            tenant_id=call.tenant.id,
            adapter=adapter,
            action="rollback",
            number=body.to_version,
            actor=actor,
            reason=body.reason,
        )

    return move_live(call, adapter, body, move)


def move_live(
    call: IdempotentCall,
    adapter: Adapter,
    body: s.PromoteRequest | s.RollbackRequest,
    move: Callable[[str], AliasEvent],
) -> JSONResponse:
    """A move of the adapter's ``live`` alias (``move(actor)``) behind the request's idempotency key, answered
    as the recorded alias event: promote and rollback of user and task adapters alike."""

    def run() -> s.AliasEventOut:
        return event_out(call.services, adapter, move(actor_of(call.tenant)))

    return call.run(run, body=body)
