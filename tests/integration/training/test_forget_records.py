"""Forgetting records (``lorafleet.workflows.deletion``) over SQLite and PostgreSQL: the versions whose snapshots
hold a deleted record (new or replayed) and their descendants are revoked, ``live`` goes back to the newest clean
version, the receipt lists exactly what changed, the rebuild is queued, bad input changes nothing, the blobs go
after the grace (local directory and moto S3), and a training job that read a deleted record registers nothing.

Versions are registered directly from random PEFT folders (no training) except where a job is the point."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from continual_helpers import TINY_TRAINING, feed_users, get_job, tiny_tenant
from tests.lora_weights import write_random_peft_folder

from lorafleet.domain import (
    UNSERVABLE_STATUSES,
    AdapterVersion,
    AuditAction,
    DeletionReceipt,
    Job,
    LineageRelation,
)
from lorafleet.domain.subject import Subject
from lorafleet.errors import InvalidStateError, NotFoundError, ValidationError
from lorafleet.jobs import JobQueue, JobWorker, Scheduler, SchedulerPolicy
from lorafleet.registry import Registry
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.feedback import create_snapshot, get_snapshot, read_backlog
from lorafleet.store.sql.qa_repository import QARepository
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.training.overrides import set_tenant_training
from lorafleet.training.trainer import train_slots
from lorafleet.workflows.audit import list_events
from lorafleet.workflows.blob_verify import verify_blobs
from lorafleet.workflows.continual import PERSONAL_ADAPTER, ContinualTrainer
from lorafleet.workflows.deletion import RecordSelection, forget_records, get_receipt, rebuild_status
from lorafleet.workflows.erasure import forget_user
from lorafleet.workflows.feedback import ingest_feedback, list_feedback


@pytest.fixture(scope="session")
def peft_folders(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five real PEFT folders for the tiny backbone with different weights (so different blobs)."""
    root = tmp_path_factory.mktemp("forget-peft")
    return [write_random_peft_folder("builtin:tiny", data_dir, root / f"s{i}", seed=i) for i in range(5)]


def _version(
    registry: Registry,
    db: Database,
    *,
    tenant_id: int,
    adapter_id: int,
    user_id: int,
    folder: Path,
    records: Sequence[int],
    parent: AdapterVersion | None,
    live: bool = True,
) -> AdapterVersion:
    """A version trained (as its snapshot says) on ``records``, continued from ``parent``; made live."""
    snapshot = create_snapshot(db, user_id=user_id, record_ids=records)
    version = registry.register_version(
        tenant_id=tenant_id,
        adapter_id=adapter_id,
        adapter_dir=folder,
        base_fingerprint="tiny",
        parents=[] if parent is None else [(parent.id, LineageRelation.CONTINUED_FROM)],
        dataset_snapshot_id=snapshot.id,
    )
    if live:
        registry.promote(tenant_id=tenant_id, adapter_id=adapter_id, number=version.number, actor="test")
    return registry.get_version_by_id(tenant_id=tenant_id, version_id=version.id)


def _three_versions(
    db: Database, registry: Registry, tenant_id: int, folders: list[Path]
) -> tuple[list[int], list[AdapterVersion], int]:
    """ann's 9 records and versions 1 (records 1-3), 2 (4-6 + replayed 2), 3 (7-9 + replayed 5), each
    continued from the previous; 3 is live. Returns the record ids, the versions and the adapter id."""
    ids = feed_users(db, tenant_id=tenant_id, users=["ann"], round=1, n_records=9)["ann"]
    user = TenantRepository(db).get_user(tenant_id=tenant_id, external_id="ann")
    adapter = registry.get_or_create_adapter(
        tenant_id=tenant_id, owner_user_id=user.id, name=PERSONAL_ADAPTER, target_config={}
    )
    kw: dict[str, Any] = {"tenant_id": tenant_id, "adapter_id": adapter.id, "user_id": user.id}
    v1 = _version(registry, db, folder=folders[0], records=ids[0:3], parent=None, **kw)
    v2 = _version(registry, db, folder=folders[1], records=[*ids[3:6], ids[1]], parent=v1, **kw)
    v3 = _version(registry, db, folder=folders[2], records=[*ids[6:9], ids[4]], parent=v2, **kw)
    return ids, [v1, v2, v3], adapter.id


def _servable_snapshots_hold(
    db: Database, registry: Registry, tenant_id: int, adapter_id: int, rid: int
) -> bool:
    for v in registry.list_versions(tenant_id=tenant_id, adapter_id=adapter_id):
        if v.status in UNSERVABLE_STATUSES or v.dataset_snapshot_id is None:
            continue
        if rid in (get_snapshot(db, snapshot_id=v.dataset_snapshot_id).record_ids or ()):
            return True
    return False


