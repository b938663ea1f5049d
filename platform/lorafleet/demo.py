"""``make demo``: lorafleet's main path on the embedded defaults (SQLite + a local blob directory).

Migrates the database, creates a tenant and a user with feedback, loads the built-in tiny backbone in nf4
with an adapter bank, registers three versions of the user's adapter (each continuing from the last),
promotes them, rolls back to version 1, and shows that the live weights, the alias history and the lineage
all agree. Every step uses the real library; nothing is simulated.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

log = logging.getLogger("lorafleet.demo")

PROMPT = "Q: my favourite colour? A:"


def _feedback() -> list[dict[str, object]]:
    return [
        {"kind": "sft", "prompt": PROMPT, "completion": " teal"},
        {"kind": "preference", "prompt": "Q: tea or coffee? A:", "chosen": " tea", "rejected": " coffee"},
        {"kind": "rating", "prompt": "Q: a pet? A:", "response": " a cat", "score": 0.9},
    ]


def run_demo() -> int:
    import torch

    from lorafleet.adapters import RoutingPlan, SlotConfig, inject_bank, load_slot_from_dir, save_slot
    from lorafleet.backbone import load_backbone
    from lorafleet.config import load_settings
    from lorafleet.domain import LineageRelation
    from lorafleet.feedback import ingest_feedback
    from lorafleet.registry import Registry
    from lorafleet.store.blob import open_blob_store_from_settings
    from lorafleet.store.sql import migrate
    from lorafleet.store.sql.database import Database
    from lorafleet.store.sql.tenants import TenantRepository

    settings = load_settings()
    url = settings.resolved_database_url
    log.info("database %s, object store %s", url, settings.resolved_object_store_url)
    migrate.upgrade(url)
    db = Database(url)
    registry = Registry(db, open_blob_store_from_settings(settings))
    tenants = TenantRepository(db)

    tenant, _key = tenants.create_tenant(name=f"demo-{int(time.time() * 1000)}")
    user = tenants.get_or_create_user(tenant_id=tenant.id, external_id="alice")
    ingested = ingest_feedback(db, tenant_id=tenant.id, user_external_id="alice", records=_feedback())
    print(f"tenant {tenant.name!r}: user alice, {ingested.created} feedback records stored")

    log.info("loading the built-in tiny backbone (nf4)")
    backbone = load_backbone(
        settings.backbone, quantization=settings.backbone_quantization, device=settings.device
    )
    bank = inject_bank(backbone, target_modules="all-linear", n_slots=2, max_rank=8)
    config = SlotConfig(rank=8, alpha=16.0, target_modules=("q_proj", "v_proj"))
    adapter = registry.create_adapter(
        tenant_id=tenant.id, owner_user_id=user.id, name="personal", target_config={"rank": 8, "alpha": 16.0}
    )
    ids = backbone.tokenizer([PROMPT], return_tensors="pt").input_ids.to(backbone.device)

    def next_token_logits(slot: int | None) -> torch.Tensor:
        with torch.no_grad(), bank.routing(RoutingPlan.single([slot])):
            return backbone.model(ids).logits[0, -1].float().cpu()

    base = next_token_logits(None)
    served: dict[int, torch.Tensor] = {}  # version number -> next-token logits while it was live
    parent = None
    with tempfile.TemporaryDirectory() as tmp:
        for number in (1, 2, 3):
            bank.init_slot(0, config, seed=number, replace=True)
            for params in bank.trainable_parameters([0]):  # a distinct, non-zero delta per version
                torch.nn.init.normal_(params, std=0.02)
            bank.release_parameters([0])
            saved = save_slot(bank, 0, Path(tmp) / f"v{number}")
            parents: list[tuple[int, LineageRelation]] = [(parent.id, "continued-from")] if parent else []
            version = registry.register_version(
                tenant_id=tenant.id,
                adapter_id=adapter.id,
                adapter_dir=saved.directory,
                base_fingerprint=backbone.fingerprint.digest,
                parents=parents,
                metrics={"demo": True},
            )
            registry.promote(
                tenant_id=tenant.id, adapter_id=adapter.id, number=number, actor="demo", reason="demo"
            )
            served[number] = next_token_logits(0)
            print(
                f"registered and promoted version {number}: sha256 {version.sha256[:12]}, {version.size_bytes} bytes"
            )
            parent = version
        registry.rollback(
            tenant_id=tenant.id, adapter_id=adapter.id, to_number=1, actor="demo", reason="bad answers"
        )
        live = registry.live_version(tenant_id=tenant.id, adapter_id=adapter.id)
        assert live is not None
        folder = registry.fetch_version(version=live, dest_dir=Path(tmp) / "live")
        load_slot_from_dir(bank, 1, folder, require_fingerprint=True)
        live_after = next_token_logits(1)

    print(f"\nlive version after rollback: {live.number}")
    for number, logits in served.items():
        print(f"  v{number} while live: max |logit - base| {float((logits - base).abs().max()):.4f}")
    same = torch.equal(live_after, served[1])
    print(f"  after rollback, weights fetched from the store: identical to v1's logits: {same}")
    print("\nalias history (from -> to, actor, reason):")
    numbers = {v.id: v.number for v in registry.list_versions(tenant_id=tenant.id, adapter_id=adapter.id)}
    for event in registry.alias_history(tenant_id=tenant.id, adapter_id=adapter.id):
        print(
            f"  {numbers.get(event.from_version_id or 0, '-')!s:>2} -> {numbers.get(event.to_version_id or 0, '-')!s:<2} "
            f"{event.actor:6} {event.reason}"
        )
    lineage = registry.lineage(tenant_id=tenant.id, version_id=parent.id if parent else live.id)
    chain = [n.version.number for n in reversed(lineage.ancestors)] + [lineage.root.version.number]
    print("lineage of version 3: " + " -> ".join(f"v{n}" for n in chain))
    db.dispose()
    return 0
