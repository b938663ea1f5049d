"""Fixtures for the continual-learning tests: one local Ray on loopback per session, the tiny backbone built
once into a session data dir (actors load it from there), settings for actors, and an in-process nf4
backbone with an adapter bank for the tests that need no Ray."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from continual_helpers import TINY_TRAINING, tiny_tenant
from tests.tiny import tiny_backbone_dir

from lorafleet.adapters import AdapterBank
from lorafleet.backbone import Backbone
from lorafleet.config import Settings, load_settings
from lorafleet.registry import Registry
from lorafleet.store.blob import open_blob_store
from lorafleet.store.sql.database import Database
from lorafleet.training.config import TrainingConfig
from lorafleet.training.resident import Resident
from lorafleet.workflows.continual import ContinualTrainer


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's data dir, with the built-in tiny backbone built into it."""
    return tiny_backbone_dir(tmp_path_factory, "lorafleet-data")


@pytest.fixture(scope="session")
def ray_cluster(data_dir: Path) -> Iterator[str]:
    """A local Ray on 127.0.0.1 for the whole session (started through ``init_ray``); its GCS address."""
    import ray

    from lorafleet.runtime.ray_runtime import init_ray

    address = init_ray(load_settings(data_dir=data_dir, ray_address="", ray_num_cpus=4))
    assert address.startswith("127.0.0.1:")
    yield address
    ray.shutdown()


@pytest.fixture
def make_settings(data_dir: Path) -> Callable[..., Settings]:
    """``make_settings(database_url=..., object_store_url=..., **more)``: settings on the tiny nf4 backbone."""

    def make(*, database_url: str, object_store_url: str, **more: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": data_dir,
            "database_url": database_url,
            "object_store_url": object_store_url,
            "backbone_quantization": "nf4",
            "device": "cpu",
            "ray_address": "",
            "trainer_slots": 4,
            "promote_rule": "holdout-improved",  # these tests are about training; QA has its own
            **more,
        }
        return load_settings(**values)

    return make


@pytest.fixture(scope="session")
def backbone_and_bank(data_dir: Path) -> tuple[Backbone, AdapterBank]:
    """One nf4 tiny backbone with a bank, in this process, shared by the tests that run jobs without Ray
    (``ContinualTrainer`` evicts its slots after every job, so the bank is reused as an actor reuses it)."""
    from lorafleet.adapters import inject_bank
    from lorafleet.backbone import load_backbone

    backbone = load_backbone("builtin:tiny", quantization="nf4", device="cpu", data_dir=data_dir)
    config = TrainingConfig(**TINY_TRAINING)
    bank = inject_bank(backbone, target_modules=config.target_modules, n_slots=4, max_rank=config.rank)
    return backbone, bank


@pytest.fixture
def registry(database: Database, tmp_path: Path) -> Registry:
    return Registry(database, open_blob_store((tmp_path / "blobs").as_uri()))


@pytest.fixture
def tenant_id(database: Database) -> int:
    """Tenant ``acme``, whose jobs train with ``TINY_TRAINING`` (its training config)."""
    return tiny_tenant(database)


@pytest.fixture
def resident(
    database: Database, registry: Registry, backbone_and_bank: tuple[Backbone, AdapterBank]
) -> Resident:
    """The test's database and registry with the in-process backbone and bank: what trainers run on."""
    backbone, bank = backbone_and_bank
    return Resident(database, registry, backbone, bank)


@pytest.fixture
def make_trainer(resident: Resident) -> Iterator[Callable[..., ContinualTrainer]]:
    """``make_trainer(cls=ContinualTrainer, promote_rule=..., train_slots=None, **training)`` over the in-process
    bank (``train_slots``: a wrapper of ``lorafleet.training.trainer.train_slots``, to inject faults)."""

    def make(
        *,
        cls: type[ContinualTrainer] = ContinualTrainer,
        promote_rule: str = "always",
        train_slots: Callable[..., Any] | None = None,
        **training: Any,
    ) -> ContinualTrainer:
        config = TrainingConfig(**{**TINY_TRAINING, **training})
        return cls(
            resident,
            config=config,
            promote_rule=promote_rule,  # type: ignore[arg-type]
            train_slots=train_slots,
        )

    yield make
    assert resident.bank.occupied() == {}, "a job left slots loaded in the bank"
