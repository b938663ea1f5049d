"""After a user is forgotten (``lorafleet.workflows.erasure.forget_user``), a request for them is answered by the
base model alone, even while the engine's adapter cache still holds their version's weights; another user's
adapter and the shared task adapter they were both enrolled in serve as before."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lorafleet.adapters import AdapterBank
from lorafleet.backbone import Backbone
from lorafleet.registry import Registry
from lorafleet.routing.experts import enrol, resolve_user_experts
from lorafleet.serving import AdapterCache, GenerationEngine, GenerationRequest
from lorafleet.serving.engine import database_resolver
from lorafleet.store.blob import open_blob_store
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlTenant
from lorafleet.store.sql.tenants import user_id_of
from lorafleet.workflows.erasure import forget_user
from lorafleet.workflows.feedback import ingest_feedback


def _live(registry: Registry, tenant: int, owner: int | None, name: str, folder: Path) -> str:
    adapter = registry.get_or_create_adapter(
        tenant_id=tenant, owner_user_id=owner, name=name, target_config={}
    )
    version = registry.register_version(
        tenant_id=tenant, adapter_id=adapter.id, adapter_dir=folder, base_fingerprint="tiny-v1"
    )
    registry.promote(tenant_id=tenant, adapter_id=adapter.id, number=version.number, actor="test")
    return version.sha256


def test_a_forgotten_user_is_served_by_the_base_even_from_a_warm_cache(
    sqlite_database: Database,
    tmp_path: Path,
    backbone: Backbone,
    bank: AdapterBank,
    adapter_folders: Callable[[int], Path],
) -> None:
    db, blobs = sqlite_database, open_blob_store((tmp_path / "blobs").as_uri())
    registry = Registry(db, blobs)
    with db.session() as s:
        row = SqlTenant(name="tenant")
        s.add(row)
        s.flush()
        tenant = row.id
    users: dict[str, int | None] = {}
    for name in ("alice", "bob"):
        record = {"kind": "sft", "prompt": f"{name} asks", "completion": "An answer."}
        ingest_feedback(db, tenant_id=tenant, user_external_id=name, records=[record])
        users[name] = db.run(user_id_of, tenant_id=tenant, external_id=name)
    task_sha = _live(registry, tenant, None, "summarise", adapter_folders(40))
    alice_sha = _live(registry, tenant, users["alice"], "personal", adapter_folders(41))
    bob_sha = _live(registry, tenant, users["bob"], "personal", adapter_folders(42))
    for name in users:
        enrol(db, tenant_id=tenant, user_external_id=name, task_name="summarise", actor="test")
    engine = GenerationEngine(
        backbone,
        bank,
        AdapterCache.from_blob_store(bank, blobs, capacity_slots=4),
        resolve_bank=database_resolver(db),
    )

    def ask(user: str) -> GenerationRequest:
        return GenerationRequest(tenant_id=tenant, user=user, prompt="Tell me something.", max_new_tokens=4)

    warm = engine.generate([ask("alice"), ask("bob")])
    assert alice_sha in {s.sha256 for s in warm[0].served_by}
    assert bob_sha in {s.sha256 for s in warm[1].served_by}
    assert alice_sha in engine.cache  # warm

    forget_user(db, registry, tenant_id=tenant, external_id="alice", actor="test")

    alice, bob = engine.generate([ask("alice"), ask("bob")])
    base, _ = engine.generate([ask("carol"), ask("bob")])  # nobody's: the base model, in the same batch shape
    assert alice.served_by == () and alice.token_ids == base.token_ids
    assert alice_sha in engine.cache  # still cached by content hash, never asked for again
    assert [(s.sha256, s.weight) for s in bob.served_by] == [(s.sha256, s.weight) for s in warm[1].served_by]
    assert bob.bank_revision == warm[1].bank_revision  # bob's bank, the shared task adapter in it, unchanged
    assert task_sha in {
        m.sha256 for m in resolve_user_experts(db, tenant_id=tenant, user_external_id="bob").members
    }
    assert bob.token_ids == warm[1].token_ids
