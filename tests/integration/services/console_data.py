"""A small fleet for the console's tests, written through the library as training and QA would write it: two
tenants; tenant A's user alice with feedback, two dataset snapshots, two train jobs whose progress kept loss
curves (reported through a real lease), versions v1 and v2 (v2 continued from v1, live), a QA report with a
matrix on v2, a shared task she is enrolled in (its v1 live, with a QA report that evaluated it alone and in
alice's experts), and a job still running."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from api_helpers import sft
from services.api.runtime import ApiServices

from lorafleet.domain import LineageRelation
from lorafleet.jobs.worker import LeaseContext
from lorafleet.qa.reports import store_document
from lorafleet.qa.results import Cell, ColumnInfo, Matrix, RowInfo, Sample
from lorafleet.routing.experts import enrol
from lorafleet.store.sql.feedback import create_snapshot
from lorafleet.store.sql.qa_repository import NewQAReport, QARepository
from lorafleet.workflows.feedback import ingest_feedback

LEASE = 600.0
TRAIN_STEPS = 6


@dataclass(frozen=True)
class Fleet:
    tenant_id: int
    tenant_name: str
    api_key: str
    other_tenant_name: str
    other_key: str
    adapter_id: int
    version_ids: tuple[int, int]
    report_id: int
    running_job_id: int
    task_adapter_id: int
    task_report_id: int


def _trained_job(services: ApiServices, tenant_id: int, user: str, *, finish: bool) -> int:
    """A job of a kind only this fleet queues, claimed and stepped through a real lease (``LeaseContext``'s
    progress reporter keeps the loss curve); finished when ``finish``."""
    queue, kind = services.queue, f"console-{uuid.uuid4().hex[:10]}"
    job = queue.submit(
        tenant_id=tenant_id,
        kind=kind,
        payload={"users": [{"external_id": user, "kind": "user"}]},
        dedupe_key=None,
    ).job
    claimed = queue.claim(worker_id=kind, kinds=[kind], lease_seconds=LEASE)
    assert claimed is not None and claimed.id == job.id
    lease = LeaseContext(queue=queue, job=claimed, worker_id=kind, progress_interval=0)
    lease.report_phase("training")
    steps = TRAIN_STEPS if finish else 2
    for step in range(1, steps + 1):
        lease.report_step(step=step, total=TRAIN_STEPS, losses={user: 3.0 / step}, loss=3.0 / step)
    if finish:
        queue.complete(job_id=job.id, worker_id=kind, result={}, attempt=claimed.attempts)
    return job.id


def _matrix() -> Matrix:
    rows = (RowInfo("alice-holdout", "user-holdout", 2, 2, own=True), RowInfo("probe", "probe", 2, 8))
    columns = (
        ColumnInfo("base", "base"),
        ColumnInfo("previous", "previous"),
        ColumnInfo("candidate", "candidate"),
    )
    sample = (Sample("Say hi", "hi", "hello"),)
    losses = {"alice-holdout": (2.0, 1.6, 1.1), "probe": (1.5, 1.5, 1.9)}
    cells = {
        row: {
            c.name: Cell(loss, 0.5, 10, 2, sample if c.name == "candidate" else ())
            for c, loss in zip(columns, values, strict=True)
        }
        for row, values in losses.items()
    }
    return Matrix(rows, columns, cells)


def build_fleet(services: ApiServices, adapter_folder: Callable[[int], Path]) -> Fleet:
    """``adapter_folder(seed)``: a PEFT folder for the tiny backbone (the session's ``adapter_folder``)."""
    tenants, registry, db = services.tenants, services.registry, services.db
    name = f"console-{uuid.uuid4().hex[:8]}"
    tenant, key = tenants.create_tenant(name=name)
    other, other_key = tenants.create_tenant(name=f"{name}-other")
    ids = ingest_feedback(
        db, tenant_id=tenant.id, user_external_id="alice", records=[sft(f"q{i}") for i in range(4)]
    ).ids
    user = tenants.get_user(tenant_id=tenant.id, external_id="alice")
    adapter = registry.get_or_create_adapter(
        tenant_id=tenant.id, owner_user_id=user.id, name="personal", target_config={}
    )
    versions = []
    for i, records in enumerate((ids[:2], ids)):
        snapshot = create_snapshot(db, user_id=user.id, record_ids=records)
        job_id = _trained_job(services, tenant.id, "alice", finish=True)
        parents = [(versions[-1].id, LineageRelation.CONTINUED_FROM)] if versions else []
        version = registry.register_version(
            tenant_id=tenant.id,
            adapter_id=adapter.id,
            adapter_dir=adapter_folder(i + 1),
            base_fingerprint="tiny",
            parents=parents,
            job_id=job_id,
            dataset_snapshot_id=snapshot.id,
        )
        registry.promote(
            tenant_id=tenant.id,
            adapter_id=adapter.id,
            number=version.number,
            actor="test",
            reason=f"trained v{i + 1}",
        )
        versions.append(version)
    report_id = _qa_report(services, tenant.id, versions[-1].id)
    task = registry.get_or_create_adapter(
        tenant_id=tenant.id, owner_user_id=None, name="summarise", target_config={}
    )
    task_version = registry.register_version(
        tenant_id=tenant.id, adapter_id=task.id, adapter_dir=adapter_folder(9), base_fingerprint="tiny"
    )
    registry.promote(tenant_id=tenant.id, adapter_id=task.id, number=task_version.number, actor="test")
    enrol(db, tenant_id=tenant.id, user_external_id="alice", task_name="summarise", actor="test")
    task_report_id = _qa_report(services, tenant.id, task_version.id, enrolled=["alice"])
    running = _trained_job(services, tenant.id, "alice", finish=False)
    return Fleet(
        tenant.id,
        name,
        key,
        other.name,
        other_key,
        adapter.id,
        (versions[0].id, versions[1].id),
        report_id,
        running,
        task.id,
        task_report_id,
    )


def _qa_report(
    services: ApiServices, tenant_id: int, version_id: int, *, enrolled: Sequence[str] = ()
) -> int:
    """A stored QA report on the version; with ``enrolled``, a task version's: also evaluated in those users'
    experts (the document's ``enrolled`` section, as ``workflows.qa_runner`` writes it), each failing one rule."""
    document: dict[str, object] = {
        "decision": "promote",
        "reasons": ["better on the own holdout"],
        "matrix": _matrix().to_json(),
        "rules": [
            {"rule": "user-holdout", "passed": True, "detail": "loss 1.100 < 1.600"},
            {"rule": "probe", "passed": False, "detail": "probe loss rose 27%"},
        ],
    }
    if enrolled:
        document["enrolled"] = {
            "enrolled_users": len(enrolled),
            "evaluated": list(enrolled),
            "left_out": [],
            "banks": [
                {
                    "user": user,
                    "passed": False,
                    "reasons": [f"gate-no-regression: {user}'s holdout got worse"],
                    "bank": {},
                    "matrix": _matrix().to_json(),
                    "rules": [{"rule": "gate-no-regression", "passed": False, "detail": "loss 1.9 > 1.6"}],
                }
                for user in enrolled
            ],
        }
    blob = store_document(services.registry, document)
    new = NewQAReport(
        tenant_id=tenant_id,
        version_id=version_id,
        kind="candidate",  # type: ignore[arg-type]
        policy_version="test-1",
        decision="promote",  # type: ignore[arg-type]
        reasons=("better on the own holdout",),
        summary={},
        blob_sha256=blob.sha256,
        blob_uri=blob.uri,
        blob_size_bytes=blob.size,
        job_id=None,
    )
    with services.db.session() as session:
        return QARepository(dialect=services.db.dialect).insert_report(session, new=new).id
