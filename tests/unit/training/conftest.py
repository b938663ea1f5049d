"""Fixtures for the training library: a bank on the real tiny backbone (``fp32_backbone``: tests/conftest.py)
and synthetic users."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tests.feedback_records import make_record
from tests.torch_threads import one_torch_thread

from lorafleet.adapters import AdapterBank, inject_bank
from lorafleet.backbone import Backbone, build_tiny_tokenizer
from lorafleet.training import synthetic
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import build_dataset
from lorafleet.training.trainer import SlotTraining


@pytest.fixture
def fp32_bank(fp32_backbone: Backbone) -> AdapterBank:
    """A bank of 6 slots (rank up to 8) on every linear layer of the fp32 tiny backbone."""
    return inject_bank(fp32_backbone, target_modules="all-linear", n_slots=6, max_rank=8)


def synthetic_tasks(
    bank: AdapterBank, config: TrainingConfig, users: Iterable[int], *, n_records: int = 48
) -> list[SlotTraining]:
    """One fresh slot per user (slot = user index) with round-one synthetic records split by content hash."""
    tasks = []
    for user in users:
        key = f"user-{user}"
        raw = synthetic.make_user_records(key, round=1, n_records=n_records)
        dataset = build_dataset(synthetic.to_feedback_records(raw), config=config)
        bank.init_slot(user, config.slot_config(), seed=user)
        tasks.append(SlotTraining(user, key, dataset.train, dataset.holdout))
    return tasks


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names and raw bytes: equal digests mean bit-identical tensors."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        hasher.update(name.encode())
        hasher.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


@pytest.fixture
def helpers() -> SimpleNamespace:
    """The helpers above, for test modules (conftest modules are not imported by name)."""
    return SimpleNamespace(make_record=make_record, synthetic_tasks=synthetic_tasks, digest=digest)


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """The tiny backbone's byte-level tokenizer (what ``load_backbone`` returns for it)."""
    return build_tiny_tokenizer()


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One torch thread per test: the tiny model's matmuls gain nothing from two, and on shared cores a second
    thread spin-waits (10x slower under load). Restored afterwards for other test packages."""
    with one_torch_thread():
        yield
