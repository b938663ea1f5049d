"""A user's experts over the real databases: members, revision, enrolments (with events), gate settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from routing_helpers import World, add_live_version
from sqlalchemy import select
from tests.databases import writer_holding_the_lock

from lorafleet.errors import AlreadyExistsError, NotFoundError, ValidationError
from lorafleet.registry import Registry
from lorafleet.routing import (
    ExpertSet,
    GateSpec,
    clear_gate_spec,
    enrol,
    enrolment_history,
    list_enrolments,
    resolve_user_experts,
    set_gate_spec,
    unenrol,
)
from lorafleet.routing.experts import gate_adapter_id, resolve_model_experts, served_task_models
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlEnrolmentEvent

KEY = (0.6, 0.8)


def _adapter(registry: Registry, *, tenant: int, owner: int | None, name: str) -> int:
    return registry.create_adapter(tenant_id=tenant, owner_user_id=owner, name=name, target_config={}).id


def _bank(database: Database, world: World, user: str = "alice") -> ExpertSet:
    return resolve_user_experts(database, tenant_id=world.a, user_external_id=user)


def test_unknown_user_gets_an_empty_bank_and_the_default_gate(database: Database, world: World) -> None:
    bank = resolve_user_experts(database, tenant_id=world.a, user_external_id="newcomer")
    assert (bank.user_id, bank.members, bank.gate) == (None, (), GateSpec())
    assert bank.revision == _bank(database, world).revision  # alice has nothing live yet: same content
    with pytest.raises(ValidationError):
        resolve_user_experts(database, tenant_id=world.a, user_external_id="")


def test_bank_holds_live_own_and_enrolled_task_adapters_only(
    database: Database, registry: Registry, world: World, tmp_path: Path
) -> None:
    own = _adapter(registry, tenant=world.a, owner=world.alice, name="style")
    no_live = _adapter(registry, tenant=world.a, owner=world.alice, name="draft")
    task = _adapter(registry, tenant=world.a, owner=None, name="summarise")
    other_task = _adapter(registry, tenant=world.a, owner=None, name="translate")
    bobs = _adapter(registry, tenant=world.a, owner=world.bob, name="style")
    for seed, adapter in enumerate((own, task, other_task, bobs)):
        add_live_version(registry, tmp_path, tenant_id=world.a, adapter_id=adapter, seed=seed, key=KEY)
    add_live_version(registry, tmp_path, tenant_id=world.a, adapter_id=no_live, seed=9, promote=False)
    enrol(database, tenant_id=world.a, user_external_id="alice", task_name="summarise", actor="admin")

    bank = _bank(database, world)
    assert [(m.adapter_name, m.kind) for m in bank.members] == [("style", "personal"), ("summarise", "task")]
    live = registry.live_version(tenant_id=world.a, adapter_id=own)
    assert live is not None
    first = bank.members[0]
    assert (first.adapter_id, first.version_id, first.version_number) == (own, live.id, 1)
    assert (first.sha256, first.size_bytes, first.rank, first.routing_key) == (
        live.sha256,
        live.size_bytes,
        live.rank,
        KEY,
    )
    assert bank.index_of(task) == 1 and bank.index_of(bobs) is None
    assert [m.adapter_name for m in _bank(database, world, "bob").members] == ["style"]


def test_revision_follows_promote_rollback_enrol_and_unenrol(
    database: Database, registry: Registry, world: World, tmp_path: Path
) -> None:
    own = _adapter(registry, tenant=world.a, owner=world.alice, name="style")
    task = _adapter(registry, tenant=world.a, owner=None, name="summarise")
    add_live_version(registry, tmp_path, tenant_id=world.a, adapter_id=task, seed=0, key=KEY)
    revisions = [_bank(database, world).revision]

    v1 = add_live_version(registry, tmp_path, tenant_id=world.a, adapter_id=own, seed=1, key=KEY)
    revisions.append(_bank(database, world).revision)
    v2 = add_live_version(registry, tmp_path, tenant_id=world.a, adapter_id=own, seed=2, key=KEY)
    assert _bank(database, world).members[0].version_id == v2
    revisions.append(_bank(database, world).revision)

    registry.rollback(tenant_id=world.a, adapter_id=own, to_number=1, actor="ops")
    rolled_back = _bank(database, world)
    assert rolled_back.members[0].version_id == v1
    assert rolled_back.revision == revisions[1]  # the same bank as before v2: the same revision

    enrol(database, tenant_id=world.a, user_external_id="alice", task_name="summarise", actor="admin")
    enrolled = _bank(database, world)
    assert [m.adapter_name for m in enrolled.members] == ["style", "summarise"]
    revisions.append(enrolled.revision)

    unenrol(database, tenant_id=world.a, user_external_id="alice", task_name="summarise", actor="admin")
    assert _bank(database, world).revision == revisions[1]
    registry.rollback(tenant_id=world.a, adapter_id=own, to_number=None, actor="ops")
    assert _bank(database, world).members == ()
    assert len(set(revisions)) == len(revisions) == 4


def test_routing_key_is_stored_with_a_version_and_changes_the_revision(
    database: Database, registry: Registry, world: World, tmp_path: Path
) -> None:
    own = _adapter(registry, tenant=world.a, owner=world.alice, name="style")
    version_id = add_live_version(registry, tmp_path, tenant_id=world.a, adapter_id=own, seed=0)
    before = _bank(database, world)
    assert before.members[0].routing_key is None
    registry.set_routing_key(tenant_id=world.a, version_id=version_id, key=[0.0, 1.0])
    after = _bank(database, world)
    assert after.members[0].routing_key == (0.0, 1.0) and after.revision != before.revision
    for bad in ([], [float("nan"), 1.0], [0.0, 0.0], ["x"]):
        with pytest.raises(ValidationError):
            registry.set_routing_key(tenant_id=world.a, version_id=version_id, key=bad)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        registry.set_routing_key(tenant_id=world.b, version_id=version_id, key=[1.0])
    with pytest.raises(ValidationError):
        add_live_version(registry, tmp_path, tenant_id=world.a, adapter_id=own, seed=1, key=(float("inf"),))


def test_a_routing_claim_is_stored_with_a_version_and_changes_the_revision(
    database: Database, registry: Registry, world: World, tmp_path: Path
) -> None:
    own = _adapter(registry, tenant=world.a, owner=world.alice, name="style")
    first = add_live_version(
        registry, tmp_path, tenant_id=world.a, adapter_id=own, seed=0, key=(0.0, 1.0), claim=(1.0, 2.0, -0.5)
    )
    bank = _bank(database, world)
    assert bank.members[0].routing_claim == (1.0, 2.0, -0.5)
    registry.set_routing_key(tenant_id=world.a, version_id=first, key=[0.0, 1.0], claim=[3.0, 0.0, 1.0])
    after = _bank(database, world)
    assert after.members[0].routing_claim == (3.0, 0.0, 1.0) and after.revision != bank.revision
    registry.set_routing_key(tenant_id=world.a, version_id=first, key=[1.0, 0.0])  # no claim: kept
    assert _bank(database, world).members[0].routing_claim == (3.0, 0.0, 1.0)
    for bad in ([], [float("nan"), 1.0], [0.0, 0.0], ["x"]):
        with pytest.raises(ValidationError, match="routing claim"):
            registry.set_routing_key(tenant_id=world.a, version_id=first, key=[1.0], claim=bad)  # type: ignore[arg-type]
    assert _bank(database, world).members[0].routing_key == (1.0, 0.0)  # a refused claim changed nothing
    versions = len(registry.list_versions(tenant_id=world.a, adapter_id=own))
    with pytest.raises(ValidationError, match="routing claim"):
        add_live_version(
            registry, tmp_path, tenant_id=world.a, adapter_id=own, seed=1, key=(1.0,), claim=(0.0,)
        )
    assert len(registry.list_versions(tenant_id=world.a, adapter_id=own)) == versions  # no row written


def test_cross_tenant_and_personal_adapters_cannot_be_enrolled_in(
    database: Database, registry: Registry, world: World, tmp_path: Path
) -> None:
    foreign = _adapter(registry, tenant=world.b, owner=None, name="summarise")
    add_live_version(registry, tmp_path, tenant_id=world.b, adapter_id=foreign, seed=0)
    _adapter(registry, tenant=world.a, owner=world.bob, name="bobs-style")
    for name in ("summarise", "bobs-style", "missing"):
        with pytest.raises(NotFoundError):
            enrol(database, tenant_id=world.a, user_external_id="alice", task_name=name, actor="admin")
    with pytest.raises(NotFoundError):  # tenant B's user is unknown to tenant A...
        unenrol(database, tenant_id=world.a, user_external_id="carol", task_name="summarise", actor="x")
    enrol(database, tenant_id=world.b, user_external_id="carol", task_name="summarise", actor="admin-b")
    assert list_enrolments(database, tenant_id=world.a, user_external_id="carol") == []  # ...and stays so
    assert [
        m.adapter_id
        for m in resolve_user_experts(database, tenant_id=world.b, user_external_id="carol").members
    ] == [foreign]
    assert enrolment_history(database, tenant_id=world.a, user_external_id="alice") == []


def test_enrolment_events_are_recorded_with_actor_and_time(
    database: Database, registry: Registry, world: World
) -> None:
    task = _adapter(registry, tenant=world.a, owner=None, name="summarise")
    first = enrol(database, tenant_id=world.a, user_external_id="alice", task_name="summarise", actor="admin")
    assert (first.user_id, first.adapter_id, first.task_name, first.actor) == (
        world.alice,
        task,
        "summarise",
        "admin",
    )
    with pytest.raises(AlreadyExistsError):
        enrol(database, tenant_id=world.a, user_external_id="alice", task_name="summarise", actor="admin")
    unenrol(database, tenant_id=world.a, user_external_id="alice", task_name="summarise", actor="support")
    with pytest.raises(NotFoundError):
        unenrol(database, tenant_id=world.a, user_external_id="alice", task_name="summarise", actor="support")
    enrol(database, tenant_id=world.a, user_external_id="alice", task_name="summarise", actor="sdk")
    # a new user is created by enrolment, so a tenant can set a bank up before any feedback
    enrol(database, tenant_id=world.a, user_external_id="dora", task_name="summarise", actor="admin")

    history = enrolment_history(database, tenant_id=world.a, user_external_id="alice")
    assert [(e.action, e.actor, e.adapter_id) for e in history] == [
        ("enrol", "admin", task),
        ("unenrol", "support", task),
        ("enrol", "sdk", task),
    ]
    assert all(e.created_at.tzinfo is not None for e in history)
    assert history[0].created_at <= history[1].created_at <= history[2].created_at
    assert [
        (e.task_name, e.actor) for e in list_enrolments(database, tenant_id=world.a, user_external_id="alice")
    ] == [("summarise", "sdk")]
    with database.session() as s:  # the failed calls wrote nothing
        assert len(s.scalars(select(SqlEnrolmentEvent)).all()) == 4
    with pytest.raises(ValidationError):
        enrol(database, tenant_id=world.a, user_external_id="alice", task_name="summarise", actor="")


def test_gate_settings_change_the_bank_and_fall_back_to_the_default(
    database: Database, registry: Registry, world: World
) -> None:
    default = _bank(database, world)
    fixed = GateSpec(kind="fixed", fixed_weights={"style": 1.0})
    set_gate_spec(database, tenant_id=world.a, user_external_id="alice", spec=fixed, actor="admin")
    bank = _bank(database, world)
    assert bank.gate == fixed and bank.revision != default.revision
    sharper = GateSpec(top_k=1, temperature=0.05)
    set_gate_spec(database, tenant_id=world.a, user_external_id="alice", spec=sharper, actor="admin")
    assert _bank(database, world).gate == sharper
    clear_gate_spec(database, tenant_id=world.a, user_external_id="alice")
    assert _bank(database, world).gate == GateSpec()
    assert _bank(database, world).revision == default.revision


def test_a_pinned_learned_version_must_be_the_users_own_gate(
    database: Database, registry: Registry, world: World, tmp_path: Path
) -> None:
    own = _adapter(registry, tenant=world.a, owner=world.alice, name="style")
    lora_version = add_live_version(registry, tmp_path, tenant_id=world.a, adapter_id=own, seed=0)
    spec = GateSpec(kind="learned", learned_version_id=lora_version)
    with pytest.raises(ValidationError):
        set_gate_spec(database, tenant_id=world.a, user_external_id="alice", spec=spec, actor="admin")
    with pytest.raises(NotFoundError):
        set_gate_spec(database, tenant_id=world.b, user_external_id="carol", spec=spec, actor="admin")
    assert gate_adapter_id(database, tenant_id=world.a, user_id=world.alice) is None
    with pytest.raises(NotFoundError):  # a user of another tenant
        gate_adapter_id(database, tenant_id=world.a, user_id=world.carol, create=True)


def test_serving_lookups_do_not_wait_for_a_writer(
    database: Database, registry: Registry, world: World, tmp_path: Path
) -> None:
    """What serving reads per request (the bank, a named model, the served task models, a learned gate's version,
    an adapter by name) is a read-only transaction: it answers while another connection holds a write open."""
    own = _adapter(registry, tenant=world.a, owner=world.alice, name="style")
    task = _adapter(registry, tenant=world.a, owner=None, name="summarise")
    own_version = add_live_version(registry, tmp_path, tenant_id=world.a, adapter_id=own, seed=0, key=KEY)
    add_live_version(registry, tmp_path, tenant_id=world.a, adapter_id=task, seed=1, key=KEY)
    enrol(database, tenant_id=world.a, user_external_id="alice", task_name="summarise", actor="admin")

    with writer_holding_the_lock(database):
        assert [m.adapter_name for m in _bank(database, world).members] == ["style", "summarise"]
        named = resolve_model_experts(
            database, tenant_id=world.a, owner="alice", adapter="style", version=None
        )
        assert [m.version_id for m in named.members] == [own_version]
        assert served_task_models(database, tenant_id=world.a) == ["summarise"]
        assert registry.get_version_by_id(tenant_id=world.a, version_id=own_version).adapter_id == own
        found = registry.find_adapter(tenant_id=world.a, owner_user_id=world.alice, name="style")
        assert found is not None and found.id == own
