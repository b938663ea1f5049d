"""Corruption found before a user finds it (finding 6 of issue 18): a flipped byte in a live version's blob on S3.

Before: a generation for that user answers 502 (the blob is verified on read) while the version list still shows
the version live. ``POST /v1/admin/verify`` finds it; with ``repair`` the version becomes ``corrupt`` and ``live``
goes back to the previous healthy version (reason ``blob-corrupt`` in the history); generation for the user is
then served by that version, with no 5xx. The seeds are this test's own: blobs are content-addressed, and another
test's version of the same folder would share the damaged blob.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
from api_helpers import ApiServer, Library, TenantHandle, live_personal_version, sft
from tests.blob_corruption import flip_byte

from lorafleet.sdk import Client


def test_a_corrupt_live_blob_is_repaired_through_the_admin_route_and_served_again(
    api: ApiServer,
    admin: Client,
    tenant: TenantHandle,
    library: Library,
    adapter_folder: Callable[[int], Path],
    moto_endpoint: str,
) -> None:
    tenant.client.submit_feedback("alice", [sft("hello")])
    for seed in (1861, 1862):
        live_personal_version(library, tenant_id=tenant.id, user="alice", folder=adapter_folder(seed))
    v2 = tenant.client.get_version("alice", "personal", 2)
    flip_byte(library.blobs, v2.sha256, s3_endpoint=moto_endpoint)

    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    body = {"prompt": "Hi", "max_tokens": 2}
    with httpx.Client(base_url=api.url, headers=headers, timeout=300) as http:
        before = http.post("/v1/users/alice/generate", json=body)
        assert before.status_code == 502, before.text  # found only on read
        assert [v.status for v in tenant.client.list_versions("alice", "personal")] == ["archived", "live"]

        found = admin.verify_blobs(tenant=tenant.name)
        assert [(v.number, v.result) for v in found.versions] == [(1, "ok"), (2, "corrupt")]
        repaired = admin.verify_blobs(tenant=tenant.name, repair=True)
        assert repaired.counts.repaired == 1 and repaired.versions[1].live_after == 1

        after = http.post("/v1/users/alice/generate", json=body)
        assert after.status_code == 200, after.text
        assert after.json()["versions"] == {"personal": 1}  # served by the rolled-back version
        openai = http.post("/v1/completions", json={**body, "user": "alice", "temperature": 0})
        assert openai.status_code == 200, openai.text

    assert [v.status for v in tenant.client.list_versions("alice", "personal")] == ["live", "corrupt"]
    last = tenant.client.alias_history("alice", "personal")[-1]
    assert (last.from_version, last.to_version, last.reason) == (2, 1, "blob-corrupt")
    assert admin.verify_blobs(tenant=tenant.name, repair=True).counts.repaired == 0  # nothing new
