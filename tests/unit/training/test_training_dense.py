"""Dense views of 4-bit layers compute what the 4-bit layers compute, and leave the model 4-bit afterwards.

On the real tiny backbone in nf4 (real bitsandbytes layers): logits, slot gradients and a whole train_slots run
are the same with and without the views; the budget picks the top layers; the modules come back on error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch

from lorafleet.adapters import AdapterBank, SlotPlan, inject_bank
from lorafleet.adapters.dense import DenseView, dense_budget, dense_views
from lorafleet.backbone import load_backbone
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import Example, collate, encode_example, pad_token_id
from lorafleet.training.trainer import SlotTraining, train_slots, user_losses

EXAMPLES = [
    Example(1, "What is my dog called?", "Your dog is called Biscuit.", "sft"),
    Example(2, "Where do I live?", "You live in Porto.", "sft"),
    Example(3, "Hi", "Hello there, friend of mine!", "sft"),
    Example(4, "What do I eat? Tell me about my diet in a sentence.", "You are vegetarian.", "sft"),
]


def _nf4_bank(tiny_dir: Path) -> tuple[AdapterBank, Any, TrainingConfig]:
    backbone = load_backbone(tiny_dir, quantization="nf4", device="cpu")
    bank = inject_bank(backbone, n_slots=2, max_rank=4)
    config = TrainingConfig(rank=4, alpha=8, dropout=0.0, layers="all", max_seq_len=64, anchor_ratio=0.0)
    for slot in (0, 1):
        bank.init_slot(slot, config.slot_config(layer_names=list(bank.layers)), seed=slot)
        with torch.no_grad():  # non-zero B, so every A gets a gradient
            for name in bank.slot_info(slot).modules:
                bank.layers[name].lora_B[slot].normal_(0, 0.05, generator=torch.Generator().manual_seed(slot))
    return bank, backbone.tokenizer, config


def _four_bit(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def _loss_and_grads(bank: AdapterBank, tokenizer: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    encoded = [encode_example(tokenizer, e, max_seq_len=64) for e in EXAMPLES]
    batch = collate(encoded, pad_id=pad_token_id(tokenizer))
    owners = [0, 1, 0, 1]
    params = bank.trainable_parameters([0, 1])
    with bank.use(SlotPlan.single(owners)):
        losses, _ = user_losses(bank.model, batch, torch.tensor(owners), 2)
        losses.sum().backward()
    grads = [p.grad.detach().clone() for p in params]
    bank.release_parameters()
    return losses.detach(), grads


def test_dense_views_give_the_4bit_numbers_and_are_undone(tiny_dir: Path) -> None:
    bank, tokenizer, _ = _nf4_bank(tiny_dir)
    quantised = _four_bit(bank.model)
    assert len(quantised) >= 14  # 7 linear modules per layer, 2 layers
    loss, grads = _loss_and_grads(bank, tokenizer)
    with dense_views(bank.model, from_layer=0, budget_bytes=1 << 30) as viewed:
        assert viewed == len(quantised)
        assert _four_bit(bank.model) == []
        dense_loss, dense_grads = _loss_and_grads(bank, tokenizer)
    assert _four_bit(bank.model) == quantised  # the very modules are back
    assert torch.allclose(loss, dense_loss, atol=1e-6, rtol=0), (loss, dense_loss)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    for plain, dense in zip(grads, dense_grads, strict=True):
        assert torch.allclose(plain, dense, atol=1e-6, rtol=0), float((plain - dense).abs().max())


def test_the_budget_takes_the_top_layers_first(tiny_dir: Path) -> None:
    bank, _, _ = _nf4_bank(tiny_dir)
    layer1 = [n for n in _four_bit(bank.model) if ".layers.1." in n]
    one_layer = sum(
        bank.model.get_submodule(n).in_features * bank.model.get_submodule(n).out_features * 4 for n in layer1
    )
    with dense_views(bank.model, from_layer=0, budget_bytes=one_layer) as viewed:
        assert viewed == len(layer1)
        views = [n for n, m in bank.model.named_modules() if isinstance(m, DenseView)]
        assert all(".layers.1." in n for n in views) and len(views) == len(layer1)
    with dense_views(bank.model, from_layer=1, budget_bytes=1 << 30) as viewed:
        assert viewed == len(layer1)  # layer 0 is below from_layer
    with dense_views(bank.model, from_layer=0, budget_bytes=0) as viewed:
        assert viewed == 0
    assert dense_budget(torch.device("cuda")) == 0 and dense_budget(torch.device("cpu")) == 1 << 30


def test_the_modules_come_back_when_the_block_fails(tiny_dir: Path) -> None:
    bank, _, _ = _nf4_bank(tiny_dir)
    quantised = _four_bit(bank.model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        dense_views(bank.model, from_layer=0, budget_bytes=1 << 30),
    ):
        raise RuntimeError("boom")
    assert _four_bit(bank.model) == quantised


def test_train_slots_with_and_without_dense_views_trains_the_same_adapters(tiny_dir: Path) -> None:
    states, metrics = [], []
    for budget in (0, None):  # None: the default on CPU, every layer viewed
        bank, tokenizer, config = _nf4_bank(tiny_dir)
        config = config.with_changes(max_steps=4, batch_size=2, learning_rate=3e-3)
        tasks = [SlotTraining(s, f"u{s}", EXAMPLES[s::2], EXAMPLES[s + 2 :: 4]) for s in (0, 1)]
        out = train_slots(bank, tokenizer, tasks, config, dense_budget_bytes=budget)
        assert _four_bit(bank.model)  # still a 4-bit model after the job
        metrics.append([r.metrics for r in out])
        states.append({k: v for s in (0, 1) for k, v in bank.slot_state_dict(s).items()})
    for a, b in zip(*metrics, strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    for key in states[0]:
        assert torch.allclose(states[0][key], states[1][key], atol=1e-5), key
