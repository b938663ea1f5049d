"""Implementations of the ``lorafleet`` admin and inspection commands, and ``lorafleet serve``.

The admin commands use the library directly (they run where the database is): they open the database and the
object store named by the ``LORAFLEET_*`` settings, do one thing, print it, and close what they opened.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafleet.config import load_settings
from lorafleet.domain import AliasEvent, AuditEvent, UserSummary
from lorafleet.domain.enums import ACTIVE_JOB_STATES, AuditAction, BlobCheck, JobState, VersionStatus, values
from lorafleet.errors import NotFoundError, ValidationError
from lorafleet.feedback import FeedbackLimits
from lorafleet.platform import Platform
from lorafleet.qa.reports import format_report, load_report
from lorafleet.runtime.process import on_stop_signals
from lorafleet.sdk.calls import adapter_archive
from lorafleet.training.config import SERVICE_TRAINING_DEFAULTS
from lorafleet.training.overrides import TenantTraining, get_tenant_training, set_tenant_training
from lorafleet.workflows.audit import list_events
from lorafleet.workflows.blob_verify import verify_blobs
from lorafleet.workflows.import_jobs import import_weight_bounds, submit_import
from lorafleet.workflows.live_alias import move_live, promote_manually
from lorafleet.workflows.tasks import ingest_task_feedback, list_tasks, move_task_live

if TYPE_CHECKING:
    from services.api.runtime import ApiOptions

log = logging.getLogger("lorafleet.cli")

#: who the CLI's changes are in alias histories and the audit log
CLI_ACTOR = "cli"


def _adapter_id(lib: Platform, tenant: str, user: str, adapter: str) -> tuple[int, int]:
    """(tenant id, adapter id) of the user's adapter; NotFound errors name what is missing."""
    t = lib.tenants.get_tenant(name=tenant)
    u = lib.tenants.get_user(tenant_id=t.id, external_id=user)
    found = lib.registry.find_adapter(tenant_id=t.id, owner_user_id=u.id, name=adapter)
    if found is None:
        raise NotFoundError(f"user {user!r} of tenant {tenant!r} has no adapter {adapter!r}")
    return t.id, found.id


def tenants_create(args: argparse.Namespace) -> int:
    with Platform.from_settings() as lib:
        tenant, key = lib.tenants.create_tenant(name=args.name, actor=CLI_ACTOR)
    print(f"tenant {tenant.name!r} (id {tenant.id}) created")
    print(f"api key (shown only now): {key}")
    return 0


def tenants_list(_args: argparse.Namespace) -> int:
    with Platform.from_settings() as lib:
        rows = lib.tenants.list_tenants()
    for t in rows:
        print(f"{t.id:>5}  {t.name}")
    return 0


def tenants_keys(args: argparse.Namespace) -> int:
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.name)
        rows = lib.tenants.list_api_keys(tenant_id=tenant.id)
    print(f"{'id':>5}  {'prefix':12} {'created':20} {'last used':20} revoked")
    for k in rows:
        print(
            f"{k.id:>5}  {k.prefix + '...':12} {_when(k.created_at):20} {_when(k.last_used_at):20} {_when(k.revoked_at)}"
        )
    return 0


def tenants_revoke_key(args: argparse.Namespace) -> int:
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.name)
        key = lib.tenants.revoke_api_key_by_id(tenant_id=tenant.id, key_id=args.key_id, actor=CLI_ACTOR)
    print(f"API key {key.id} ({key.prefix}...) of {tenant.name!r} revoked at {_when(key.revoked_at)}")
    return 0


def _when(at: datetime | None) -> str:
    return "-" if at is None else at.strftime("%Y-%m-%d %H:%M:%S")


def users(args: argparse.Namespace) -> int:
    """A tenant's users by id: live versions, adapter versions, feedback records and the newest one's time."""
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.tenant)
        rows = lib.tenants.list_user_summaries(tenant_id=tenant.id, limit=args.limit, offset=args.offset)
    if args.json:
        print(dump_json([_user_json(u) for u in rows]))
        return 0
    print(f"{'id':>6}  {'user':24} {'versions':>8} {'records':>8}  {'last feedback':19}  live")
    for u in rows:
        live = " ".join(f"{name}:v{number}" for name, number in u.live_versions.items()) or "-"
        print(
            f"{u.id:>6}  {u.external_id:24} {u.version_count:>8} {u.feedback_count:>8}  "
            f"{_when(u.last_feedback_at):19}  {live}"
        )
    return 0


