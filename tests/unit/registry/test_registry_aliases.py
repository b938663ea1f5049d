"""The live alias: promote, rollback (to an earlier version or to no adapter), statuses and history."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from registry_helpers import TwoTenants, registered_versions
from registry_helpers import statuses as _statuses

from lorafleet.domain import AdapterVersion
from lorafleet.errors import AlreadyExistsError, InvalidStateError, NotFoundError, ValidationError
from lorafleet.registry import Registry


def _versions(
    registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path], count: int
) -> tuple[int, list[AdapterVersion]]:
    """Tenant A's ``chat`` with ``count`` candidate versions (seeds 0, 1, ...)."""
    return registered_versions(registry, make_adapter_dir, tenants.a, tenants.a_user, seeds=range(count))


def test_promote_moves_live_and_archives_the_previous(
    local_registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path]
) -> None:
    adapter_id, (v1, v2, _) = _versions(local_registry, tenants, make_adapter_dir, 3)
    assert local_registry.live_version(tenant_id=tenants.a, adapter_id=adapter_id) is None

    first = local_registry.promote(
        tenant_id=tenants.a, adapter_id=adapter_id, number=1, actor="qa", reason="ok"
    )
    assert (first.from_version_id, first.to_version_id, first.alias) == (None, v1.id, "live")
    second = local_registry.promote(
        tenant_id=tenants.a, adapter_id=adapter_id, number=2, actor="qa", reason="better"
    )
    assert (second.from_version_id, second.to_version_id) == (v1.id, v2.id)

    live = local_registry.live_version(tenant_id=tenants.a, adapter_id=adapter_id)
    assert live is not None and live.id == v2.id and live.status == "live"
    assert _statuses(local_registry, tenants.a, adapter_id) == ["archived", "live", "candidate"]


def test_rollback_to_earlier_version_and_to_no_adapter_with_history(
    local_registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path]
) -> None:
    reg, t = local_registry, tenants.a
    adapter_id, (v1, v2, v3) = _versions(reg, tenants, make_adapter_dir, 3)
    reg.promote(tenant_id=t, adapter_id=adapter_id, number=1, actor="qa")
    reg.promote(tenant_id=t, adapter_id=adapter_id, number=3, actor="qa")
    back = reg.rollback(tenant_id=t, adapter_id=adapter_id, to_number=1, actor="oncall", reason="regression")
    assert (back.from_version_id, back.to_version_id) == (v3.id, v1.id)
    assert reg.live_version(tenant_id=t, adapter_id=adapter_id) == reg.get_version(
        tenant_id=t, adapter_id=adapter_id, number=1
    )
    off = reg.rollback(tenant_id=t, adapter_id=adapter_id, to_number=None, actor="oncall", reason="disable")
    assert (off.from_version_id, off.to_version_id) == (v1.id, None)
    assert reg.live_version(tenant_id=t, adapter_id=adapter_id) is None
    assert _statuses(reg, t, adapter_id) == ["archived", "candidate", "archived"]
    reg.promote(tenant_id=t, adapter_id=adapter_id, number=2, actor="qa", reason="re-enable")

    history = reg.alias_history(tenant_id=t, adapter_id=adapter_id)
    moves = [(e.from_version_id, e.to_version_id, e.actor, e.reason) for e in history]
    assert moves == [
        (None, v1.id, "qa", ""),
        (v1.id, v3.id, "qa", ""),
        (v3.id, v1.id, "oncall", "regression"),
        (v1.id, None, "oncall", "disable"),
        (None, v2.id, "qa", "re-enable"),
    ]
    assert [e.id for e in history] == sorted(e.id for e in history)


def test_invalid_moves_are_refused_without_a_history_row(
    local_registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path]
) -> None:
    reg, t = local_registry, tenants.a
    adapter_id, _ = _versions(reg, tenants, make_adapter_dir, 3)
    with pytest.raises(InvalidStateError):
        reg.rollback(tenant_id=t, adapter_id=adapter_id, to_number=1, actor="x")  # nothing live yet
    reg.promote(tenant_id=t, adapter_id=adapter_id, number=2, actor="qa")
    with pytest.raises(InvalidStateError):
        reg.promote(tenant_id=t, adapter_id=adapter_id, number=2, actor="qa")  # already live
    with pytest.raises(InvalidStateError):
        reg.rollback(tenant_id=t, adapter_id=adapter_id, to_number=3, actor="x")  # not earlier
    with pytest.raises(NotFoundError):
        reg.promote(tenant_id=t, adapter_id=adapter_id, number=9, actor="qa")
    with pytest.raises(ValidationError):
        reg.promote(tenant_id=t, adapter_id=adapter_id, number=3, actor="")
    reg.set_status(tenant_id=t, adapter_id=adapter_id, number=3, status="rejected")
    with pytest.raises(InvalidStateError, match="rejected"):
        reg.promote(tenant_id=t, adapter_id=adapter_id, number=3, actor="qa")
    assert len(reg.alias_history(tenant_id=t, adapter_id=adapter_id)) == 1


def test_set_status(
    local_registry: Registry, tenants: TwoTenants, make_adapter_dir: Callable[..., Path]
) -> None:
    reg, t = local_registry, tenants.a
    adapter_id, _ = _versions(reg, tenants, make_adapter_dir, 2)
    rejected = reg.set_status(tenant_id=t, adapter_id=adapter_id, number=2, status="rejected")
    assert rejected.status == "rejected"
    assert reg.get_version(tenant_id=t, adapter_id=adapter_id, number=2).status == "rejected"
    with pytest.raises(ValidationError):
        reg.set_status(tenant_id=t, adapter_id=adapter_id, number=1, status="live")
    reg.promote(tenant_id=t, adapter_id=adapter_id, number=1, actor="qa")
    with pytest.raises(InvalidStateError, match="is live"):
        reg.set_status(tenant_id=t, adapter_id=adapter_id, number=1, status="rejected")


def test_adapters_create_find_list(local_registry: Registry, tenants: TwoTenants) -> None:
    reg, t = local_registry, tenants.a
    own = reg.create_adapter(tenant_id=t, owner_user_id=tenants.a_user, name="chat", target_config={"r": 8})
    task = reg.create_adapter(tenant_id=t, owner_user_id=None, name="chat", target_config={})
    assert task.is_task_adapter and not own.is_task_adapter
    with pytest.raises(AlreadyExistsError):
        reg.create_adapter(tenant_id=t, owner_user_id=tenants.a_user, name="chat", target_config={})
    again = reg.get_or_create_adapter(
        tenant_id=t, owner_user_id=tenants.a_user, name="chat", target_config={}
    )
    assert again == own
    assert reg.find_adapter(tenant_id=t, owner_user_id=None, name="chat") == task
    assert reg.find_adapter(tenant_id=t, owner_user_id=tenants.a_user, name="nope") is None
    assert reg.get_adapter(tenant_id=t, adapter_id=own.id) == own
    assert reg.list_adapters(tenant_id=t) == [own, task]
    assert reg.list_adapters(tenant_id=t, owner_user_id=tenants.a_user) == [own]
    with pytest.raises(ValidationError):
        reg.create_adapter(tenant_id=t, owner_user_id=None, name="", target_config={})
