"""What each console page shows, read through the same library calls as the API's routes (registry, job queue,
QA reports, tasks, enrolments); the templates only lay it out. Every read is scoped to the signed-in tenant, so
another tenant's user, adapter, version, report or job is ``NotFoundError`` (404) exactly as in the API."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from lorafleet.domain import (
    Adapter,
    AdapterVersion,
    AliasEvent,
    DeletionKind,
    DeletionReceipt,
    Job,
    JobState,
    Tenant,
    User,
)
from lorafleet.domain.subject import Subject
from lorafleet.errors import NotFoundError
from lorafleet.qa.reports import load_report, reports_for_version
from lorafleet.qa.results import BASE, Matrix
from lorafleet.routing.experts import list_enrolments
from lorafleet.store.sql.qa_repository import QAReport
from lorafleet.workflows import deletion
from lorafleet.workflows.live_alias import VersionQA
from lorafleet.workflows.tasks import TaskInfo, enrolled_users, get_task_adapter, list_tasks
from services.api.routes.adapters import adapter_versions_qa
from services.api.runtime import ApiServices
from services.console.charts import CurveChart, Graph, LineageVersion, heat_colour, lineage_graph, loss_chart

#: users shown on the overview (one page of the users listing)
OVERVIEW_USERS = 200
#: jobs listed per state on the overview
OVERVIEW_JOBS = 50


# --- the tenant overview --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UserRow:
    external_id: str
    live: dict[str, int]
    last_feedback_at: datetime | None
    feedback_count: int
    #: newest feedback minus the time the live version was made (None: nothing live or no feedback)
    behind: timedelta | None
    #: the newest version of each adapter with its QA state, e.g. ``personal v3: failed (reject)``
    qa: list[str]

    @property
    def freshness(self) -> str:
        if self.behind is None:
            return "no live version" if not self.live else "no feedback"
        if self.behind <= timedelta(0):
            return "current"
        return f"{_duration(self.behind)} of feedback not in the live version"


@dataclass(frozen=True)
class TaskRow:
    info: TaskInfo
    users: list[str]


@dataclass(frozen=True)
class Overview:
    users: list[UserRow]
    running: list[Job]
    queued: list[Job]
    tasks: list[TaskRow]


def overview(services: ApiServices, tenant: Tenant) -> Overview:
    summaries = services.tenants.list_user_summaries(tenant_id=tenant.id, limit=OVERVIEW_USERS)
    rows = [
        _user_row(
            services, tenant, s.id, s.external_id, s.live_versions, s.last_feedback_at, s.feedback_count
        )
        for s in summaries
    ]
    queue = services.queue
    running = queue.list_jobs(tenant_id=tenant.id, state=JobState.RUNNING, limit=OVERVIEW_JOBS)
    queued = queue.list_jobs(tenant_id=tenant.id, state=JobState.QUEUED, limit=OVERVIEW_JOBS)
    tasks = [
        TaskRow(t, enrolled_users(services.db, tenant_id=tenant.id, task_name=t.name))
        for t in list_tasks(services.db, tenant_id=tenant.id)
    ]
    return Overview(rows, running, queued, tasks)


def _user_row(
    services: ApiServices,
    tenant: Tenant,
    user_id: int,
    external_id: str,
    live: Mapping[str, int],
    last_feedback_at: datetime | None,
    feedback_count: int,
) -> UserRow:
    registry = services.registry
    behind: timedelta | None = None
    qa: list[str] = []
    for adapter in registry.list_adapters(tenant_id=tenant.id, owner_user_id=user_id):
        versions = registry.list_versions(tenant_id=tenant.id, adapter_id=adapter.id)
        if not versions:
            continue
        newest = versions[-1]
        state = adapter_versions_qa(services, adapter, [newest])[newest.id]
        decision = "" if state.decision is None else f" ({state.decision})"
        qa.append(f"{adapter.name} v{newest.number}: {state.state}{decision}")
        serving = registry.live_version(tenant_id=tenant.id, adapter_id=adapter.id)
        if serving is not None and last_feedback_at is not None:
            lag = last_feedback_at - serving.created_at
            behind = lag if behind is None else max(behind, lag)
    return UserRow(external_id, dict(live), last_feedback_at, feedback_count, behind, qa)


def _duration(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} days"


# --- a user's page --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionRow:
    version: AdapterVersion
    qa: VersionQA
    reports: list[QAReport]
    live: bool


@dataclass(frozen=True)
class HistoryRow:
    event: AliasEvent
    from_number: int | None
    to_number: int | None


@dataclass(frozen=True)
class TrainingRun:
    """The job that made a version, with the loss curves its progress kept."""

    version_number: int
    job: Job
    chart: CurveChart | None


@dataclass(frozen=True)
class AdapterPanel:
    """What a user's page and a task's page show alike of one adapter: its versions with their QA, ``live``, the
    lineage graph, the training runs and the alias history. ``path`` is the adapter's console path, under which
    its forms post (``/promote``, ``/rollback``) and its QA reports are (``/versions/{n}/qa``)."""

    adapter: Adapter
    path: str
    versions: list[VersionRow]
    live: AdapterVersion | None
    history: list[HistoryRow]
    graph: Graph | None
    runs: list[TrainingRun]


def adapter_panel(
    services: ApiServices, tenant: Tenant, adapter: Adapter, subject: Subject, path: str
) -> AdapterPanel:
    """The panel of ``adapter``, whose training runs show ``subject``'s loss curve (its user's or its task's)."""
    registry = services.registry
    versions = registry.list_versions(tenant_id=tenant.id, adapter_id=adapter.id)
    qa = adapter_versions_qa(services, adapter, versions)
    live = registry.live_version(tenant_id=tenant.id, adapter_id=adapter.id)
    rows = [
        VersionRow(
            v,
            qa[v.id],
            reports_for_version(services.db, tenant_id=tenant.id, version_id=v.id),
            live is not None and live.id == v.id,
        )
        for v in reversed(versions)
    ]
    numbers = {v.id: v.number for v in versions}
    history = [
        HistoryRow(e, numbers.get(e.from_version_id or 0), numbers.get(e.to_version_id or 0))
        for e in reversed(registry.alias_history(tenant_id=tenant.id, adapter_id=adapter.id))
    ]
    graph = _graph(services, tenant, adapter, versions, qa)
    return AdapterPanel(adapter, path, rows, live, history, graph, _runs(services, tenant, subject, versions))


