"""Random LoRA weights for the tests and benchmarks: PEFT-named A and B tensors for a bank's layers, and real
PEFT folders saved from them through a bank slot."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from lorafleet.adapters import AdapterBank, SlotConfig, inject_bank, save_slot
from lorafleet.adapters.bank import peft_key
from lorafleet.backbone import load_backbone


def random_lora_weights(
    bank: AdapterBank, *, rank: int, seed: int, scale: float, modules: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Random non-zero A (``[rank, d_in]``) and B (``[d_out, rank]``) times ``scale``, in PEFT key names, for
    ``modules`` (every layer of the bank by default); the same ``seed`` gives the same weights."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name in modules or bank.layers:
        layer = bank.layers[name]
        tensors[peft_key(name, "A")] = torch.randn(rank, layer.in_features, generator=generator) * scale
        tensors[peft_key(name, "B")] = torch.randn(layer.out_features, rank, generator=generator) * scale
    return tensors


def write_random_peft_folder(
    backbone: str | Path, data_dir: Path, dest: Path, *, seed: int, rank: int = 4, scale: float = 0.3
) -> Path:
    """A real PEFT folder for ``backbone`` (fp32): random A and B on q_proj and v_proj, saved through a bank."""
    loaded = load_backbone(backbone, quantization="fp32", device="cpu", data_dir=data_dir)
    bank = inject_bank(loaded, target_modules=["q_proj", "v_proj"], n_slots=1, max_rank=rank)
    tensors = random_lora_weights(bank, rank=rank, seed=seed, scale=scale)
    bank.load_slot(0, tensors, SlotConfig(rank=rank, alpha=2.0 * rank))
    save_slot(bank, 0, dest)
    return dest
