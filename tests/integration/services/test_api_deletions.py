"""Forgetting records over HTTP (PostgreSQL, S3 on moto): ``DELETE /v1/users/{id}/feedback`` answers with the
receipt, serving never returns the revoked version again (even with the adapter cache warm, and pinned), the
receipt reads back with its rebuild, bad input is a 4xx naming the field and changes nothing, and a task's
records are forgotten the same way."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import pytest
from api_helpers import ApiServer, Library, TenantHandle, sft

from lorafleet.domain import LineageRelation
from lorafleet.domain.subject import Subject
from lorafleet.sdk.errors import ApiError
from lorafleet.store.sql.feedback import create_snapshot
from lorafleet.workflows.continual import PERSONAL_ADAPTER


def _trained_version(
    library: Library,
    *,
    tenant_id: int,
    owner_user_id: int | None,
    name: str,
    folder: Path,
    records: Sequence[int],
) -> int:
    """The next version of the adapter, trained (as its snapshot says) on ``records``, continued from the live
    one, made live; its number."""
    registry = library.registry
    adapter = registry.get_or_create_adapter(
        tenant_id=tenant_id, owner_user_id=owner_user_id, name=name, target_config={}
    )
    live = registry.live_version(tenant_id=tenant_id, adapter_id=adapter.id)
    snapshot_user = owner_user_id
    if snapshot_user is None:  # a task's records belong to its subject row
        subject = Subject.task(name)
        found = library.tenants.find_subject(
            tenant_id=tenant_id, external_id=subject.external_id, kind=subject.kind
        )
        assert found is not None
        snapshot_user = found.id
    snapshot = create_snapshot(library.db, user_id=snapshot_user, record_ids=records)
    version = registry.register_version(
        tenant_id=tenant_id,
        adapter_id=adapter.id,
        adapter_dir=folder,
        base_fingerprint="tiny",
        parents=[] if live is None else [(live.id, LineageRelation.CONTINUED_FROM)],
        dataset_snapshot_id=snapshot.id,
    )
    registry.promote(tenant_id=tenant_id, adapter_id=adapter.id, number=version.number, actor="test")
    return version.number


def test_forgetting_a_record_revokes_its_version_and_serving_never_returns_it(
    make_tenant: Callable[[], TenantHandle], library: Library, adapter_folder: Callable[[int], Path]
) -> None:
    t = make_tenant()
    client = t.client
    ids = client.submit_feedback("alice", [sft(f"q{i}") for i in range(6)]).ids
    user = library.tenants.get_user(tenant_id=t.id, external_id="alice")
    kw = {"tenant_id": t.id, "owner_user_id": user.id, "name": PERSONAL_ADAPTER}
    _trained_version(library, folder=adapter_folder(1), records=ids[:3], **kw)
    _trained_version(library, folder=adapter_folder(2), records=ids[3:], **kw)
    assert client.generate("alice", "Hi", max_tokens=2).versions == {"personal": 2}  # the cache is warm now

    receipt = client.forget_records("alice", [ids[4]])

    assert receipt.subject == "user:alice" and receipt.kind == "records" and receipt.actor == f"api:{t.name}"
    assert [(v.adapter, v.number) for v in receipt.revoked_versions] == [("personal", 2)]
    assert len(receipt.record_hashes) == 1 and receipt.request == {"ids": [ids[4]]}
    assert receipt.rebuild is not None and receipt.rebuild.job_state == "queued"  # ids 3 and 5 train again
    assert client.generate("alice", "Hi", max_tokens=2).versions == {"personal": 1}
    with pytest.raises(ApiError) as pinned:
        client.complete(None, "Hi", model="alice/personal@2", max_tokens=2)
    assert pinned.value.status == 404
    assert client.complete(None, "Hi", model="alice/personal@1", max_tokens=2).lorafleet is not None
    assert [v.status for v in client.list_versions("alice", "personal")] == ["live", "revoked"]
    with pytest.raises(ApiError) as download:
        client.download_version("alice", "personal", 2, Path("never-written.tar.gz"))
    assert download.value.status == 409 and not Path("never-written.tar.gz").exists()
    with pytest.raises(ApiError) as promote:
        client.promote("alice", "personal", 2, force=True)
    assert promote.value.status == 409
    assert [r.id for r in client.list_feedback("alice")] == [i for i in ids if i != ids[4]]

    again = client.deletion_receipt(receipt.id)
    assert again.model_dump(exclude={"rebuild"}) == receipt.model_dump(exclude={"rebuild"})
    assert again.rebuild == receipt.rebuild
    assert [r.id for r in client.list_deletions("user:alice")] == [receipt.id]
    assert client.list_deletions("user:bob") == []
    events = client.list_audit(action="delete.records")
    assert [(e.target, e.details["receipt_id"]) for e in events] == [("user:alice", receipt.id)]


def test_bad_deletion_requests_are_4xx_naming_the_field_and_change_nothing(
    make_tenant: Callable[[], TenantHandle], api: ApiServer
) -> None:
    t = make_tenant()
    client = t.client
    ids = client.submit_feedback("alice", [sft("a"), sft("b")]).ids
    other = client.submit_feedback("bob", [sft("c")]).ids
    url = f"{api.url}/v1/users/alice/feedback"
    headers = {"Authorization": f"Bearer {t.api_key}"}
    with httpx.Client(timeout=30) as http:
        for body, field in [
            ({}, "filter"),
            ({"ids": ids, "filter": {"metadata": {"k": 1}}}, "ids"),
            ({"ids": []}, "ids"),
            ({"ids": ["1"]}, "ids[0]"),
            ({"filter": {}}, "filter"),
            ({"filter": {"since": "2026-01-01T00:00:00"}}, "filter.since"),
            ({"filter": {"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}}, "filter.until"),
            ({"ids": ids, "purge": "yes"}, "purge"),
            ({"ids": ids, "other": 1}, "other"),
        ]:
            answer = http.request("DELETE", url, json=body, headers=headers)
            assert answer.status_code == 422, (body, answer.text)
            assert answer.json()["error"]["field"] == field, (body, answer.text)
        missing = http.request("DELETE", url, json={"ids": [ids[0], other[0]]}, headers=headers)
        assert missing.status_code == 404 and str(other[0]) in missing.json()["error"]["message"]
        nobody = http.request(
            "DELETE", f"{api.url}/v1/users/nobody/feedback", json={"ids": [1]}, headers=headers
        )
        assert nobody.status_code == 404
        bad_id = http.get(f"{api.url}/v1/deletions/not-a-receipt", headers=headers)
        assert (bad_id.status_code, bad_id.json()["error"]["field"]) == (422, "receipt_id")
        unknown = http.get(f"{api.url}/v1/deletions/del_{'0' * 32}", headers=headers)
        assert unknown.status_code == 404
        bad_subject = http.get(f"{api.url}/v1/deletions", params={"subject": "alice"}, headers=headers)
        assert (bad_subject.status_code, bad_subject.json()["error"]["field"]) == (422, "subject")
    assert [r.id for r in client.list_feedback("alice")] == ids
    assert client.list_deletions() == [] and client.list_audit(action="delete.records") == []


def test_a_tasks_records_are_forgotten_and_its_task_adapter_rolled_back(
    make_tenant: Callable[[], TenantHandle], library: Library, adapter_folder: Callable[[int], Path]
) -> None:
    t = make_tenant()
    client = t.client
    ids = client.submit_task_feedback("faq", [sft("t1"), sft("t2"), sft("t3")]).ids
    kw = {"tenant_id": t.id, "owner_user_id": None, "name": "faq"}
    _trained_version(library, folder=adapter_folder(1), records=ids[:1], **kw)
    _trained_version(library, folder=adapter_folder(14), records=ids[1:], **kw)  # its own blob: purged

    receipt = client.forget_task_records("faq", metadata=None, ids=[ids[2]], purge=True)

    assert receipt.subject == "task:faq" and [v.number for v in receipt.revoked_versions] == [2]
    assert receipt.blobs_deleted_at is not None  # purge: the blobs are gone already
    assert [v.status for v in client.list_task_versions("faq")] == ["live", "revoked"]
    assert [r.id for r in client.list_deletions("task:faq")] == [receipt.id]
