"""Helpers for the routing tests: PEFT folders, a small tenant world, and hand-made banks for gate maths."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorafleet.registry import Registry
from lorafleet.routing.experts import Expert, ExpertSet, experts_revision
from lorafleet.routing.spec import GateSpec
from lorafleet.store.blob import open_blob_store
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlTenant, SqlUser

HIDDEN = 16


@dataclass(frozen=True)
class World:
    """Tenant A with users alice and bob, tenant B with user carol (ids)."""

    a: int
    alice: int
    bob: int
    b: int
    carol: int


def make_world(db: Database) -> World:
    with db.session() as s:
        a, b = SqlTenant(name="tenant-a"), SqlTenant(name="tenant-b")
        s.add_all([a, b])
        s.flush()
        users = [SqlUser(tenant_id=a.id, external_id=x) for x in ("alice", "bob")]
        users.append(SqlUser(tenant_id=b.id, external_id="carol"))
        s.add_all(users)
        s.flush()
        return World(a=a.id, alice=users[0].id, bob=users[1].id, b=b.id, carol=users[2].id)


def write_adapter_dir(path: Path, *, seed: int = 0, rank: int = 2) -> Path:
    """A small PEFT LoRA folder (q_proj of one layer), enough for the registry's validation."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{key}.lora_A.weight": torch.randn(rank, HIDDEN, generator=gen),  # [r, in]
        f"{key}.lora_B.weight": torch.randn(HIDDEN, rank, generator=gen),  # [out, r]
    }
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def add_live_version(
    registry: Registry,
    tmp: Path,
    *,
    tenant_id: int,
    adapter_id: int,
    seed: int,
    key: tuple[float, ...] | None = None,
    claim: tuple[float, ...] | None = None,
    promote: bool = True,
) -> int:
    """Register a version (with an optional routing key and claim), promote it, return its id."""
    version = registry.register_version(
        tenant_id=tenant_id,
        adapter_id=adapter_id,
        adapter_dir=write_adapter_dir(tmp / f"v-{adapter_id}-{seed}", seed=seed),
        base_fingerprint="fp",
        routing_key=key,
        routing_claim=claim,
    )
    if promote:
        registry.promote(tenant_id=tenant_id, adapter_id=adapter_id, number=version.number, actor="test")
    return version.id


def member(
    index: int,
    *,
    key: tuple[float, ...] | None,
    kind: str = "personal",
    name: str | None = None,
    claim: tuple[float, ...] | None = None,
) -> Expert:
    """A bank member for gate tests (ids derived from ``index``)."""
    return Expert(
        adapter_id=100 + index,
        adapter_name=name or f"adapter-{index}",
        kind=kind,  # type: ignore[arg-type]
        version_id=1000 + index,
        version_number=1,
        sha256=f"{index:064x}",
        size_bytes=1,
        rank=4,
        routing_key=key,
        routing_claim=claim,
    )


def user_bank(members: list[Expert], gate: GateSpec | None = None) -> ExpertSet:
    gate = gate or GateSpec()
    return ExpertSet(1, 1, "alice", tuple(members), gate, experts_revision(members, gate))


# the fixtures the routing tests share (their conftests import them): a small world and a registry over both
# databases and a local blob directory (the blob stores have their own tests)
@pytest.fixture
def world(database: Database) -> World:
    return make_world(database)


@pytest.fixture
def registry(database: Database, tmp_path: Path) -> Registry:
    return Registry(database, open_blob_store((tmp_path / "blobs").as_uri()))