def _user_json(user: UserSummary) -> dict[str, Any]:
    return {
        "external_id": user.external_id,
        "created_at": user.created_at.isoformat(),
        "live_versions": user.live_versions,
        "last_feedback_at": None if user.last_feedback_at is None else user.last_feedback_at.isoformat(),
        "version_count": user.version_count,
        "feedback_count": user.feedback_count,
    }


def audit(args: argparse.Namespace) -> int:
    """The audit log, oldest first: every tenant's (and the admin-wide events), or ``--tenant``'s only."""
    action = _audit_action(args.action)
    with Platform.from_settings() as lib:
        tenant_id = None if args.tenant is None else lib.tenants.get_tenant(name=args.tenant).id
        events = list_events(lib.db, tenant_id=tenant_id, action=action, limit=args.limit, offset=args.offset)
    if args.json:
        print(dump_json([_event_json(e) for e in events]))
        return 0
    for e in events:
        tenant = "-" if e.tenant_id is None else str(e.tenant_id)
        print(f"{e.id:>6}  {_when(e.at):19}  {tenant:>6}  {e.actor:16} {e.action:15} {e.target}")
    return 0


def _audit_action(text: str | None) -> AuditAction | None:
    if text is None:
        return None
    try:
        return AuditAction(text)
    except ValueError:
        raise ValidationError(f"--action: one of {', '.join(values(AuditAction))}, got {text!r}") from None


def _event_json(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.id,
        "tenant_id": event.tenant_id,
        "at": event.at.isoformat(),
        "actor": event.actor,
        "action": str(event.action),
        "target": event.target,
        "details": event.details,
    }


