"""Helpers for the registry tests: PEFT-format adapter folders and direct inserts/counts in the database."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from sqlalchemy import func, select

from lorafleet.domain import AdapterVersion
from lorafleet.registry import Registry
from lorafleet.store.blob import BlobStore
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlAdapter, SqlAdapterVersion, SqlDatasetSnapshot, SqlJob

HIDDEN = 16
MODULES = ("q_proj", "v_proj")


@dataclass(frozen=True)
class TwoTenants:
    """Tenant A with user ``a_user``, tenant B with user ``b_user``."""

    a: int
    a_user: int
    b: int
    b_user: int


@dataclass(frozen=True)
class RegistryEnv:
    """The fixtures most registry tests take together: the database, a registry over it and local blobs, the
    two tenants and the adapter-folder factory."""

    db: Database
    registry: Registry
    tenants: TwoTenants
    adapter_dir: Callable[..., Path]


def write_adapter_dir(
    path: Path,
    *,
    seed: int = 0,
    rank: int = 4,
    layers: int = 2,
    target_modules: Any = MODULES,
    poison: float | None = None,
) -> Path:
    """A PEFT LoRA folder: A/B tensors of ``MODULES`` in ``layers`` layers; ``poison`` is put in one value."""
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for module in MODULES:
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, HIDDEN, generator=gen)  # [r, in]
            tensors[f"{key}.lora_B.weight"] = torch.randn(HIDDEN, rank, generator=gen)  # [out, r]
    if poison is not None:
        next(iter(tensors.values()))[0, 0] = poison
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
        "lora_dropout": 0.0,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def registered_versions(
    registry: Registry,
    make_adapter_dir: Callable[..., Path],
    tenant_id: int,
    owner: int | None,
    name: str = "chat",
    *,
    seeds: Iterable[int],
    live: Iterable[int] = (),
) -> tuple[int, list[AdapterVersion]]:
    """A new adapter with one version per seed (``make_adapter_dir(seed=...)``), then versions ``live`` promoted in
    turn (the last one is live): the adapter's id and its versions as registered."""
    adapter = registry.create_adapter(tenant_id=tenant_id, owner_user_id=owner, name=name, target_config={})
    versions = [
        registry.register_version(
            tenant_id=tenant_id,
            adapter_id=adapter.id,
            adapter_dir=make_adapter_dir(seed=seed),
            base_fingerprint="fp",
        )
        for seed in seeds
    ]
    for number in live:
        registry.promote(tenant_id=tenant_id, adapter_id=adapter.id, number=number, actor="test", reason="ok")
    return adapter.id, versions


def statuses(registry: Registry, tenant_id: int, adapter_id: int) -> list[str]:
    """The adapter's versions' statuses, by number."""
    return [v.status for v in registry.list_versions(tenant_id=tenant_id, adapter_id=adapter_id)]


def insert_job(db: Database, *, tenant_id: int | None, kind: str = "train") -> int:
    with db.session() as s:
        job = SqlJob(tenant_id=tenant_id, kind=kind, state="succeeded", payload={"users": [1]})
        s.add(job)
        s.flush()
        return job.id


def insert_snapshot(db: Database, *, user_id: int | None, count: int = 10) -> int:
    with db.session() as s:
        snap = SqlDatasetSnapshot(
            user_id=user_id, min_record_id=1, max_record_id=count, record_count=count, content_hash="c" * 64
        )
        s.add(snap)
        s.flush()
        return snap.id


def count_versions(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(SqlAdapterVersion)) or 0)


def version_count(db: Database, adapter_id: int) -> int:
    with db.session() as s:
        return int(s.scalar(select(SqlAdapter.version_count).where(SqlAdapter.id == adapter_id)) or 0)


def blob_digests(blobs: BlobStore) -> set[str]:
    return {info.sha256 for info in blobs.list()}
