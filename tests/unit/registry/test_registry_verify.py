"""``lorafleet verify`` underneath: a flipped byte in a live version's blob, on the local directory and on S3
over HTTP (moto), found by re-hashing and repaired (status ``corrupt``, ``live`` rolled back to the newest healthy
version with reason ``blob-corrupt``); healthy versions are never touched and a second run finds nothing new."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from registry_helpers import TwoTenants, registered_versions, statuses
from tests.blob_corruption import delete_blob, flip_byte
from tests.faults import FaultyBlobs

from lorafleet.domain import AdapterVersion, BlobCheck, VersionStatus
from lorafleet.errors import BlobStoreError, InvalidStateError, ModelNotFoundError
from lorafleet.jobs.queue import JobQueue
from lorafleet.registry import Registry
from lorafleet.routing.experts import enrol, resolve_model_experts
from lorafleet.store.blob import BlobStore
from lorafleet.store.blob.s3 import S3BlobStore
from lorafleet.store.sql.database import Database
from lorafleet.workflows.blob_verify import REPAIR_REASON, VerifyReport, verify_blobs


@dataclass
class Adapter:
    tenant_id: int
    adapter_id: int
    versions: list[AdapterVersion]


def _adapter(
    registry: Registry, make_adapter_dir: Callable[..., Path], tenant_id: int, *args: Any, **kw: Any
) -> Adapter:
    """``registered_versions`` of tenant ``tenant_id`` (its owner, name, seeds, live), as an ``Adapter``."""
    adapter_id, versions = registered_versions(registry, make_adapter_dir, tenant_id, *args, **kw)
    return Adapter(tenant_id, adapter_id, versions)


def _statuses(registry: Registry, a: Adapter) -> list[str]:
    return statuses(registry, a.tenant_id, a.adapter_id)


def _live(registry: Registry, a: Adapter) -> int | None:
    found = registry.live_version(tenant_id=a.tenant_id, adapter_id=a.adapter_id)
    return None if found is None else found.number


def _results(report: VerifyReport) -> dict[int, str]:
    return {c.version.id: str(c.result) for c in report.checks}


def _endpoint(blobs: BlobStore, request: pytest.FixtureRequest) -> str | None:
    return str(request.getfixturevalue("moto_endpoint")) if isinstance(blobs, S3BlobStore) else None


def test_a_flipped_byte_in_a_live_blob_is_found_repaired_and_found_no_more(
    database: Database,
    registry: Registry,
    tenants: TwoTenants,
    make_adapter_dir: Callable[..., Path],
    request: pytest.FixtureRequest,
) -> None:
    """On both databases and both object stores (the ``registry`` fixture's four combinations)."""
    a = _adapter(registry, make_adapter_dir, tenants.a, tenants.a_user, seeds=[1, 2, 3, 4], live=[1, 2, 3])
    b = _adapter(registry, make_adapter_dir, tenants.b, tenants.b_user, seeds=[5], live=[1])
    v1, v2, v3, v4 = a.versions
    flip_byte(registry.blobs, v3.sha256, s3_endpoint=_endpoint(registry.blobs, request))

    found = verify_blobs(database, registry, actor="test")  # every tenant's, nothing changed
    assert _results(found) == {
        v1.id: "ok",
        v2.id: "ok",
        v3.id: "corrupt",
        v4.id: "ok",
        b.versions[0].id: "ok",
    }
    assert found.counts == {
        "checked": 5,
        "ok": 4,
        "corrupt": 1,
        "missing": 0,
        "unreadable": 0,
        "quarantined": 0,
        "repaired": 0,
    }
    (bad,) = found.problems
    assert bad.version.id == v3.id and "corrupted" in bad.detail and not bad.repaired
    assert bad.label == "tenant-a/alice/chat v3" and bad.status == "live"
    assert _statuses(registry, a) == ["archived", "archived", "live", "candidate"] and _live(registry, a) == 3
    only_b = verify_blobs(database, registry, tenant_id=tenants.b, actor="test")  # one tenant's: B's only
    assert _results(only_b) == {b.versions[0].id: "ok"}

    history_before = registry.alias_history(tenant_id=a.tenant_id, adapter_id=a.adapter_id)
    repaired = verify_blobs(database, registry, repair=True, actor="test")
    (fixed,) = repaired.problems
    assert (fixed.version.id, fixed.result, fixed.repaired, fixed.was_live, fixed.live_after) == (
        v3.id,
        BlobCheck.CORRUPT,
        True,
        True,
        2,
    )
    assert fixed.status == VersionStatus.CORRUPT and repaired.counts["repaired"] == 1
    assert _statuses(registry, a) == ["archived", "live", "corrupt", "candidate"] and _live(registry, a) == 2
    history = registry.alias_history(tenant_id=a.tenant_id, adapter_id=a.adapter_id)
    assert history[: len(history_before)] == history_before and len(history) == len(history_before) + 1
    move = history[-1]
    assert (move.from_version_id, move.to_version_id, move.actor, move.reason) == (
        v3.id,
        v2.id,
        "test",
        REPAIR_REASON,
    )
    assert _statuses(registry, b) == ["live"]  # the other tenant's healthy version: untouched
    assert registry.alias_history(tenant_id=b.tenant_id, adapter_id=b.adapter_id)[-1].reason == "ok"

    again = verify_blobs(database, registry, repair=True, actor="test")  # nothing new
    assert again.problems == ()
    assert again.counts["quarantined"] == 1 and again.counts["ok"] == 4 and again.counts["repaired"] == 0
    assert len(registry.alias_history(tenant_id=a.tenant_id, adapter_id=a.adapter_id)) == len(history)

    # quarantined for good: never served (not even pinned by number), never a promote or rollback target, its
    # status never set again
    assert resolve_model_experts(
        database, tenant_id=a.tenant_id, owner="alice", adapter="chat", version=2
    ).members
    with pytest.raises(ModelNotFoundError):
        resolve_model_experts(database, tenant_id=a.tenant_id, owner="alice", adapter="chat", version=3)
    with pytest.raises(InvalidStateError, match="corrupt"):
        registry.promote(tenant_id=a.tenant_id, adapter_id=a.adapter_id, number=3, actor="test")
    with pytest.raises(InvalidStateError, match="corrupt"):
        registry.set_status(
            tenant_id=a.tenant_id, adapter_id=a.adapter_id, number=3, status=VersionStatus.ARCHIVED
        )
    registry.promote(tenant_id=a.tenant_id, adapter_id=a.adapter_id, number=4, actor="test")
    with pytest.raises(InvalidStateError, match="corrupt"):
        registry.rollback(tenant_id=a.tenant_id, adapter_id=a.adapter_id, to_number=3, actor="test")


def test_the_rollback_skips_bad_and_qa_failed_versions_and_may_go_to_none(
    database: Database, local_registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path]
) -> None:
    registry = local_registry
    a = _adapter(registry, make_adapter_dir, tenants.a, tenants.a_user, seeds=[1, 2, 3], live=[1, 2, 3])
    v1, v2, v3 = a.versions
    delete_blob(registry.blobs, v2.sha256)  # the newest earlier version is gone: not a target
    flip_byte(registry.blobs, v3.sha256)

    report = verify_blobs(database, registry, repair=True, actor="test")
    assert _results(report) == {v1.id: "ok", v2.id: "missing", v3.id: "corrupt"}
    assert [(c.repaired, c.was_live) for c in report.checks] == [(False, False), (True, False), (True, True)]
    assert _statuses(registry, a) == ["live", "corrupt", "corrupt"] and report.checks[2].live_after == 1

    flip_byte(registry.blobs, v1.sha256)  # the last one goes bad too: live goes to none (the base model)
    report = verify_blobs(database, registry, repair=True, actor="test")
    assert [str(c.result) for c in report.checks] == ["corrupt", "quarantined", "quarantined"]
    assert report.checks[0].was_live and report.checks[0].live_after is None
    assert _live(registry, a) is None and _statuses(registry, a) == ["corrupt"] * 3
    last = registry.alias_history(tenant_id=a.tenant_id, adapter_id=a.adapter_id)[-1]
    assert (last.from_version_id, last.to_version_id, last.reason) == (v1.id, None, REPAIR_REASON)