def _metric(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return f"{100 * value:.0f}%" if isinstance(value, int | float) else "-"


def versions(args: argparse.Namespace) -> int:
    with Platform.from_settings() as lib:
        tenant_id, adapter_id = _adapter_id(lib, args.tenant, args.user, args.adapter)
        rows = lib.registry.list_versions(tenant_id=tenant_id, adapter_id=adapter_id)
        live = lib.registry.live_version(tenant_id=tenant_id, adapter_id=adapter_id)
    print(
        f"{'v':>4}  {'status':9} {'live':4}  {'sha256':12}  {'job':>5}  {'holdout acc before/after':24} created"
    )
    for v in rows:
        acc = (
            f"{_metric(v.metrics, 'holdout_sequence_accuracy_before')} / "
            f"{_metric(v.metrics, 'holdout_sequence_accuracy_after')}"
        )
        mark = "*" if live is not None and live.id == v.id else ""
        print(
            f"{v.number:>4}  {v.status:9} {mark:4}  {v.sha256[:12]}  {v.job_id or '-':>5}  {acc:24} "
            f"{v.created_at:%Y-%m-%d %H:%M:%S}"
        )
    corrupt = [f"v{v.number}" for v in rows if v.status == VersionStatus.CORRUPT]
    if corrupt:
        print(
            f"warning: {', '.join(corrupt)} corrupt: the blob failed verification (lorafleet verify); "
            "quarantined, never served"
        )
    return 0


def lineage(args: argparse.Namespace) -> int:
    with Platform.from_settings() as lib:
        tenant_id, adapter_id = _adapter_id(lib, args.tenant, args.user, args.adapter)
        version = lib.registry.get_version(tenant_id=tenant_id, adapter_id=adapter_id, number=args.version)
        found = lib.registry.lineage(tenant_id=tenant_id, version_id=version.id)
    chain = [n.version.number for n in reversed(found.ancestors)] + [found.root.version.number]
    print(f"lineage of {args.user}/{args.adapter} v{args.version}: " + " -> ".join(f"v{n}" for n in chain))
    for node in [*reversed(found.ancestors), found.root, *found.descendants]:
        v = node.version
        print(
            f"  v{v.number:<3} distance {node.distance:>2}  {v.status:9} sha256 {v.sha256[:12]}  "
            f"job {v.job_id or '-'}  snapshot {v.dataset_snapshot_id or '-'}"
        )
    for edge in found.edges:
        print(f"  edge: {edge.child_version_id} <-{edge.relation}- {edge.parent_version_id}")
    return 0


def qa_report(args: argparse.Namespace) -> int:
    """``lorafleet qa report``: a stored QA report as a table (``--tenant``: only if it is that tenant's)."""
    with Platform.from_settings() as lib:
        report, document = load_report(lib.db, lib.registry, report_id=args.report_id, tenant_id=args.tenant)
        print(format_report(report, document), end="")
    return 0


def gc(args: argparse.Namespace) -> int:
    """Run the blob gc once (``Registry.gc``) and print what it deleted."""
    with Platform.from_settings() as lib:
        deleted = lib.registry.gc()
    if args.json:
        print(dump_json({"deleted": deleted}))
        return 0
    for digest in deleted:
        print(digest)
    print(f"deleted {len(deleted)} blobs")
    return 0


def verify(args: argparse.Namespace) -> int:
    """Re-hash every version's blob (one tenant's with ``--tenant``) and print each version's result and the
    counts; ``--repair`` quarantines the corrupt and missing ones (``lorafleet.workflows.blob_verify``). Exit 1
    when a version was found not ok in this run (repaired or not), 0 when every blob checked is fine."""
    with Platform.from_settings() as lib:
        tenant_id = None if args.tenant is None else lib.tenants.get_tenant(name=args.tenant).id
        report = verify_blobs(lib.db, lib.registry, tenant_id=tenant_id, repair=args.repair, actor=CLI_ACTOR)
    if args.json:
        print(dump_json(report.to_json(only_bad=args.only_bad)))
        return 1 if report.problems else 0
    print(f"{'version':40} {'id':>7}  {'status':9} {'blob':11} {'sha256':12}  detail")
    for check in report.checks:
        if args.only_bad and check.result == BlobCheck.OK:
            continue
        detail = check.detail
        if check.repaired:
            moved = ""
            if check.was_live:
                moved = (
                    f"; live rolled back to {'none' if check.live_after is None else f'v{check.live_after}'}"
                )
            detail = f"quarantined{moved}: {detail}"
        print(
            f"{check.label:40} {check.version.id:>7}  {check.status:9} {check.result:11} "
            f"{check.version.sha256[:12]}  {detail}".rstrip()
        )
    counts = report.counts
    print(
        f"checked {counts['checked']} versions ({report.bytes_read} bytes read): {counts['ok']} ok, "
        f"{counts['corrupt']} corrupt, {counts['missing']} missing, {counts['unreadable']} unreadable, "
        f"{counts['quarantined']} already quarantined; {counts['repaired']} quarantined now"
    )
    bad = [c for c in report.problems if c.result.bad and not c.repaired]
    if bad and not args.repair:
        print("run `lorafleet verify --repair` to quarantine the bad versions (and roll live ones back)")
    return 1 if report.problems else 0


def rollback(args: argparse.Namespace) -> int:
    target = _rollback_target(args.to)
    with Platform.from_settings() as lib:
        tenant_id, adapter_id = _adapter_id(lib, args.tenant, args.user, args.adapter)
        move_live(
            registry=lib.registry,
            queue=lib.queue,
            tenant_id=tenant_id,
            adapter=lib.registry.get_adapter(tenant_id=tenant_id, adapter_id=adapter_id),
            action="rollback",
            number=target,
            actor=CLI_ACTOR,
            reason=args.reason,
        )
        live = lib.registry.live_version(tenant_id=tenant_id, adapter_id=adapter_id)
    now = f"v{live.number}" if live else "none (base model)"
    print(f"rolled back {args.user}/{args.adapter}: live is now {now} (reason: {args.reason!r})")
    return 0


def promote(args: argparse.Namespace) -> int:
    """Make a version of a user's adapter live; under the promote rule ``qa`` a version QA has not passed needs
    ``--force`` (recorded in the history; QA then evaluates it and rolls it back if it fails)."""
    with Platform.from_settings() as lib:
        tenant_id, adapter_id = _adapter_id(lib, args.tenant, args.user, args.adapter)
        adapter = lib.registry.get_adapter(tenant_id=tenant_id, adapter_id=adapter_id)
        event = promote_manually(
            lib.db,
            lib.registry,
            tenant_id=tenant_id,
            adapter=adapter,
            number=args.version,
            actor=CLI_ACTOR,
            reason=args.reason,
            promote_rule=lib.settings.promote_rule,
            force=args.force,
        )
    forced = " (forced: QA has not passed it; its QA job is queued)" if event.forced else ""
    print(
        f"promoted {args.user}/{args.adapter}: live is now v{args.version}{forced} (reason: {args.reason!r})"
    )
    return 0


def serve_options(args: argparse.Namespace) -> ApiOptions:
    """The ``ApiOptions`` that ``lorafleet serve``'s arguments ask for."""
    from services.api.runtime import ApiOptions  # the web stack: see ``serve``

    return ApiOptions(
        run_scheduler=not args.no_scheduler,
        scheduler_interval=args.scheduler_interval,
        run_workers=args.workers,
        preload_engine=args.preload_engine,
        serving_threads=args.serving_threads,
        migrate=not args.no_migrate,
        training=SERVICE_TRAINING_DEFAULTS,  # under every tenant's overrides
    )


def serve(args: argparse.Namespace) -> int:
    """The API, the scheduler loop and ``--workers`` Ray trainer actors in one process, until SIGINT/SIGTERM."""
    # the web stack (FastAPI, uvicorn and the API built on them) is imported here, not at the top: only this
    # command serves HTTP, and the other admin commands should not pay for loading it
    import uvicorn
    from services.api.app import create_app

    settings = load_settings()
    options = serve_options(args)
    log.info(
        "serving on http://%s:%d: database %s, object store %s, ray %s, %d trainer actor(s)",
        args.host,
        args.port,
        settings.resolved_database_url.split("@")[-1],
        settings.resolved_object_store_url,
        settings.ray_address or "local (loopback)",
        args.workers,
    )
    app = create_app(settings, options=options)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", lifespan="on")
    server = uvicorn.Server(config)

    def stop(signum: int) -> None:
        log.info("signal %d: shutting down (stopping the scheduler and the trainer actors)", signum)
        server.should_exit = True

    on_stop_signals(stop)
    server.run()
    log.info("stopped")
    return 0


# --- shared task adapters ------------------------------------------------------------------------------------
def tasks_list(args: argparse.Namespace) -> int:
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.tenant)
        found = list_tasks(lib.db, tenant_id=tenant.id)
    print(f"{'task':<24} {'live':>5} {'versions':>8} {'enrolled':>8} {'records':>8}")
    for t in found:
        live = "-" if t.live_version is None else str(t.live_version)
        print(f"{t.name:<24} {live:>5} {t.versions:>8} {t.enrolled_users:>8} {t.feedback_records:>8}")
    return 0


