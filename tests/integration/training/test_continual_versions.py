"""At most one version per job and adapter: ``register_version`` is idempotent per job, runs inside a caller's
transaction when given one, and the unique index backs it up (NULL job ids stay unlimited)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert

from lorafleet.adapters import AdapterBank, save_slot
from lorafleet.backbone import Backbone
from lorafleet.domain import AdapterVersion
from lorafleet.errors import AlreadyExistsError
from lorafleet.jobs import JobQueue
from lorafleet.registry import Registry
from lorafleet.store.sql.database import Database
from lorafleet.store.sql.models import SqlAdapterVersion
from lorafleet.store.sql.tenants import TenantRepository
from lorafleet.training.config import TrainingConfig


class _Crash(Exception):
    pass


@pytest.fixture
def adapter_dir(backbone_and_bank: tuple[Backbone, AdapterBank], tmp_path: Path) -> Path:
    """A PEFT folder saved from a fresh slot of the in-process bank."""
    _, bank = backbone_and_bank
    bank.init_slot(0, TrainingConfig(rank=4, target_modules=["q_proj", "v_proj"]).slot_config(), seed=1)
    try:
        return save_slot(bank, 0, tmp_path / "adapter").directory
    finally:
        bank.evict_slot(0)


def _setup(database: Database, registry: Registry) -> tuple[int, int, int]:
    """A tenant, its user's adapter and a job: ``(tenant_id, adapter_id, job_id)``."""
    tenants = TenantRepository(database)
    tenant = tenants.create_tenant(name="acme")[0]
    user = tenants.get_or_create_user(tenant_id=tenant.id, external_id="ann")
    adapter = registry.create_adapter(
        tenant_id=tenant.id, owner_user_id=user.id, name="personal", target_config={}
    )
    job = JobQueue(database).submit(tenant_id=tenant.id, kind="train", payload={}, dedupe_key=None).job
    return tenant.id, adapter.id, job.id


def _register(
    registry: Registry, adapter_dir: Path, *, tenant_id: int, adapter_id: int, **options: Any
) -> AdapterVersion:
    """``register_version`` of ``adapter_dir`` as the adapter's next version (``options``: ``job_id``, ...)."""
    return registry.register_version(
        tenant_id=tenant_id, adapter_id=adapter_id, adapter_dir=adapter_dir, base_fingerprint="fp", **options
    )


def test_registering_a_job_twice_returns_its_one_version(
    database: Database, registry: Registry, adapter_dir: Path
) -> None:
    tenant_id, adapter_id, job_id = _setup(database, registry)
    ids = {"tenant_id": tenant_id, "adapter_id": adapter_id}
    first = _register(registry, adapter_dir, **ids, job_id=job_id)
    again = _register(registry, adapter_dir, **ids, job_id=job_id, metrics={"other": 1})
    assert again == first
    assert registry.find_version_by_job(tenant_id=tenant_id, adapter_id=adapter_id, job_id=job_id) == first
    unattributed = [_register(registry, adapter_dir, **ids) for _ in range(2)]
    assert [v.number for v in registry.list_versions(tenant_id=tenant_id, adapter_id=adapter_id)] == [1, 2, 3]
    assert [v.job_id for v in unattributed] == [None, None]


def test_a_version_registered_in_the_callers_transaction_rolls_back_with_it(
    database: Database, registry: Registry, adapter_dir: Path
) -> None:
    tenant_id, adapter_id, job_id = _setup(database, registry)
    with pytest.raises(_Crash), database.transaction():
        version = _register(registry, adapter_dir, tenant_id=tenant_id, adapter_id=adapter_id, job_id=job_id)
        assert version.number == 1  # visible inside the transaction ...
        raise _Crash
    assert registry.list_versions(tenant_id=tenant_id, adapter_id=adapter_id) == []  # ... and gone with it
    assert registry.get_adapter(tenant_id=tenant_id, adapter_id=adapter_id).id == adapter_id
    assert len(list(registry._blobs.list())) == 1  # the blob was written first: an orphan for gc


def test_the_unique_index_refuses_a_second_row_for_one_job(
    database: Database, registry: Registry, adapter_dir: Path
) -> None:
    tenant_id, adapter_id, job_id = _setup(database, registry)
    version = _register(registry, adapter_dir, tenant_id=tenant_id, adapter_id=adapter_id, job_id=job_id)
    row = {
        "adapter_id": adapter_id,
        "number": 2,
        "blob_uri": version.blob_uri,
        "sha256": version.sha256,
        "size_bytes": version.size_bytes,
        "base_fingerprint": "fp",
        "rank": version.rank,
        "target_modules": list(version.target_modules),
        "training_config": {},
        "metrics": {},
        "status": "candidate",
        "job_id": job_id,
    }
    with pytest.raises(AlreadyExistsError), database.session() as session:
        session.execute(insert(SqlAdapterVersion).values(**row))