def user_path(external_id: str) -> str:
    return f"/users/{quote(external_id, safe='')}"


def task_path(name: str) -> str:
    return f"/tasks/{quote(name, safe='')}"


def adapter_path(external_id: str, adapter_name: str) -> str:
    """A user's adapter's console path (its forms and QA reports are under it)."""
    return f"{user_path(external_id)}/adapters/{quote(adapter_name, safe='')}"


@dataclass(frozen=True)
class UserPage:
    user: User
    adapters: list[Adapter]
    #: the adapter shown (None: the user has none yet)
    panel: AdapterPanel | None
    enrolments: list[str] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    #: the user's deletion receipts (their records forgotten), newest first
    receipts: list[DeletionReceipt] = field(default_factory=list)


def user_page(services: ApiServices, tenant: Tenant, external_id: str, adapter_name: str | None) -> UserPage:
    """The user's adapter ``adapter_name`` (their first adapter when None); NotFoundError for another tenant's
    user or an adapter the user does not have."""
    user = services.tenants.get_user(tenant_id=tenant.id, external_id=external_id)
    adapters = services.registry.list_adapters(tenant_id=tenant.id, owner_user_id=user.id)
    enrolments = [
        e.task_name for e in list_enrolments(services.db, tenant_id=tenant.id, user_external_id=external_id)
    ]
    jobs = services.queue.list_jobs(tenant_id=tenant.id, user_external_id=external_id, limit=20)
    subject = Subject.user(external_id)
    receipts = deletion.list_receipts(services.db, tenant_id=tenant.id, subject=subject, limit=20)
    adapter = _pick(adapters, adapter_name)
    panel = (
        None
        if adapter is None
        else adapter_panel(services, tenant, adapter, subject, adapter_path(external_id, adapter.name))
    )
    return UserPage(user, adapters, panel, enrolments, jobs, receipts)


@dataclass(frozen=True)
class TaskPage:
    info: TaskInfo
    panel: AdapterPanel
    #: the enrolled users' ids, sorted
    users: list[str]
    #: the jobs that trained the task's dataset, newest first
    jobs: list[Job]
    #: the task's deletion receipts (records of its dataset forgotten), newest first
    receipts: list[DeletionReceipt]


def task_page(services: ApiServices, tenant: Tenant, name: str) -> TaskPage:
    """The tenant's shared task adapter ``name``; NotFoundError for a task the tenant does not have."""
    adapter = get_task_adapter(services.registry, tenant_id=tenant.id, task_name=name)
    subject = Subject.task(adapter.name)
    [info] = [t for t in list_tasks(services.db, tenant_id=tenant.id) if t.adapter_id == adapter.id]
    return TaskPage(
        info,
        adapter_panel(services, tenant, adapter, subject, task_path(adapter.name)),
        enrolled_users(services.db, tenant_id=tenant.id, task_name=adapter.name),
        services.queue.list_jobs(tenant_id=tenant.id, user_external_id=subject.external_id, limit=20),
        deletion.list_receipts(services.db, tenant_id=tenant.id, subject=subject, limit=20),
    )