def _read_lines(path: str) -> list[str]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def tasks_feedback(args: argparse.Namespace) -> int:
    records = []
    for number, line in enumerate(_read_lines(args.file), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{args.file} line {number}: not JSON ({exc.msg})") from None
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.tenant)
        result = ingest_task_feedback(
            lib.db,
            tenant_id=tenant.id,
            task_name=args.task,
            records=records,
            limits=FeedbackLimits.from_settings(lib.settings),
        )
    print(f"task {args.task!r}: {result.created} records stored, {result.duplicates} duplicates")
    return 0


def tasks_import(args: argparse.Namespace) -> int:
    """Queue the import job (trainers run it: ``lorafleet serve`` or ``lorafleet workers``), optionally wait."""
    prompts = list(args.prompt) + (_read_lines(args.prompts_file) if args.prompts_file else [])
    if not Path(args.source).exists():
        raise ValidationError(f"source: {args.source} does not exist")
    archive = adapter_archive(args.source)
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.tenant)
        submitted = submit_import(
            lib.db,
            lib.registry,
            tenant_id=tenant.id,
            task_name=args.task,
            archive=archive,
            example_prompts=prompts,
            actor=CLI_ACTOR,
            reason=args.reason,
            weight_bounds=import_weight_bounds(lib.settings.qa_policy),
        )
        job = submitted.job
        print(f"import job {job.id} {'queued' if submitted.created else 'already queued'} ({job.state})")
        deadline = time.monotonic() + args.wait
        queue = lib.queue
        while args.wait > 0 and job.state in ACTIVE_JOB_STATES and time.monotonic() < deadline:
            time.sleep(1.0)
            job = queue.get(tenant_id=tenant.id, job_id=job.id)
            log.info("import job %d: %s", job.id, job.state)
    if job.state == JobState.SUCCEEDED and job.result:
        print(f"task {args.task!r}: version {job.result.get('number')} registered (a candidate: QA decides)")
    elif job.state == JobState.FAILED:
        print(f"import job {job.id} failed: {job.error}")
        return 1
    return 0


