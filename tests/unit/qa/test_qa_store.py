"""QA's metadata: report rows (one per job, tenant-scoped), blobs kept by the GC, reports in lineage, the
registry's alias moves inside a caller's transaction, and the jobs that bank changes queue."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorafleet.errors import AlreadyExistsError, NotFoundError
from lorafleet.jobs import JobQueue
from lorafleet.qa.reports import encode_document, load_report, reports_for_version, store_document
from lorafleet.registry import Registry
from lorafleet.routing.experts import enrol
from lorafleet.store.blob import open_blob_store
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.qa_repository import NewQAReport, QARepository
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.workflows.qa_triggers import (
    QA_JOB_KIND,
    candidate_dedupe_key,
    on_bank_changed,
    on_task_adapter_changed,
    recheck_dedupe_key,
    submit_candidate_qa,
)


@pytest.fixture
def registry(database: Database, tmp_path: Path) -> Registry:
    return Registry(database, open_blob_store((tmp_path / "blobs").as_uri()), gc_grace_seconds=0)


def _adapter_dir(path: Path, *, seed: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{key}.lora_A.weight": torch.randn(2, 16, generator=gen),
        f"{key}.lora_B.weight": torch.randn(16, 2),
    }
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


class Tenant:
    """A tenant with users alice and bob, their personal adapters and a task adapter."""

    def __init__(self, db: Database, registry: Registry, tmp: Path, name: str = "acme") -> None:
        tenants = TenantRepository(db)
        self.id = tenants.create_tenant(name=name)[0].id
        self.db, self.registry, self.tmp = db, registry, tmp
        self.users = {
            u: tenants.get_or_create_user(tenant_id=self.id, external_id=u).id for u in ("alice", "bob")
        }
        self.personal = {
            u: registry.create_adapter(
                tenant_id=self.id, owner_user_id=i, name="personal", target_config={}
            ).id
            for u, i in self.users.items()
        }
        self.task = registry.create_adapter(
            tenant_id=self.id, owner_user_id=None, name="task", target_config={}
        ).id

    def version(self, adapter_id: int, *, seed: int, live: bool = False) -> int:
        folder = _adapter_dir(self.tmp / f"{self.id}-{adapter_id}-{seed}", seed=seed)
        version = self.registry.register_version(
            tenant_id=self.id, adapter_id=adapter_id, adapter_dir=folder, base_fingerprint="fp"
        )
        if live:
            self.registry.promote(
                tenant_id=self.id, adapter_id=adapter_id, number=version.number, actor="test"
            )
        return version.id

    def report(self, version_id: int, *, job_id: int | None, document: dict[str, object]) -> int:
        ref = store_document(self.registry, document)
        new = NewQAReport(
            self.id,
            version_id,
            "candidate",
            "p/1",
            "reject",
            ("probe: moved",),
            {"rules": {"probe": False}},
            ref.sha256,
            ref.uri,
            ref.size,
            job_id,
        )
        with self.db.session() as s:
            return QARepository(dialect=self.db.dialect).insert_report(s, new=new).id


def test_reports_are_stored_once_per_job_tenant_scoped_and_kept_by_the_gc(
    database: Database, registry: Registry, tmp_path: Path
) -> None:
    acme, other = Tenant(database, registry, tmp_path), Tenant(database, registry, tmp_path, name="other")
    version_id = acme.version(acme.personal["alice"], seed=1)
    job = JobQueue(database).submit(tenant_id=acme.id, kind=QA_JOB_KIND, payload={}, dedupe_key=None).job
    report_id = acme.report(version_id, job_id=job.id, document={"decision": "reject", "n": 1})
    with pytest.raises(AlreadyExistsError):
        acme.report(version_id, job_id=job.id, document={"decision": "reject", "n": 2})

    report, document = load_report(database, registry, report_id=report_id, tenant_id=acme.id)
    assert (report.job_id, report.reasons, report.summary, document) == (
        job.id,
        ("probe: moved",),
        {"rules": {"probe": False}},
        {"decision": "reject", "n": 1},
    )
    with pytest.raises(NotFoundError):
        load_report(database, registry, report_id=report_id, tenant_id=other.id)
    assert reports_for_version(database, tenant_id=other.id, version_id=version_id) == []

    refused = hashlib.sha256(
        encode_document({"decision": "reject", "n": 2})
    ).hexdigest()  # its row was refused
    orphan = registry.blobs.put_bytes(b"{}")  # a report blob whose row never came (a crash in between)
    assert registry.gc() == sorted([orphan.sha256, refused])
    assert registry.blobs.exists(report.blob_sha256)
    lineage = registry.lineage(tenant_id=acme.id, version_id=version_id)
    assert [r.id for r in lineage.root.qa_reports] == [report_id]


def test_alias_moves_join_the_callers_transaction(
    database: Database, registry: Registry, tmp_path: Path
) -> None:
    acme = Tenant(database, registry, tmp_path)
    adapter_id = acme.personal["alice"]
    first = acme.version(adapter_id, seed=1, live=True)
    acme.version(adapter_id, seed=2)
    with pytest.raises(RuntimeError), database.transaction():
        registry.promote(tenant_id=acme.id, adapter_id=adapter_id, number=2, actor="qa", reason="r")
        raise RuntimeError("the transaction fails after the move")
    live = registry.live_version(tenant_id=acme.id, adapter_id=adapter_id)
    assert live is not None and live.id == first  # rolled back with the caller's transaction
    with database.transaction():
        registry.set_status(tenant_id=acme.id, adapter_id=adapter_id, number=2, status="rejected")
        registry.rollback(tenant_id=acme.id, adapter_id=adapter_id, to_number=None, actor="qa", reason="x")
    assert registry.live_version(tenant_id=acme.id, adapter_id=adapter_id) is None
    assert registry.get_version(tenant_id=acme.id, adapter_id=adapter_id, number=2).status == "rejected"


def test_candidates_and_bank_changes_queue_deduplicated_qa_jobs(
    database: Database, registry: Registry, tmp_path: Path
) -> None:
    acme = Tenant(database, registry, tmp_path)
    queue = JobQueue(database)
    candidate = acme.version(acme.personal["alice"], seed=1)
    with database.transaction():
        first = submit_candidate_qa(queue=queue, tenant_id=acme.id, version_id=candidate)
        again = submit_candidate_qa(queue=queue, tenant_id=acme.id, version_id=candidate)
    assert first.id == again.id and first.dedupe_key == candidate_dedupe_key(candidate)
    assert first.payload == {"version_id": candidate} and queue.job_users(job_id=first.id) == {}

    # only users with a live personal adapter are rechecked; one job per adapter, deduplicated while queued
    assert on_bank_changed(database, tenant_id=acme.id, user_ids=list(acme.users.values()), cause="x") == []
    acme.version(acme.personal["alice"], seed=2, live=True)
    acme.version(acme.personal["bob"], seed=3, live=True)
    (job,) = on_bank_changed(database, tenant_id=acme.id, user_ids=[acme.users["alice"]], cause="enrolled")
    assert job.payload == {"recheck": {"adapter_id": acme.personal["alice"], "cause": "enrolled"}}
    assert job.dedupe_key == recheck_dedupe_key(acme.personal["alice"])

    enrol(database, tenant_id=acme.id, user_external_id="bob", task_name="task", actor="admin")
    jobs = on_task_adapter_changed(database, tenant_id=acme.id, adapter_id=acme.task, cause="task promoted")
    assert [j.payload["recheck"]["adapter_id"] for j in jobs] == [acme.personal["bob"]]
    repeat = on_bank_changed(database, tenant_id=acme.id, user_ids=list(acme.users.values()), cause="y")
    assert sorted(j.id for j in repeat) == sorted([job.id, jobs[0].id])
