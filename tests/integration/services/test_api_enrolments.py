"""Enrolments in a tenant's shared task adapters through the SDK: enrol (QA rechecks the grown bank), list,
refusals, unenrol; with a fixed gate, generation mixes the personal and the task adapter as weighted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from api_helpers import Library, TenantHandle, live_personal_version

from lorafleet.routing.experts import set_gate_spec
from lorafleet.routing.spec import GateSpec
from lorafleet.sdk import errors


def test_enrol_list_and_unenrol(
    tenant: TenantHandle, library: Library, adapter_folder: Callable[[int], Path]
) -> None:
    client = tenant.client
    live_personal_version(library, tenant_id=tenant.id, user="uma", folder=adapter_folder(7))
    task = library.registry.create_adapter(
        tenant_id=tenant.id, owner_user_id=None, name="legal", target_config={}
    )
    version = library.registry.register_version(
        tenant_id=tenant.id, adapter_id=task.id, adapter_dir=adapter_folder(8), base_fingerprint="tiny"
    )
    library.registry.promote(tenant_id=tenant.id, adapter_id=task.id, number=version.number, actor="test")

    enrolment = client.enrol("uma", "legal")
    assert (enrolment.task, enrolment.adapter_id, enrolment.actor) == ("legal", task.id, f"api:{tenant.name}")
    assert [e.task for e in client.list_enrolments("uma")] == ["legal"]
    assert [j.kind for j in client.list_jobs()] == ["qa"]  # the grown bank is rechecked
    weights = {"personal": 0.75, "legal": 0.25}
    set_gate_spec(
        library.db,
        tenant_id=tenant.id,
        user_external_id="uma",
        spec=GateSpec(kind="fixed", fixed_weights=weights),
        actor="test",
    )
    answer = client.generate("uma", "Hello", max_tokens=2)
    assert answer.versions == {"personal": 1, "legal": 1} and answer.gate_weights == weights
    with pytest.raises(errors.AlreadyExists):
        client.enrol("uma", "legal")
    with pytest.raises(errors.NotFound):
        client.enrol("uma", "no-such-task")

    client.unenrol("uma", "legal")
    assert client.list_enrolments("uma") == []
    with pytest.raises(errors.NotFound):
        client.unenrol("uma", "legal")
