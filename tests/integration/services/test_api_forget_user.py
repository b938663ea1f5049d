"""``DELETE /v1/users/{user_id}`` through the HTTP API and the SDK (PostgreSQL, S3 over moto): the user and
everything of theirs go, the receipt says exactly what and stays retrievable, another tenant's user of the same id
is untouched, a keyed request replayed afterwards is run afresh (no stored response brings anything back), bad
input and unknown users change nothing, and ``purge`` deletes the blobs at once."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import pytest
from api_helpers import ApiServer, Library, LiveVersions, TenantHandle, sft

from lorafleet.sdk import errors
from lorafleet.store.sql.receipts import get_receipt


def test_forget_user_erases_them_and_returns_the_receipt(
    api: ApiServer,
    tenant: TenantHandle,
    make_tenant: Callable[[], TenantHandle],
    library: Library,
    live: LiveVersions,
) -> None:
    other = make_tenant()
    client = tenant.client
    key = str(uuid.uuid4())
    body = {"records": [sft("q1"), sft("q2")]}
    headers = {"Authorization": f"Bearer {tenant.api_key}", "Idempotency-Key": key}
    first = httpx.post(f"{api.url}/v1/users/ada/feedback", json=body, headers=headers)
    client.submit_feedback("bo", [sft("q3")])
    other.client.submit_feedback("ada", [sft("q4")])
    live.personal("ada", 1)
    live.personal("bo", 2)
    (ada_version,) = client.list_versions("ada", "personal")
    others = other.client.list_feedback("ada")

    with pytest.raises(errors.NotFound):
        other.client.forget_user("bo")  # only tenant A has bo
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {tenant.api_key}"}) as http:
        refused = http.delete("/v1/users/ada", params={"purge": "maybe"})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == "purge", refused.text
    assert [u.external_id for u in client.list_users()] == ["ada", "bo"]

    receipt = client.forget_user("ada")

    assert (receipt.kind, receipt.subject, receipt.actor) == ("user", "user:ada", f"api:{tenant.name}")
    assert receipt.request == {"purge": False} and len(receipt.record_hashes) == 2
    assert [(v.adapter, v.number, v.sha256) for v in receipt.revoked_versions] == [
        ("personal", 1, ada_version.sha256)
    ]
    assert receipt.blobs == [ada_version.sha256] and receipt.blobs_deleted_at is None
    erased = receipt.erased
    assert (erased["feedback"], erased["adapter_versions"], erased["users"], erased["idempotency_keys"]) == (
        2,
        1,
        1,
        1,
    )
    assert receipt.purge_after > receipt.created_at and receipt.rebuild is None
    stored = library.db.run(get_receipt, tenant_id=tenant.id, receipt_id=receipt.id)
    assert stored.record_hashes == tuple(receipt.record_hashes)
    assert library.registry.blobs.exists(ada_version.sha256)  # until the grace period has passed
    assert [u.external_id for u in client.list_users()] == ["bo"]
    for read in (lambda: client.list_feedback("ada"), lambda: client.list_adapters("ada")):
        with pytest.raises(errors.NotFound):
            read()
    with pytest.raises(errors.NotFound):
        client.forget_user("ada")  # gone already
    assert other.client.list_feedback("ada") == others
    (event,) = client.list_audit(action="delete.user")
    assert (event.target, event.details["receipt_id"]) == ("user:ada", receipt.id)

    # the keyed request again: its stored response went with the user, so it runs afresh and brings back only
    # the records it carries (a new user ada, no adapter, no version)
    again = httpx.post(f"{api.url}/v1/users/ada/feedback", json=body, headers=headers)
    assert again.status_code == first.status_code == 200, again.text
    assert "Idempotent-Replayed" not in again.headers
    assert [r.payload["prompt"] for r in client.list_feedback("ada")] == ["q1", "q2"]
    assert client.list_adapters("ada") == []


def test_purge_deletes_the_blobs_at_once(tenant: TenantHandle, library: Library, live: LiveVersions) -> None:
    tenant.client.submit_feedback("cy", [sft("q1")])
    live.personal("cy", 5)
    (version,) = tenant.client.list_versions("cy", "personal")

    receipt = tenant.client.forget_user("cy", purge=True)

    assert receipt.request == {"purge": True} and receipt.blobs == [version.sha256]
    assert receipt.blobs_deleted_at is not None
    assert not library.registry.blobs.exists(version.sha256)