def _forget_ids(
    db: Database, registry: Registry, tenant_id: int, user: str, ids: list[int], **options: Any
) -> DeletionReceipt:
    """``forget_records`` of the records ``ids`` of ``user``, by ``test`` (``options``: e.g. ``purge``)."""
    return forget_records(
        db,
        registry,
        tenant_id=tenant_id,
        subject=Subject.user(user),
        selection=RecordSelection.parse(ids=ids),
        actor="test",
        **options,
    )


def test_forgetting_a_replayed_record_revokes_its_versions_and_descendants_and_rolls_live_back(
    database: Database, registry: Registry, tenant_id: int, peft_folders: list[Path]
) -> None:
    ids, (v1, v2, v3), adapter_id = _three_versions(database, registry, tenant_id, peft_folders)
    forgotten = ids[4]  # new in version 2, replayed in version 3
    hashes = {
        r.id: r.content_hash for r in list_feedback(database, tenant_id=tenant_id, user_external_id="ann")
    }
    assert _servable_snapshots_hold(database, registry, tenant_id, adapter_id, forgotten)
    for v in (v1, v2, v3):  # routing keys and claims, as training stores them (derived from the prompts)
        registry.set_routing_key(tenant_id=tenant_id, version_id=v.id, key=[1.0, 0.0], claim=[0.5, 0.5, -1.0])

    asked = datetime.now(UTC)
    receipt = _forget_ids(database, registry, tenant_id, "ann", [forgotten])
    answered = datetime.now(UTC)

    statuses = [v.status for v in registry.list_versions(tenant_id=tenant_id, adapter_id=adapter_id)]
    assert statuses == ["live", "revoked", "revoked"]
    routing = {
        v.id: database.run(QARepository(dialect=database.dialect).routing, version_id=v.id)
        for v in (v1, v2, v3)
    }
    # a revoked version's key and claim, computed from the forgotten prompts, are erased; the live one's stay
    assert routing == {v1.id: ((1.0, 0.0), (0.5, 0.5, -1.0)), v2.id: (None, None), v3.id: (None, None)}
    assert not _servable_snapshots_hold(database, registry, tenant_id, adapter_id, forgotten)
    last = registry.alias_history(tenant_id=tenant_id, adapter_id=adapter_id)[-1]
    assert (last.from_version_id, last.to_version_id, last.reason) == (v3.id, v1.id, "records-deleted")
    assert forgotten not in [
        r.id for r in list_feedback(database, tenant_id=tenant_id, user_external_id="ann")
    ]
    # the receipt lists exactly what changed
    assert receipt.subject == "user:ann" and receipt.kind == "records" and receipt.actor == "test"
    assert receipt.request == {"ids": [forgotten]}
    assert receipt.record_hashes == (hashes[forgotten],)
    assert receipt.revoked_versions == (
        {"adapter": "personal", "number": 2, "version_id": v2.id, "sha256": v2.sha256},
        {"adapter": "personal", "number": 3, "version_id": v3.id, "sha256": v3.sha256},
    )
    assert receipt.blobs == tuple(sorted({v2.sha256, v3.sha256}))
    assert receipt.adapter_ids == (adapter_id,)
    # the blobs are held for the gc grace period from the deletion (however long the call itself took)
    assert asked + registry.gc_grace <= receipt.purge_after <= answered + registry.gc_grace
    events = list_events(database, tenant_id=tenant_id, action=AuditAction.DELETE_RECORDS)
    assert [(e.target, e.details["receipt_id"], e.details["record_ids"]) for e in events] == [
        ("user:ann", receipt.id, [forgotten])
    ]
    # a revoked version is never a promote or rollback target
    with pytest.raises(InvalidStateError, match="revoked"):
        registry.promote(tenant_id=tenant_id, adapter_id=adapter_id, number=3, actor="test")
    # the backlog counts from the clean live version: records 4-9 but the forgotten one are to train again
    (backlog,) = database.run(read_backlog, tenant_id=tenant_id)
    assert (backlog.trained_through_id, backlog.new_records) == (ids[2], 5)
    # ... and the rebuild job was queued for them
    assert receipt.rebuild_job_id is not None
    job = get_job(database, receipt.rebuild_job_id)
    assert job.state == "queued" and job.payload["users"][0]["external_id"] == "ann"
    status = rebuild_status(database, registry, receipt=receipt)
    assert (status.job_id, status.job_state, status.versions) == (job.id, "queued", ())
    # the rebuild's version (registered here as its job would) is where the rebuild stands
    user_id = job.payload["users"][0]["user_id"]
    rebuilt = _version(
        registry,
        database,
        tenant_id=tenant_id,
        adapter_id=adapter_id,
        user_id=user_id,
        folder=peft_folders[3],
        records=[i for i in ids[3:] if i != forgotten],
        parent=v1,
        live=False,
    )
    status = rebuild_status(database, registry, receipt=receipt)
    assert [(v.adapter, v.number, v.version_id, v.status) for v in status.versions] == [
        ("personal", 4, rebuilt.id, "candidate")
    ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_forgetting_the_first_record_takes_live_back_to_the_base_model(
    database: Database, registry: Registry, tenant_id: int, peft_folders: list[Path]
) -> None:
    ids, _versions, adapter_id = _three_versions(database, registry, tenant_id, peft_folders)
    # ids[1] is in version 1, replayed in 2: all three descend
    receipt = _forget_ids(database, registry, tenant_id, "ann", [ids[1]])
    assert registry.live_version(tenant_id=tenant_id, adapter_id=adapter_id) is None
    assert [v["number"] for v in receipt.revoked_versions] == [1, 2, 3]
    # a second deletion revokes nothing again, and takes nothing it did not find
    again = _forget_ids(database, registry, tenant_id, "ann", [ids[7]])
    assert again.revoked_versions == () and again.blobs == () and len(again.record_hashes) == 1


def test_bad_input_is_refused_and_changes_nothing(
    database: Database, registry: Registry, tenant_id: int, peft_folders: list[Path]
) -> None:
    ids, _versions, adapter_id = _three_versions(database, registry, tenant_id, peft_folders)
    other = feed_users(database, tenant_id=tenant_id, users=["bo"], round=1, n_records=2)["bo"]
    before = (
        [r.id for r in list_feedback(database, tenant_id=tenant_id, user_external_id="ann")],
        [v.status for v in registry.list_versions(tenant_id=tenant_id, adapter_id=adapter_id)],
    )
    for bad, field in [
        ({}, "filter"),
        ({"ids": []}, "ids"),
        ({"ids": [True]}, "ids"),
        ({"ids": [0]}, "ids"),
        ({"ids": [1], "since": datetime.now(UTC)}, "ids"),
        ({"since": datetime(2026, 1, 1)}, "filter.since"),
        ({"since": datetime.now(UTC), "until": datetime.now(UTC) - timedelta(days=1)}, "filter.until"),
        ({"metadata": {"k": float("nan")}}, "filter.metadata"),
    ]:
        with pytest.raises(ValidationError, match=f"^{field}:"):
            RecordSelection.parse(**bad)
    with pytest.raises(NotFoundError, match=r"ids: .*" + str(other[0])):  # bo's record is not ann's
        _forget_ids(database, registry, tenant_id, "ann", [ids[0], other[0]])
    with pytest.raises(NotFoundError, match="nobody"):
        _forget_ids(database, registry, tenant_id, "nobody", [1])
    after = (
        [r.id for r in list_feedback(database, tenant_id=tenant_id, user_external_id="ann")],
        [v.status for v in registry.list_versions(tenant_id=tenant_id, adapter_id=adapter_id)],
    )
    assert (
        after == before
        and list_events(database, tenant_id=tenant_id, action=AuditAction.DELETE_RECORDS) == []
    )


def test_a_filter_selects_by_time_and_metadata_and_the_receipt_hashes_the_values(
    database: Database, registry: Registry, tenant_id: int
) -> None:
    records = [
        {"kind": "sft", "prompt": f"p{i}", "completion": "c", "metadata": {"session": s, "n": i}}
        for i, s in enumerate(["a", "b", "a", "a"])
    ]
    ids = ingest_feedback(database, tenant_id=tenant_id, user_external_id="cy", records=records).ids
    receipt = forget_records(
        database,
        registry,
        tenant_id=tenant_id,
        subject=Subject.user("cy"),
        selection=RecordSelection.parse(
            since=datetime.now(UTC) - timedelta(hours=1), metadata={"session": "a"}
        ),
        actor="test",
    )
    left = [r.id for r in list_feedback(database, tenant_id=tenant_id, user_external_id="cy")]
    assert left == [ids[1]] and len(receipt.record_hashes) == 3
    assert receipt.request["filter"]["metadata_sha256"] == {"session": hashlib.sha256(b'"a"').hexdigest()}
    assert receipt.rebuild_job_id is None  # nothing was trained on them: nothing to rebuild


@pytest.mark.parametrize("purge", [False, True])
def test_no_blob_of_a_revoked_version_remains_after_the_grace_or_a_purge(
    sqlite_database: Database, blob_store: Any, peft_folders: list[Path], purge: bool
) -> None:
    db = sqlite_database
    registry = Registry(db, blob_store, gc_grace_seconds=3600)
    tenant_id = tiny_tenant(db)
    ids, (v1, v2, v3), _ = _three_versions(db, registry, tenant_id, peft_folders)
    receipt = _forget_ids(db, registry, tenant_id, "ann", [ids[4]], purge=purge)
    if not purge:
        assert registry.gc() == [] and all(blob_store.exists(v.sha256) for v in (v2, v3))  # held: the grace
        registry.gc(now=datetime.now(UTC) + timedelta(hours=2))
        receipt = get_receipt(db, tenant_id=tenant_id, receipt_id=receipt.id)
    assert [blob_store.exists(v.sha256) for v in (v1, v2, v3)] == [True, False, False]
    assert receipt.blobs_deleted_at is not None
    # a repairing verify does not take the missing blobs for corruption: revoked stays revoked
    report = verify_blobs(db, registry, tenant_id=tenant_id, repair=True, actor="test")
    assert [(c.location.version.number, c.result) for c in report.checks] == [
        (1, "ok"),
        (2, "quarantined"),
        (3, "quarantined"),
    ]
    assert [v.status for v in registry.list_versions(tenant_id=tenant_id, adapter_id=v1.adapter_id)] == [
        "live",
        "revoked",
        "revoked",
    ]


def _ann_and_bo_in_one_train_job(
    database: Database, tenant_id: int
) -> tuple[dict[str, list[int]], JobQueue, Job]:
    """ann and bo with four records each, queued by the scheduler in one train job of one step: their record
    ids by user, the queue and the job."""
    set_tenant_training(database, tenant_id=tenant_id, overrides={**TINY_TRAINING, "max_steps": 1})
    ids = feed_users(database, tenant_id=tenant_id, users=["ann", "bo"], round=1, n_records=4)
    queue = JobQueue(database)
    (job,) = Scheduler(database, SchedulerPolicy(min_new_records=1), queue=queue).tick().jobs_created
    return ids, queue, job


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # the row locks are the point
def test_a_job_that_read_a_deleted_record_registers_nothing_for_that_user_only(
    database: Database,
    registry: Registry,
    tenant_id: int,
    make_trainer: Callable[..., ContinualTrainer],
) -> None:
    ids, queue, job = _ann_and_bo_in_one_train_job(database, tenant_id)

    def delete_then_train(*args: Any, **kw: Any) -> Any:
        """ann forgets a record after the job loaded her data, before it trains."""
        _forget_ids(database, registry, tenant_id, "ann", [ids["ann"][0]])
        return train_slots(*args, **kw)

    trainer = make_trainer(promote_rule="always", train_slots=delete_then_train)
    worker = JobWorker(queue, worker_id="w", handlers={"train": trainer.run_job}, lease_seconds=30)
    done = worker.run_once()

    assert done is not None and done.id == job.id and done.state == "succeeded"
    assert done.result is not None and done.result["skipped"] == {"ann": "records_deleted"}
    assert [v["external_id"] for v in done.result["versions"]] == ["bo"]
    ann = TenantRepository(database).get_user(tenant_id=tenant_id, external_id="ann")
    adapter = registry.find_adapter(tenant_id=tenant_id, owner_user_id=ann.id, name=PERSONAL_ADAPTER)
    assert adapter is not None and registry.list_versions(tenant_id=tenant_id, adapter_id=adapter.id) == []


def test_a_user_erased_before_the_job_plans_is_skipped_and_the_others_train(
    database: Database,
    registry: Registry,
    tenant_id: int,
    make_trainer: Callable[..., ContinualTrainer],
) -> None:
    _, queue, job = _ann_and_bo_in_one_train_job(database, tenant_id)
    forget_user(database, registry, tenant_id=tenant_id, external_id="ann", actor="test")

    trainer = make_trainer(promote_rule="always")
    worker = JobWorker(queue, worker_id="w", handlers={"train": trainer.run_job}, lease_seconds=30)
    done = worker.run_once()

    assert done is not None and done.id == job.id and done.state == "succeeded"
    assert done.result is not None and done.result["skipped"] == {"ann": "subject_deleted"}
    assert [v["external_id"] for v in done.result["versions"]] == ["bo"]
    assert TenantRepository(database).list_users(tenant_id=tenant_id)[0].external_id == "bo"
