"""Fixtures for the serving tests: the real tiny backbone in fp32, a bank on it, real adapter folders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from engine_world import Setup, make_setup
from serving_helpers import Expert, FolderFetcher, member, write_adapter
from tests.tiny import seeded_folders
from tests.torch_threads import one_torch_thread

from lorafleet.adapters import AdapterBank, inject_bank
from lorafleet.backbone import Backbone, load_backbone

N_SLOTS, MAX_RANK = 8, 8


@pytest.fixture(scope="package", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model's ops are microseconds, and on shared, loaded cores each op's thread
    hand-off costs milliseconds (a decode step is hundreds of small ops)."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def author_bank(tiny_dir: Path) -> AdapterBank:
    """A one-slot bank used only to write adapter folders (same backbone, same fingerprint)."""
    backbone = load_backbone(tiny_dir, quantization="fp32", device="cpu")
    return inject_bank(backbone, target_modules="all-linear", n_slots=1, max_rank=MAX_RANK)


@pytest.fixture(scope="session")
def adapter_folders(
    author_bank: AdapterBank, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[int], Path]:
    """``adapter_folders(seed)``: a real adapter folder for the tiny backbone (written once per seed)."""
    return seeded_folders(
        tmp_path_factory.mktemp("adapters"), lambda dest, seed: write_adapter(author_bank, dest, seed=seed)
    )


@pytest.fixture
def backbone(tiny_dir: Path) -> Backbone:
    return load_backbone(tiny_dir, quantization="fp32", device="cpu")


@pytest.fixture
def bank(backbone: Backbone) -> AdapterBank:
    return inject_bank(backbone, target_modules="all-linear", n_slots=N_SLOTS, max_rank=MAX_RANK)


@pytest.fixture
def setup(bank: AdapterBank, backbone: Backbone, adapter_folders: Callable[[int], Path]) -> Setup:
    """The shared engine of four users (``engine_world``)."""
    return make_setup(bank, backbone, adapter_folders)


@pytest.fixture
def members(adapter_folders: Callable[[int], Path]) -> list[Expert]:
    """Five distinct versions a..e (members 0..4), real adapter folders."""
    return [member(adapter_folders(seed), adapter_id=seed + 1) for seed in range(5)]


@pytest.fixture
def fetcher(adapter_folders: Callable[[int], Path]) -> FolderFetcher:
    """A fetcher that serves the five versions of ``members``."""
    fetch = FolderFetcher()
    for seed in range(5):
        fetch.add(adapter_folders(seed))
    return fetch
