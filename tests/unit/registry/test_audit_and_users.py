"""The audit log and the users listing over both databases: each audited action writes exactly one event with
the right fields and no personal content, in the action's transaction (a failed one writes none); UPDATE and
DELETE of an event are refused by the database; user summaries count feedback and versions and name live
versions, per tenant, never listing task subjects."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text
from tests.unit.registry.registry_helpers import RegistryEnv, TwoTenants, registered_versions

from lorafleet.domain import Adapter, AdapterVersion, AuditAction, AuditEvent, PromoteRule
from lorafleet.errors import (
    AlreadyExistsError,
    InvalidStateError,
    LorafleetError,
    QAUndecidedError,
    ValidationError,
)
from lorafleet.jobs.queue import JobQueue
from lorafleet.registry import Registry
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.workflows.audit import list_events, record_event
from lorafleet.workflows.feedback import ingest_feedback
from lorafleet.workflows.live_alias import move_live, promote_manually
from lorafleet.workflows.tasks import ingest_task_feedback

SECRET_PROMPT = "my secret diagnosis"


def _events(db: Database, tenant_id: int | None = None) -> list[AuditEvent]:
    return list_events(db, tenant_id=tenant_id, limit=1000)


def _rollback(
    db: Database, registry: Registry, adapter: Adapter, *, to: int | None, actor: str, reason: str = "x"
) -> None:
    move_live(
        registry=registry,
        queue=JobQueue(db),
        tenant_id=adapter.tenant_id,
        adapter=adapter,
        action="rollback",
        number=to,
        actor=actor,
        reason=reason,
    )


def _promote(
    db: Database, registry: Registry, adapter: Adapter, number: int, *, rule: PromoteRule, force: bool = False
) -> None:
    promote_manually(
        db,
        registry,
        tenant_id=adapter.tenant_id,
        adapter=adapter,
        number=number,
        actor="api:tenant-a",
        reason=SECRET_PROMPT,
        promote_rule=rule,
        force=force,
    )


def _personal(env: RegistryEnv, *, live: list[int]) -> tuple[Adapter, list[AdapterVersion]]:
    """Alice's adapter ``personal`` (tenant A) with versions 1 and 2, ``live`` promoted in turn."""
    tenants = env.tenants
    adapter_id, versions = registered_versions(
        env.registry, env.adapter_dir, tenants.a, tenants.a_user, "personal", seeds=[1, 2], live=live
    )
    return env.registry.get_adapter(tenant_id=tenants.a, adapter_id=adapter_id), versions


def _no_personal_content(event: AuditEvent) -> None:
    dumped = json.dumps(event.details)
    assert SECRET_PROMPT not in dumped and "reason" not in event.details


def test_a_forced_promote_and_a_rollback_write_one_event_each(env: RegistryEnv) -> None:
    database, registry, tenants = env.db, env.registry, env.tenants
    adapter, versions = _personal(env, live=[1])
    before = len(_events(database))

    _promote(database, registry, adapter, 2, rule=PromoteRule.QA, force=True)
    forced = _events(database)[before:]
    assert [(e.action, e.tenant_id, e.actor, e.target) for e in forced] == [
        (AuditAction.PROMOTE_FORCED, tenants.a, "api:tenant-a", "user:alice/personal@2")
    ]
    assert forced[0].details["from_version_id"] == versions[0].id
    assert forced[0].details["to_version_id"] == versions[1].id
    assert forced[0].details["adapter_id"] == adapter.id
    _no_personal_content(forced[0])

    _rollback(database, registry, adapter, to=None, actor="cli", reason=SECRET_PROMPT)
    rolled = _events(database)[before + 1 :]
    assert [(e.action, e.actor, e.target) for e in rolled] == [
        (AuditAction.ROLLBACK, "cli", "user:alice/personal@none")
    ]
    assert rolled[0].details["to_version_id"] is None
    _no_personal_content(rolled[0])
    # only tenant A's log holds them
    assert [e.id for e in _events(database, tenants.b)] == []


def test_failed_or_unforced_moves_write_no_event(env: RegistryEnv) -> None:
    database, registry = env.db, env.registry
    adapter, _ = _personal(env, live=[])
    before = len(_events(database))
    with pytest.raises(InvalidStateError):  # nothing live: nothing to roll back from
        _rollback(database, registry, adapter, to=None, actor="cli")
    with pytest.raises(QAUndecidedError):  # not forced: refused
        _promote(database, registry, adapter, 1, rule=PromoteRule.QA)
    # a promote that needs no force is no audited action
    _promote(database, registry, adapter, 1, rule=PromoteRule.ALWAYS)
    assert len(_events(database)) == before


def test_a_task_rollback_is_audited_under_the_task(env: RegistryEnv) -> None:
    database, registry, tenants = env.db, env.registry, env.tenants
    adapter_id, _ = registered_versions(
        registry, env.adapter_dir, tenants.a, None, "faq", seeds=[1, 2], live=[1, 2]
    )
    adapter = registry.get_adapter(tenant_id=tenants.a, adapter_id=adapter_id)
    _rollback(database, registry, adapter, to=1, actor="qa")
    (event,) = _events(database, tenants.a)
    assert (event.action, event.actor, event.target) == (AuditAction.ROLLBACK, "qa", "task:faq@1")


