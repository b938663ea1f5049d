"""Fixtures for the QA tests: the tiny backbone built once per session (fp32 for speed, nf4 where 4-bit
matters), each with a resident adapter bank shared by the tests as a trainer actor shares its own (QA and the
trainer evict their slots after every job, which the fixtures check), and a world over the real databases."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from qa_helpers import TINY_TRAINING, World, make_world

from lorafleet.adapters import AdapterBank, inject_bank
from lorafleet.backbone import Backbone, build_tiny_backbone, load_backbone
from lorafleet.registry import Registry
from lorafleet.store.blob import open_blob_store
from lorafleet.store.sql.database import Database

SLOTS = 8


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's data dir, with the built-in tiny backbone built into it."""
    path = tmp_path_factory.mktemp("lorafleet-qa-data")
    build_tiny_backbone(path)
    return path


def _loaded(data_dir: Path, quantization: str) -> tuple[Backbone, AdapterBank]:
    backbone = load_backbone("builtin:tiny", quantization=quantization, device="cpu", data_dir=data_dir)
    bank = inject_bank(
        backbone,
        target_modules=TINY_TRAINING["target_modules"],
        n_slots=SLOTS,
        max_rank=TINY_TRAINING["rank"],
    )
    return backbone, bank


@pytest.fixture(scope="session")
def fp32_parts(data_dir: Path) -> tuple[Backbone, AdapterBank]:
    return _loaded(data_dir, "fp32")


@pytest.fixture(scope="session")
def nf4_parts(data_dir: Path) -> tuple[Backbone, AdapterBank]:
    return _loaded(data_dir, "nf4")


@pytest.fixture
def registry(database: Database, tmp_path: Path) -> Registry:
    return Registry(database, open_blob_store((tmp_path / "blobs").as_uri()))


@pytest.fixture
def world(
    database: Database, registry: Registry, fp32_parts: tuple[Backbone, AdapterBank]
) -> Iterator[World]:
    """A tenant on SQLite or PostgreSQL, with the fp32 backbone and its bank."""
    backbone, bank = fp32_parts
    yield make_world(database, registry, backbone, bank)
    assert bank.occupied() == {}, "a job left slots loaded in the bank"


@pytest.fixture
def sqlite_world(
    sqlite_url: str, tmp_path: Path, fp32_parts: tuple[Backbone, AdapterBank]
) -> Iterator[World]:
    """A tenant on SQLite only (for tests whose logic does not depend on the database)."""
    db = Database(sqlite_url)
    backbone, bank = fp32_parts
    yield make_world(db, Registry(db, open_blob_store((tmp_path / "blobs").as_uri())), backbone, bank)
    assert bank.occupied() == {}, "a job left slots loaded in the bank"
    db.dispose()


@pytest.fixture
def nf4_world(sqlite_url: str, tmp_path: Path, nf4_parts: tuple[Backbone, AdapterBank]) -> Iterator[World]:
    """A tenant on SQLite with the nf4 (4-bit) backbone and its bank."""
    db = Database(sqlite_url)
    backbone, bank = nf4_parts
    yield make_world(db, Registry(db, open_blob_store((tmp_path / "blobs").as_uri())), backbone, bank)
    assert bank.occupied() == {}, "a job left slots loaded in the bank"
    db.dispose()