@dataclass(frozen=True)
class ReceiptPage:
    """A deletion's receipt and where its rebuild stands."""

    receipt: DeletionReceipt
    rebuild: deletion.RebuildStatus
    #: the subject's console page when it still has one (a user whose records were forgotten, or a task)
    subject_path: str | None


def receipt_page(services: ApiServices, tenant: Tenant, receipt_id: str) -> ReceiptPage:
    """The tenant's receipt ``receipt_id``; NotFoundError for another tenant's (as ``GET /v1/deletions/{id}``)."""
    receipt = deletion.get_receipt(services.db, tenant_id=tenant.id, receipt_id=receipt_id)
    status = deletion.rebuild_status(services.db, services.registry, receipt=receipt, queue=services.queue)
    path = None
    if receipt.kind == DeletionKind.RECORDS:
        kind, _, name = receipt.subject.partition(":")
        path = user_path(name) if kind == "user" else task_path(name) if kind == "task" else None
    return ReceiptPage(receipt, status, path)


def _pick(adapters: Sequence[Adapter], name: str | None) -> Adapter | None:
    if name is None:
        return adapters[0] if adapters else None
    for adapter in adapters:
        if adapter.name == name:
            return adapter
    raise NotFoundError(f"adapter {name!r} not found")


def _graph(
    services: ApiServices,
    tenant: Tenant,
    adapter: Adapter,
    versions: Sequence[AdapterVersion],
    qa: Mapping[int, VersionQA],
) -> Graph | None:
    """Every version of the adapter and what its lineage reaches (an import's source in another adapter)."""
    registry = services.registry
    seen: dict[int, LineageVersion] = {}
    edges: set[tuple[int, int, str]] = set()
    snapshots: dict[int, tuple[int, int]] = {}
    jobs: dict[int, tuple[int, str]] = {}
    names: dict[int, str] = {adapter.id: adapter.name}
    for version in reversed(versions):
        if version.id in seen:
            continue
        found = registry.lineage(tenant_id=tenant.id, version_id=version.id)
        for node in (found.root, *found.ancestors, *found.descendants):
            v = node.version
            if v.adapter_id not in names:
                names[v.adapter_id] = registry.get_adapter(tenant_id=tenant.id, adapter_id=v.adapter_id).name
            own = v.adapter_id == adapter.id
            state = qa[v.id].state if own and v.id in qa else _state_of(node.qa_reports)
            seen[v.id] = LineageVersion(v.id, f"{names[v.adapter_id]} v{v.number}", str(v.status), state, own)
            if node.dataset_snapshot is not None:
                snapshots[v.id] = (node.dataset_snapshot.id, node.dataset_snapshot.record_count)
            if node.job is not None:
                jobs[v.id] = (node.job.id, str(node.job.state))
        edges.update((e.child_version_id, e.parent_version_id, str(e.relation)) for e in found.edges)
    if not seen:
        return None
    return lineage_graph(list(seen.values()), edges=sorted(edges), snapshots=snapshots, jobs=jobs)


def _state_of(reports: Sequence[QAReport]) -> str:
    return VersionQA(reports[-1].decision if reports else None).state


def _runs(
    services: ApiServices, tenant: Tenant, subject: Subject, versions: Sequence[AdapterVersion]
) -> list[TrainingRun]:
    """The jobs that made the versions (newest first), each with ``subject``'s loss curve (or every subject's
    when the job's curves do not name it)."""
    label = subject.label
    runs = []
    for version in reversed(versions):
        if version.job_id is None:
            continue
        try:
            job = services.queue.get(tenant_id=tenant.id, job_id=version.job_id)
        except NotFoundError:
            continue
        curves: dict[str, Any] = dict((job.progress or {}).get("curves") or {})
        mine = {label: curves[label]} if label in curves else curves
        runs.append(TrainingRun(version.number, job, loss_chart(mine)))
    return runs


# --- a QA report ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeatCell:
    text: str
    colour: str
    title: str


@dataclass(frozen=True)
class HeatRow:
    name: str
    kind: str
    examples: str
    cells: list[HeatCell]


@dataclass(frozen=True)
class EnrolledBank:
    """A task version's evaluation in one enrolled user's experts (a task's QA report evaluates it in a sample
    of them, each against the candidate rules)."""

    user: str
    passed: bool
    reasons: list[str]
    columns: list[str]
    heat: list[HeatRow]
    rules: list[dict[str, Any]]


