"""Fixtures for the adapter bank: the real tiny backbone (``tiny_dir``, ``fp32_backbone``: tests/conftest.py) in
nf4, and random adapters."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests.lora_weights import random_lora_weights

from lorafleet.adapters import AdapterBank, SlotConfig
from lorafleet.backbone import Backbone, load_backbone


@pytest.fixture
def nf4_backbone(tiny_dir: Path) -> Backbone:
    return load_backbone(tiny_dir, quantization="nf4", device="cpu")


@pytest.fixture
def input_ids() -> torch.Tensor:
    """Four sequences of 9 tokens (no padding)."""
    return torch.randint(3, 259, (4, 9), generator=torch.Generator().manual_seed(7))  # [batch, seq]


def random_adapter(
    bank: AdapterBank, *, rank: int, seed: int, modules: Iterable[str] | None = None, scale: float = 0.2
) -> dict[str, torch.Tensor]:
    """Random LoRA weights (non-zero A and B) in PEFT key names for the bank's layers."""
    return random_lora_weights(bank, rank=rank, seed=seed, scale=scale, modules=modules)


def load_random(bank: AdapterBank, slot: int, *, rank: int, alpha: float, seed: int) -> SlotConfig:
    """Fill ``slot`` with a random adapter and return its config."""
    config = SlotConfig(rank=rank, alpha=alpha)
    bank.load_slot(slot, random_adapter(bank, rank=rank, seed=seed), config)
    return config


def tensor_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names and raw bytes of tensors: 'unchanged' means bit-for-bit."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        digest.update(name.encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def bank_digest(bank: AdapterBank) -> str:
    """Digest of every bank buffer (all slots' weights, scales and dropout)."""
    return tensor_digest(
        (f"{name}.{buf_name}", buf)
        for name, layer in bank.layers.items()
        for buf_name, buf in layer.named_buffers()
        if not buf_name.startswith("base_layer")
    )


def base_digest(model: torch.nn.Module) -> str:
    """Digest of the model's persistent state (base weights, incl. 4-bit data and quant state)."""
    return tensor_digest(sorted(model.state_dict().items()))


@pytest.fixture
def tools() -> SimpleNamespace:
    """The helpers above, for test modules (conftest modules are not imported by name)."""
    return SimpleNamespace(
        random_adapter=random_adapter,
        load_random=load_random,
        tensor_digest=tensor_digest,
        bank_digest=bank_digest,
        base_digest=base_digest,
    )
