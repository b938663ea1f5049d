"""Lineage: ancestors and descendants across generations, with the snapshots and jobs that produced them."""

from __future__ import annotations

import pytest
from registry_helpers import RegistryEnv, insert_job, insert_snapshot
from sqlalchemy import event

from lorafleet.domain import LineageEdge
from lorafleet.errors import NotFoundError


def test_lineage_across_three_generations_with_a_merge(env: RegistryEnv) -> None:
    """g1 → (g2a, g2b) → g3 (merged from both): a diamond, so g1 must appear once, at distance 2."""
    reg, t = env.registry, env.tenants.a
    chat = reg.create_adapter(tenant_id=t, owner_user_id=env.tenants.a_user, name="chat", target_config={})
    code = reg.create_adapter(tenant_id=t, owner_user_id=env.tenants.a_user, name="code", target_config={})
    snaps = [insert_snapshot(env.db, user_id=env.tenants.a_user, count=n) for n in (10, 20, 30, 40)]
    jobs = [insert_job(env.db, tenant_id=t) for _ in range(4)]

    def register(adapter_id: int, i: int, parents: list[tuple[int, str]]) -> int:
        return reg.register_version(
            tenant_id=t,
            adapter_id=adapter_id,
            adapter_dir=env.adapter_dir(seed=i),
            base_fingerprint="fp",
            parents=parents,  # type: ignore[arg-type]
            job_id=jobs[i],
            dataset_snapshot_id=snaps[i],
        ).id

    g1 = register(chat.id, 0, [])
    g2a = register(chat.id, 1, [(g1, "continued-from")])
    g2b = register(code.id, 2, [(g1, "imported")])
    g3 = register(chat.id, 3, [(g2a, "merged-from"), (g2b, "merged-from")])

    down = reg.lineage(tenant_id=t, version_id=g1)
    assert down.root.version.id == g1 and down.ancestors == ()
    assert [(n.version.id, n.distance) for n in down.descendants] == [(g2a, 1), (g2b, 1), (g3, 2)]
    assert down.root.dataset_snapshot is not None and down.root.dataset_snapshot.record_count == 10
    assert down.root.job is not None and down.root.job.id == jobs[0] and down.root.job.state == "succeeded"

    up = reg.lineage(tenant_id=t, version_id=g3)
    assert [(n.version.id, n.distance) for n in up.ancestors] == [(g2a, 1), (g2b, 1), (g1, 2)]
    assert up.descendants == ()
    assert set(up.edges) == {
        LineageEdge(g2a, g1, "continued-from"),
        LineageEdge(g2b, g1, "imported"),
        LineageEdge(g3, g2a, "merged-from"),
        LineageEdge(g3, g2b, "merged-from"),
    }
    assert [n.dataset_snapshot.record_count for n in up.ancestors if n.dataset_snapshot] == [20, 30, 10]

    middle = reg.lineage(tenant_id=t, version_id=g2a)
    assert [n.version.id for n in middle.ancestors] == [g1]
    assert [n.version.id for n in middle.descendants] == [g3]
    assert set(middle.edges) == {LineageEdge(g2a, g1, "continued-from"), LineageEdge(g3, g2a, "merged-from")}

    near = reg.lineage(tenant_id=t, version_id=g3, depth=1)
    assert [n.version.id for n in near.ancestors] == [g2a, g2b]
    assert all(g1 not in (e.child_version_id, e.parent_version_id) for e in near.edges)
    assert reg.lineage(tenant_id=t, version_id=g3, depth=0).ancestors == ()


def test_a_chain_of_many_generations_is_one_query_per_direction(env: RegistryEnv) -> None:
    reg, t = env.registry, env.tenants.a
    adapter = reg.create_adapter(tenant_id=t, owner_user_id=None, name="task", target_config={})
    folder = env.adapter_dir()
    ids: list[int] = []
    for _ in range(12):
        parents = [(ids[-1], "continued-from")] if ids else []
        ids.append(
            reg.register_version(
                tenant_id=t,
                adapter_id=adapter.id,
                adapter_dir=folder,
                base_fingerprint="fp",
                parents=parents,  # type: ignore[arg-type]
            ).id
        )
    statements: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    event.listen(env.db.engine, "before_cursor_execute", record)
    try:
        lineage = reg.lineage(tenant_id=t, version_id=ids[5])
    finally:
        event.remove(env.db.engine, "before_cursor_execute", record)
    assert sum("lineage_edges" in stmt for stmt in statements) == 2
    assert [n.version.id for n in lineage.ancestors] == ids[4::-1]
    assert [n.distance for n in lineage.descendants] == list(range(1, 7))


def test_job_and_snapshot_of_another_tenant_are_refused(env: RegistryEnv) -> None:
    reg, tenants = env.registry, env.tenants
    adapter = reg.create_adapter(tenant_id=tenants.a, owner_user_id=None, name="task", target_config={})
    foreign_job = insert_job(env.db, tenant_id=tenants.b)
    foreign_snap = insert_snapshot(env.db, user_id=tenants.b_user)
    for kwargs in ({"job_id": foreign_job}, {"dataset_snapshot_id": foreign_snap}):
        with pytest.raises(NotFoundError):
            reg.register_version(
                tenant_id=tenants.a,
                adapter_id=adapter.id,
                adapter_dir=env.adapter_dir(),
                base_fingerprint="fp",
                **kwargs,  # type: ignore[arg-type]
            )
    system_job = insert_job(env.db, tenant_id=None)
    version = reg.register_version(
        tenant_id=tenants.a,
        adapter_id=adapter.id,
        adapter_dir=env.adapter_dir(),
        base_fingerprint="fp",
        job_id=system_job,
    )
    assert version.number == 1 and version.job_id == system_job