@dataclass(frozen=True)
class QAPage:
    adapter: Adapter
    version: AdapterVersion
    #: where the page links back to: the adapter's place on its user's or its task's page, and its label
    back_path: str
    back_label: str
    reports: list[QAReport]
    report: QAReport
    document: dict[str, Any]
    columns: list[str]
    heat: list[HeatRow]
    rules: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    answers: list[dict[str, Any]]
    #: a task version's evaluations in enrolled users' experts (empty for a user's adapter)
    enrolled: list[EnrolledBank] = field(default_factory=list)


def qa_page(
    services: ApiServices,
    tenant: Tenant,
    adapter: Adapter,
    number: int,
    report_id: int | None,
    *,
    back_path: str,
    back_label: str,
) -> QAPage:
    """Version ``number`` of ``adapter`` (the tenant's), its QA report ``report_id`` (its latest when None);
    NotFoundError when the version has none, or the report is another version's."""
    registry = services.registry
    version = registry.get_version(tenant_id=tenant.id, adapter_id=adapter.id, number=number)
    reports = reports_for_version(services.db, tenant_id=tenant.id, version_id=version.id)
    chosen = [r for r in reports if report_id is None or r.id == report_id]
    if not chosen:
        raise NotFoundError(
            f"QA report {report_id} not found" if report_id else "the version has no QA report"
        )
    report, document = load_report(services.db, registry, report_id=chosen[-1].id, tenant_id=tenant.id)
    matrix = _matrix_of(document)
    enrolled = document.get("enrolled")
    banks = enrolled.get("banks", []) if isinstance(enrolled, Mapping) else []
    return QAPage(
        adapter,
        version,
        back_path,
        back_label,
        reports,
        report,
        document,
        [] if matrix is None else matrix.column_names(),
        [] if matrix is None else _heat(matrix),
        _rules(document),
        [] if matrix is None else _samples(matrix),
        [] if matrix is None or matrix.answers is None else _answers(matrix),
        [_enrolled_bank(b) for b in banks if isinstance(b, Mapping)],
    )


def _matrix_of(document: Mapping[str, Any]) -> Matrix | None:
    return Matrix.from_json(document["matrix"]) if document.get("matrix") else None


def _rules(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(r) for r in document.get("rules", []) if isinstance(r, Mapping)]


def _enrolled_bank(bank: Mapping[str, Any]) -> EnrolledBank:
    matrix = _matrix_of(bank)
    return EnrolledBank(
        str(bank.get("user", "")),
        bool(bank.get("passed")),
        [str(r) for r in bank.get("reasons", [])],
        [] if matrix is None else matrix.column_names(),
        [] if matrix is None else _heat(matrix),
        _rules(bank),
    )


def _heat(matrix: Matrix) -> list[HeatRow]:
    """Rows: evaluation sets; cells: loss and token accuracy, coloured against the base model's loss."""
    rows = []
    for row in matrix.rows:
        base = matrix.cell(row.name, BASE)
        base_loss = None if base is None else base.loss
        cells = []
        for column in matrix.column_names():
            cell = matrix.cell(row.name, column)
            if cell is None or cell.loss != cell.loss:
                cells.append(HeatCell("–", "#eeeeee", f"{row.name} × {column}: no examples"))
                continue
            text = f"{cell.loss:.3f} / {cell.token_accuracy:.0%}"
            title = f"{row.name} × {column}: loss {cell.loss:.4f}, token accuracy {cell.token_accuracy:.1%}"
            cells.append(HeatCell(text, heat_colour(cell.loss, base_loss), title))
        label = "own holdout" if row.own else row.kind
        rows.append(HeatRow(row.name, label, f"{row.examples}/{row.total}", cells))
    return rows


def _samples(matrix: Matrix) -> list[dict[str, Any]]:
    """The greedy samples of every cell that kept some: set, configuration, prompt, expected and output."""
    return [
        {"row": r, "column": c, "prompt": s.prompt, "expected": s.expected, "output": s.output}
        for r, columns in matrix.cells.items()
        for c, cell in columns.items()
        for s in cell.samples
    ]


def _answers(matrix: Matrix) -> list[dict[str, Any]]:
    answers = matrix.answers
    assert answers is not None
    return [
        {
            "prompt": item.prompt,
            "expected": item.expected,
            "subject": item.outputs.get(answers.subject, ""),
            "reference": item.outputs.get(answers.reference, ""),
            "subject_name": answers.subject,
            "reference_name": answers.reference,
        }
        for item in answers.items
    ]


__all__ = [
    "AdapterPanel",
    "Overview",
    "QAPage",
    "ReceiptPage",
    "TaskPage",
    "UserPage",
    "adapter_panel",
    "overview",
    "qa_page",
    "receipt_page",
    "task_page",
    "user_page",
]