class _Unreachable(FaultyBlobs):
    """The object store failing for another reason than a missing or wrong blob (a network error)."""

    def download(self, sha256: str, dest: Path, *, expected_size: int | None = None) -> Path:
        raise BlobStoreError(f"S3 download {sha256} failed: connection reset")


def test_an_unreadable_store_is_reported_and_never_repaired(
    database: Database, local_registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path]
) -> None:
    a = _adapter(local_registry, make_adapter_dir, tenants.a, tenants.a_user, seeds=[1], live=[1])
    unreachable = Registry(database, _Unreachable(local_registry.blobs))
    report = verify_blobs(database, unreachable, repair=True, actor="test")
    assert [str(c.result) for c in report.checks] == ["unreadable"] and not report.checks[0].repaired
    assert "connection reset" in report.checks[0].detail and report.problems == report.checks
    assert _statuses(local_registry, a) == ["live"]


def test_a_corrupt_task_version_rolls_back_and_queues_rechecks_of_enrolled_users(
    database: Database, local_registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path]
) -> None:
    registry = local_registry
    personal = _adapter(
        registry, make_adapter_dir, tenants.a, tenants.a_user, "personal", seeds=[1], live=[1]
    )
    task = _adapter(registry, make_adapter_dir, tenants.a, None, "summarise", seeds=[2, 3], live=[1, 2])
    enrol(database, tenant_id=tenants.a, user_external_id="alice", task_name="summarise", actor="test")
    queue = JobQueue(database)
    before = queue.list_jobs(tenant_id=tenants.a)
    flip_byte(registry.blobs, task.versions[1].sha256)

    report = verify_blobs(database, registry, repair=True, actor="test", queue=queue)
    assert [c.label for c in report.problems] == ["tenant-a/task:summarise v2"]
    assert _live(registry, task) == 1 and _statuses(registry, task) == ["live", "corrupt"]
    assert _statuses(registry, personal) == ["live"]
    rechecks = [j for j in queue.list_jobs(tenant_id=tenants.a) if j not in before]
    assert [j.kind for j in rechecks] == ["qa"]
    assert rechecks[0].payload["recheck"]["adapter_id"] == personal.adapter_id