def test_tenant_and_key_changes_are_audited_without_the_key(database: Database) -> None:
    repo = TenantRepository(database)
    tenant, first_key = repo.create_tenant(name="acme", actor="api:admin")
    second_key = repo.create_api_key(tenant_id=tenant.id, actor="cli")
    keys = repo.list_api_keys(tenant_id=tenant.id)
    repo.revoke_api_key_by_id(tenant_id=tenant.id, key_id=keys[1].id, actor="api:admin")
    repo.revoke_api_key_by_id(tenant_id=tenant.id, key_id=keys[1].id, actor="api:admin")  # a repeat: no event
    repo.revoke_api_key(api_key=first_key, actor="cli")

    events = _events(database, tenant.id)
    assert [(e.action, e.actor, e.target) for e in events] == [
        (AuditAction.TENANT_CREATED, "api:admin", "tenant:acme"),
        (AuditAction.KEY_CREATED, "cli", f"key:{keys[1].id}"),
        (AuditAction.KEY_REVOKED, "api:admin", f"key:{keys[1].id}"),
        (AuditAction.KEY_REVOKED, "cli", f"key:{keys[0].id}"),
    ]
    assert [e.details["key_id"] for e in events] == [keys[0].id, keys[1].id, keys[1].id, keys[0].id]
    dumped = json.dumps([e.details for e in events])
    for key in (first_key, second_key):
        assert key not in dumped and key[len("lf_") + 8 :] not in dumped  # at most the shown prefix

    # a failed creation (the name is taken) writes nothing
    with pytest.raises(AlreadyExistsError):
        repo.create_tenant(name="acme", actor="api:admin")
    assert len(_events(database)) == 4


def test_record_event_joins_the_unit_of_work(database: Database, tenants: TwoTenants) -> None:
    with pytest.raises(RuntimeError), database.unit_of_work():
        record_event(database, tenant_id=tenants.a, actor="cli", action="delete.user", target="user:alice")
        raise RuntimeError("the action failed")
    assert _events(database) == []
    record_event(
        database, tenant_id=None, actor="api:admin", action=AuditAction.EXPORT_VERSION, target="t", details={}
    )
    (event,) = _events(database)
    assert event.tenant_id is None and event.action == AuditAction.EXPORT_VERSION
    with pytest.raises(ValidationError, match="action"):
        record_event(database, tenant_id=None, actor="cli", action="delete.everything", target="t")
    with pytest.raises(ValidationError, match="limit"):
        list_events(database, limit=0)
    assert [e.id for e in list_events(database, action=AuditAction.DELETE_USER)] == []


@pytest.mark.parametrize(
    "statement", ["UPDATE audit_events SET actor = 'someone else'", "DELETE FROM audit_events"]
)
def test_the_database_refuses_to_change_or_remove_an_event(
    database: Database, tenants: TwoTenants, statement: str
) -> None:
    record_event(database, tenant_id=tenants.a, actor="cli", action=AuditAction.ROLLBACK, target="t")
    with pytest.raises(LorafleetError, match="append-only"), database.session() as session:
        session.execute(text(statement))
    (event,) = _events(database)
    assert event.actor == "cli"


def test_user_summaries_count_and_name_live_versions_per_tenant(env: RegistryEnv) -> None:
    database, registry, tenants = env.db, env.registry, env.tenants
    repo = TenantRepository(database)
    records = [{"kind": "sft", "prompt": f"q{i}", "completion": "a"} for i in range(3)]
    ingest_feedback(database, tenant_id=tenants.a, user_external_id="alice", records=records)
    ingest_feedback(database, tenant_id=tenants.a, user_external_id="carol", records=records[:1])
    ingest_task_feedback(database, tenant_id=tenants.a, task_name="faq", records=records)  # a task subject
    registered_versions(
        registry, env.adapter_dir, tenants.a, tenants.a_user, "personal", seeds=[1, 2, 3], live=[1, 2]
    )
    style_id, _ = registered_versions(
        registry, env.adapter_dir, tenants.a, tenants.a_user, "style", seeds=[4]
    )
    registered_versions(registry, env.adapter_dir, tenants.b, tenants.b_user, "personal", seeds=[5], live=[1])

    found = {u.external_id: u for u in repo.list_user_summaries(tenant_id=tenants.a)}
    assert list(found) == ["alice", "carol"]  # by id; no task subject, no user of tenant B
    alice, carol = found["alice"], found["carol"]
    assert (alice.feedback_count, alice.version_count, alice.live_versions) == (3, 4, {"personal": 2})
    assert (carol.feedback_count, carol.version_count, carol.live_versions) == (1, 0, {})
    assert alice.last_feedback_at is not None and alice.last_feedback_at.tzinfo is not None
    assert carol.last_feedback_at is not None and carol.last_feedback_at >= alice.last_feedback_at

    # a promote moves the live version; new feedback counts at once
    registry.promote(tenant_id=tenants.a, adapter_id=style_id, number=1, actor="test", reason="ok")
    ingest_feedback(
        database,
        tenant_id=tenants.a,
        user_external_id="alice",
        records=[{"kind": "sft", "prompt": "n", "completion": "b"}],
    )
    alice = repo.list_user_summaries(tenant_id=tenants.a, limit=1)[0]
    assert (alice.feedback_count, alice.live_versions) == (4, {"personal": 2, "style": 1})
    assert [u.external_id for u in repo.list_user_summaries(tenant_id=tenants.a, limit=1, offset=1)] == [
        "carol"
    ]
    assert [u.external_id for u in repo.list_user_summaries(tenant_id=tenants.b)] == ["bob"]
    with pytest.raises(ValidationError, match="limit"):
        repo.list_user_summaries(tenant_id=tenants.a, limit=1001)