def tasks_promote(args: argparse.Namespace) -> int:
    """Make a task version live (enrolled users are rechecked); ``--force`` as for ``promote``."""
    event = _move_task_live(args, to_number=args.version, action="promote", force=args.force)
    forced = " (forced: QA has not passed it; its QA job is queued)" if event.forced else ""
    print(f"task {args.task!r}: live is now version {args.version}{forced}")
    return 0


def tasks_rollback(args: argparse.Namespace) -> int:
    """Move a task's live version back to ``--to`` (a version number, or ``none``); enrolled users follow."""
    event = _move_task_live(args, to_number=_rollback_target(args.to), action="rollback")
    print(f"task {args.task!r}: live moved from version id {event.from_version_id} to {event.to_version_id}")
    return 0


def _move_task_live(
    args: argparse.Namespace, *, to_number: int | None, action: str, force: bool = False
) -> AliasEvent:
    """``workflows.tasks.move_task_live`` for ``args.task`` of the tenant named ``args.tenant``, by ``cli``, with
    ``args.reason`` and the configured promote rule (which only a promote reads)."""
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.tenant)
        return move_task_live(
            lib.db,
            lib.registry,
            tenant_id=tenant.id,
            task_name=args.task,
            to_number=to_number,
            action=action,
            actor=CLI_ACTOR,
            reason=args.reason,
            promote_rule=lib.settings.promote_rule,
            force=force,
        )


def _rollback_target(text: str) -> int | None:
    """``--to``: a version number, or ``none`` (no adapter at all)."""
    if text.lower() == "none":
        return None
    if text.isdigit():
        return int(text)
    raise ValidationError(f"--to: a version number or 'none', got {text!r}")


# --- training config -----------------------------------------------------------------------------------------
def training_config_show(args: argparse.Namespace) -> int:
    """A tenant's training overrides and effective config (``TrainingConfig`` defaults + overrides), as JSON."""
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.tenant)
        found = get_tenant_training(lib.db, tenant_id=tenant.id)
        print(dump_json(_training_view(tenant.name, found, max_rank=lib.settings.trainer_max_rank)))
    return 0


def training_config_set(args: argparse.Namespace) -> int:
    """Replace a tenant's training overrides with a JSON object (``--reset``: none); prints the result."""
    if args.reset == (args.overrides is not None):
        raise ValidationError("overrides: give a JSON object of TrainingConfig fields, or --reset")
    overrides = {} if args.reset else _json_value("overrides", args.overrides)
    with Platform.from_settings() as lib:
        tenant = lib.tenants.get_tenant(name=args.tenant)
        max_rank = lib.settings.trainer_max_rank
        stored = set_tenant_training(lib.db, tenant_id=tenant.id, overrides=overrides, max_rank=max_rank)
        print(dump_json(_training_view(tenant.name, stored, max_rank=max_rank)))
    return 0


def _json_value(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{name}: not JSON ({exc})") from None


def _training_view(tenant: str, found: TenantTraining, *, max_rank: int) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "overrides": found.overrides,
        "effective": found.effective.model_dump(mode="json"),
        "max_rank": max_rank,
    }


def dump_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
