"""Forgetting a user (``lorafleet.workflows.erasure.forget_user``) on SQLite and PostgreSQL, with blobs in a local
directory and on S3 over HTTP (moto): every table holds nothing of the user afterwards, other users, the other
tenant and the shared task adapter are untouched, the receipt lists exactly what went, the blobs stay until the gc
grace period has passed (or go at once with ``purge``), and an unknown user changes nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from lorafleet.domain import AuditAction, DeletionKind, JobState, LineageRelation, QADecision, QAKind
from lorafleet.errors import NotFoundError, ValidationError
from lorafleet.jobs import JobQueue
from lorafleet.registry import Registry
from lorafleet.routing.experts import enrol, resolve_user_experts, set_gate_spec
from lorafleet.routing.spec import GateSpec
from lorafleet.store.blob import BlobStore, open_blob_store
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.feedback import create_snapshot
from lorafleet.store.sql.idempotency import IdempotencyRepository
from lorafleet.store.sql.models import (
    Base,
    SqlAdapter,
    SqlAdapterVersion,
    SqlDeletionReceipt,
    SqlFeedback,
    SqlIdempotencyKey,
    SqlJob,
    SqlTenant,
    SqlUser,
)
from lorafleet.store.sql.qa_repository import NewQAReport, QARepository
from lorafleet.store.sql.receipts import get_receipt
from lorafleet.store.sql.routing_repository import RoutingRepository
from lorafleet.workflows.audit import list_events
from lorafleet.workflows.erasure import forget_user
from lorafleet.workflows.feedback import ingest_feedback
from lorafleet.workflows.tasks import ingest_task_feedback

ADAPTER_COLUMNS = ("adapter_id",)
VERSION_COLUMNS = ("version_id", "child_version_id", "parent_version_id", "from_version_id", "to_version_id")
USER_COLUMNS = ("user_id", "owner_user_id")


@dataclass
class World:
    """Tenant A: alice (to forget) and bob, both enrolled in task ``summarise``; tenant B: another alice."""

    db: Database
    registry: Registry
    tenant: int
    other_tenant: int
    alice: int
    alice_adapters: list[int]
    alice_versions: list[int]
    alice_blobs: list[str]
    bob_blob: str
    jobs: dict[str, int]


def _sft(text: str) -> dict[str, Any]:
    return {"kind": "sft", "prompt": text, "completion": "An answer."}


def _version(registry: Registry, tenant: int, adapter: int, folder: Path, **kw: Any) -> tuple[int, str]:
    v = registry.register_version(
        tenant_id=tenant, adapter_id=adapter, adapter_dir=folder, base_fingerprint="tiny", **kw
    )
    return v.id, v.sha256


def _qa_report(db: Database, registry: Registry, *, tenant: int, version_id: int) -> str:
    ref = registry.blobs.put_bytes(f'{{"report": {version_id}}}'.encode())
    new = NewQAReport(
        tenant_id=tenant,
        version_id=version_id,
        kind=QAKind.CANDIDATE,
        policy_version="p1",
        decision=QADecision.PROMOTE,
        reasons=(),
        summary={},
        blob_sha256=ref.sha256,
        blob_uri=ref.uri,
        blob_size_bytes=ref.size,
        job_id=None,
    )
    db.run(QARepository(dialect=db.dialect).insert_report, new=new)
    return ref.sha256


def _user(db: Database, tenant: int, external_id: str) -> int:
    with db.session() as s:
        row = SqlUser(tenant_id=tenant, external_id=external_id)
        s.add(row)
        s.flush()
        return row.id


def build_world(db: Database, registry: Registry, folder: Callable[..., Path]) -> World:
    with db.session() as s:
        a, b = SqlTenant(name="tenant-a"), SqlTenant(name="tenant-b")
        s.add_all([a, b])
        s.flush()
        tenant, other = a.id, b.id
    alice, bob = _user(db, tenant, "alice"), _user(db, tenant, "bob")
    ids = ingest_feedback(
        db, tenant_id=tenant, user_external_id="alice", records=[_sft(f"a{i}") for i in range(3)]
    )
    ingest_feedback(db, tenant_id=tenant, user_external_id="bob", records=[_sft("b0")])
    for user in ("alice", "dave"):  # tenant B's own alice, and a user only tenant B has
        ingest_feedback(db, tenant_id=other, user_external_id=user, records=[_sft("other")])
    snapshot = create_snapshot(db, user_id=alice, record_ids=ids.ids)
    # alice's adapter: v1 (with a snapshot and a routing key) and v2 (its child), v2 live, a QA report on v1
    personal = registry.create_adapter(
        tenant_id=tenant, owner_user_id=alice, name="personal", target_config={}
    )
    v1, sha1 = _version(registry, tenant, personal.id, folder(seed=1), dataset_snapshot_id=snapshot.id)
    registry.set_routing_key(tenant_id=tenant, version_id=v1, key=[1.0, 0.0])
    v2, sha2 = _version(
        registry, tenant, personal.id, folder(seed=2), parents=[(v1, LineageRelation.CONTINUED_FROM)]
    )
    registry.promote(tenant_id=tenant, adapter_id=personal.id, number=1, actor="test")
    registry.promote(tenant_id=tenant, adapter_id=personal.id, number=2, actor="test")
    report = _qa_report(db, registry, tenant=tenant, version_id=v1)
    gate = db.run(RoutingRepository(dialect=db.dialect).insert_gate_adapter, tenant_id=tenant, user_id=alice)
    set_gate_spec(db, tenant_id=tenant, user_external_id="alice", spec=GateSpec(top_k=1), actor="test")
    # bob's adapter (live), the shared task adapter (live), both users enrolled in it
    bob_adapter = registry.create_adapter(
        tenant_id=tenant, owner_user_id=bob, name="personal", target_config={}
    )
    _, bob_sha = _version(registry, tenant, bob_adapter.id, folder(seed=3))
    registry.promote(tenant_id=tenant, adapter_id=bob_adapter.id, number=1, actor="test")
    ingest_task_feedback(db, tenant_id=tenant, task_name="summarise", records=[_sft("t0")])
    task = registry.get_or_create_adapter(
        tenant_id=tenant, owner_user_id=None, name="summarise", target_config={}
    )
    _version(registry, tenant, task.id, folder(seed=4))
    registry.promote(tenant_id=tenant, adapter_id=task.id, number=1, actor="test")
    for user in ("alice", "bob"):
        enrol(db, tenant_id=tenant, user_external_id=user, task_name="summarise", actor="test")
    jobs = _jobs(db, tenant=tenant, alice=alice, bob=bob, v2=v2, personal=personal.id)
    keys = IdempotencyRepository(db)
    for user in ("alice", "bob"):
        keys.run_once(
            tenant_id=tenant, key=f"k-{user}", request_hash="h", status=201, operation=dict, subject=user
        )
    return World(
        db,
        registry,
        tenant,
        other,
        alice,
        alice_adapters=[personal.id, gate],
        alice_versions=[v1, v2],
        alice_blobs=sorted({sha1, sha2, report}),
        bob_blob=bob_sha,
        jobs=jobs,
    )


def _jobs(db: Database, *, tenant: int, alice: int, bob: int, v2: int, personal: int) -> dict[str, int]:
    queue = JobQueue(db)

    def submit(name: str, kind: str, payload: dict[str, Any], users: list[tuple[int, int]]) -> int:
        return queue.submit(
            tenant_id=tenant, kind=kind, payload=payload, user_ids=users, dedupe_key=name
        ).job.id

    train = {"users": [{"user_id": alice, "external_id": "alice", "watermark": 3}]}
    both = {
        "users": [
            {"user_id": u, "external_id": n, "watermark": 4} for u, n in ((alice, "alice"), (bob, "bob"))
        ]
    }
    return {
        "train_alice": submit("t-alice", "train", train, [(alice, 3)]),
        "train_both": submit("t-both", "train", both, [(alice, 4), (bob, 4)]),
        "train_bob": submit("t-bob", "train", {"users": []}, [(bob, 4)]),
        "qa_alice": submit("qa-alice", "qa", {"version_id": v2}, []),
        "recheck_alice": submit("re-alice", "qa", {"recheck": {"adapter_id": personal}}, []),
        "import_alice": submit("imp-alice", "import", {"user": "alice", "adapter": "personal"}, []),
        "import_task": submit("imp-task", "import", {"task": "summarise"}, []),
    }


def _rows_naming(db: Database, world: World) -> dict[str, int]:
    """Rows in every table whose user, adapter or version columns name one of alice's (tenant A's alice)."""
    naming: dict[str, int] = {}
    with db.session() as s:
        for table in Base.metadata.sorted_tables:
            for column in table.columns:
                if column.name in USER_COLUMNS:
                    values = [world.alice]
                elif column.name in ADAPTER_COLUMNS:
                    values = world.alice_adapters
                elif column.name in VERSION_COLUMNS:
                    values = world.alice_versions
                else:
                    continue
                n = s.scalar(select(func.count()).select_from(table).where(column.in_(values)))
                if n:
                    naming[f"{table.name}.{column.name}"] = int(n)
    return naming


def _everything_but_alices(db: Database, world: World) -> dict[str, list[Any]]:
    """A snapshot of every row of every table except those naming alice (and the job and receipt rows, which
    the erasure changes or adds), to compare before and after."""
    skip = {"jobs", "deletion_receipts", "audit_events", "idempotency_keys"}
    found: dict[str, list[Any]] = {}
    with db.session() as s:
        for table in Base.metadata.sorted_tables:
            if table.name in skip:
                continue
            query = select(table)
            for column in table.columns:
                if column.name in USER_COLUMNS:
                    query = query.where((column != world.alice) | column.is_(None))
                elif column.name in ADAPTER_COLUMNS:
                    query = query.where(column.not_in(world.alice_adapters))
                elif column.name in VERSION_COLUMNS:
                    query = query.where((column.not_in(world.alice_versions)) | column.is_(None))
                elif table.name == "users" and column.name == "id":
                    query = query.where(column != world.alice)
                elif table.name == "adapters" and column.name == "id":
                    query = query.where(column.not_in(world.alice_adapters))
                elif table.name == "adapter_versions" and column.name == "id":
                    query = query.where(column.not_in(world.alice_versions))
            found[table.name] = sorted(tuple(str(v) for v in row) for row in s.execute(query))
    return found


@pytest.fixture
def world(local_registry: Registry, database: Database, make_adapter_dir: Callable[..., Path]) -> World:
    return build_world(database, local_registry, make_adapter_dir)


def test_forget_user_erases_every_row_of_theirs_and_nothing_else(world: World) -> None:
    db = world.db
    assert set(_rows_naming(db, world)) >= {
        "feedback.user_id",
        "adapters.owner_user_id",
        "aliases.adapter_id",
    }
    with db.session() as s:
        hashes = sorted(s.scalars(select(SqlFeedback.content_hash).where(SqlFeedback.user_id == world.alice)))
        query = select(SqlAdapterVersion.id, SqlAdapterVersion.sha256)
        shas = {i: sha for i, sha in s.execute(query.where(SqlAdapterVersion.id.in_(world.alice_versions)))}
    others = _everything_but_alices(db, world)
    now = datetime.now(UTC)

    receipt = forget_user(
        db, world.registry, tenant_id=world.tenant, external_id="alice", actor="api:a", now=now
    )

    assert _rows_naming(db, world) == {}
    assert _everything_but_alices(db, world) == others  # bob, tenant B's alice, the task: as they were
    assert (receipt.kind, receipt.subject, receipt.actor) == (DeletionKind.USER, "user:alice", "api:a")
    assert receipt.request == {"purge": False}
    assert list(receipt.record_hashes) == hashes
    v1, v2 = world.alice_versions
    assert list(receipt.revoked_versions) == [
        {"adapter": "personal", "number": 1, "version_id": v1, "sha256": shas[v1]},
        {"adapter": "personal", "number": 2, "version_id": v2, "sha256": shas[v2]},
    ]
    assert receipt.erased == {
        "feedback": 3,
        "dataset_snapshots": 1,
        "adapters": 2,  # personal and the gate
        "adapter_versions": 2,
        "routing_keys": 1,
        "aliases": 1,
        "alias_history": 2,
        "lineage_edges": 1,
        "qa_reports": 1,
        "enrolments": 1,
        "enrolment_events": 1,
        "gate_settings": 1,
        "job_users": 2,
        "users": 1,
        "idempotency_keys": 1,
    }
    assert list(receipt.blobs) == world.alice_blobs
    assert receipt.purge_after == now + world.registry.gc_grace and receipt.blobs_deleted_at is None
    assert db.run(get_receipt, tenant_id=world.tenant, receipt_id=receipt.id) == receipt
    with db.session() as s:
        states = {i: state for i, state in s.execute(select(SqlJob.id, SqlJob.state))}
        keys = sorted(s.scalars(select(SqlIdempotencyKey.subject)))
    cancelled = {"train_alice", "qa_alice", "recheck_alice", "import_alice"}
    assert {name: states[i] for name, i in world.jobs.items()} == {
        name: JobState.CANCELLED if name in cancelled else JobState.QUEUED for name in world.jobs
    }
    assert keys == ["bob"]
    (event,) = list_events(db, tenant_id=world.tenant, action=AuditAction.DELETE_USER)
    assert (event.actor, event.target, event.details["receipt_id"]) == ("api:a", "user:alice", receipt.id)
    assert event.details["version_ids"] == [v1, v2]
    assert sorted(event.details["cancelled_jobs"]) == sorted(world.jobs[n] for n in cancelled)
    experts = resolve_user_experts(db, tenant_id=world.tenant, user_external_id="alice")
    assert experts.user_id is None and experts.members == ()


def test_an_unknown_user_or_another_tenants_user_changes_nothing(world: World) -> None:
    db = world.db
    before = _everything_but_alices(db, world), _rows_naming(db, world)
    for user in ("carol", "dave"):  # nobody's, and only tenant B's
        with pytest.raises(NotFoundError):
            forget_user(db, world.registry, tenant_id=world.tenant, external_id=user, actor="t")
    for bad in ("", "a\x00b", "\x1ftask:summarise", "x" * 257):
        with pytest.raises(ValidationError):
            forget_user(db, world.registry, tenant_id=world.tenant, external_id=bad, actor="t")
    assert (_everything_but_alices(db, world), _rows_naming(db, world)) == before
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(SqlDeletionReceipt)) == 0
        assert s.scalar(select(func.count()).select_from(SqlAdapter)) == 4
    assert list_events(db, tenant_id=world.tenant, action=AuditAction.DELETE_USER) == []


@pytest.mark.parametrize("purge", [False, True])
def test_the_blobs_stay_until_the_grace_period_passes_or_go_at_once_with_purge(
    sqlite_database: Database, blob_store: BlobStore, make_adapter_dir: Callable[..., Path], purge: bool
) -> None:
    registry = Registry(sqlite_database, blob_store)
    world = build_world(sqlite_database, registry, make_adapter_dir)
    assert all(blob_store.exists(sha) for sha in world.alice_blobs)

    receipt = forget_user(
        sqlite_database, registry, tenant_id=world.tenant, external_id="alice", actor="t", purge=purge
    )

    assert receipt.request == {"purge": purge}
    if purge:
        assert receipt.blobs_deleted_at is not None and receipt.blobs_deleted_at == receipt.purge_after
    else:
        assert all(blob_store.exists(sha) for sha in world.alice_blobs)
        assert registry.gc() == []  # within the grace period: held by the receipt
        assert all(blob_store.exists(sha) for sha in world.alice_blobs)
        assert sorted(registry.gc(now=receipt.purge_after + timedelta(seconds=1))) == world.alice_blobs
        receipt = sqlite_database.run(get_receipt, tenant_id=world.tenant, receipt_id=receipt.id)
        assert receipt.blobs_deleted_at is not None
    assert not any(blob_store.exists(sha) for sha in world.alice_blobs)
    assert blob_store.exists(world.bob_blob)


def test_a_write_holding_the_user_row_commits_before_the_erasure_reads_anything(
    pg_database: Database, make_adapter_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """PostgreSQL: the erasure starts by locking the user row, so a transaction that holds a lock on it (here a
    feedback insert, whose foreign key check share-locks the row) finishes first, and its record is erased and
    listed in the receipt like every other (not cascaded away unlisted, not left behind)."""
    db = pg_database
    registry = Registry(db, open_blob_store((tmp_path / "blobs").as_uri()))
    world = build_world(db, registry, make_adapter_dir)
    inserted, erasing = threading.Event(), threading.Event()
    late_hash = "f" * 64

    def insert_late_record() -> None:
        with db.session() as s:
            s.add(
                SqlFeedback(
                    user_id=world.alice, kind="sft", payload={"prompt": "late"}, content_hash=late_hash
                )
            )
            s.flush()
            inserted.set()
            erasing.wait(timeout=30)
            time.sleep(
                0.3
            )  # the erasure is waiting on the row lock by now (or it is not locking: the test fails)

    writer = threading.Thread(target=insert_late_record)
    writer.start()
    assert inserted.wait(timeout=30)
    erasing.set()
    receipt = forget_user(db, registry, tenant_id=world.tenant, external_id="alice", actor="t")
    writer.join(timeout=30)

    assert late_hash in receipt.record_hashes and receipt.erased["feedback"] == 4
    assert _rows_naming(db, world) == {}
