"""Training through the bank on the real nf4 (bitsandbytes 4-bit) tiny backbone."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch

from lorafleet.adapters import SlotConfig, SlotPlan, inject_bank
from lorafleet.adapters.linear import lora_dropout
from lorafleet.backbone import Backbone, load_backbone


def _user_loss(model: torch.nn.Module, input_ids: torch.Tensor, routes: list[int | None]) -> torch.Tensor:
    """Mean over users of each user's mean next-token loss (so every user's gradient has the same scale)."""
    logits = model(input_ids=input_ids).logits[:, :-1]  # [batch, seq-1, vocab]
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    per_row = per_token.mean(dim=1)  # [batch]
    users = sorted({r for r in routes if r is not None})
    return torch.stack([per_row[[i for i, r in enumerate(routes) if r == u]].mean() for u in users]).mean()


def test_training_on_nf4_moves_only_the_batch_adapters(
    nf4_backbone: Backbone, input_ids: torch.Tensor, tools: SimpleNamespace
) -> None:
    model = nf4_backbone.model
    bank = inject_bank(nf4_backbone, target_modules="all-linear", n_slots=4, max_rank=8)
    assert all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in bank.layers.values())
    for slot in range(4):
        bank.init_slot(slot, SlotConfig(rank=4, alpha=8), seed=slot)
    base_before = tools.base_digest(model)
    optimizer = torch.optim.AdamW(bank.parameter_groups([0, 1, 2]), lr=3e-2, weight_decay=0.1)
    routes: list[int | None] = [0, 1, 0, 1]
    plan = SlotPlan.single(routes)
    model.train()

    def step(plan: SlotPlan, routes: list[int | None]) -> float:
        with bank.use(plan):
            loss = _user_loss(model, input_ids, routes)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    with bank.use(plan):
        loss = _user_loss(model, input_ids, routes)
        loss.backward()
    unused_a, unused_b = bank.layers["model.layers.0.self_attn.q_proj"].slot_params[2]
    assert unused_a.grad is None and unused_b.grad is None  # slot 2 is not in the autograd graph at all
    used_grads = [p.grad for p in bank.trainable_parameters([0, 1])]
    assert all(g is not None for g in used_grads) and any(bool(g.abs().sum() > 0) for g in used_grads)
    optimizer.zero_grad(set_to_none=True)

    slot2_before = tools.tensor_digest(bank.slot_state_dict(2).items())
    slot3_before = tools.tensor_digest(bank.slot_state_dict(3).items())
    losses = [step(plan, routes) for _ in range(12)]
    assert losses[-1] < losses[0] - 0.05, losses
    assert tools.tensor_digest(bank.slot_state_dict(2).items()) == slot2_before  # not in any batch: untouched
    assert tools.tensor_digest(bank.slot_state_dict(3).items()) == slot3_before  # not even in the optimiser

    # a later batch without slots 0 and 1: AdamW's momentum and weight decay must not move them
    slot01 = tools.tensor_digest(sorted({**bank.slot_state_dict(0), **bank.slot_state_dict(1)}.items()))
    step(SlotPlan.single([2, 2, None, 2]), [2, 2, None, 2])
    assert (
        tools.tensor_digest(sorted({**bank.slot_state_dict(0), **bank.slot_state_dict(1)}.items())) == slot01
    )
    assert tools.tensor_digest(bank.slot_state_dict(2).items()) != slot2_before
    assert tools.base_digest(model) == base_before  # 4-bit base bytes and quant state unchanged
    assert all(not p.requires_grad for p in model.parameters())


def test_trained_values_live_in_the_slot_and_views_survive_release(
    fp32_backbone: Backbone, input_ids: torch.Tensor
) -> None:
    bank = inject_bank(fp32_backbone, target_modules=["q_proj"], n_slots=2, max_rank=4)
    bank.init_slot(0, SlotConfig(rank=2, alpha=4, content_hash="abc"), seed=1)
    params = bank.trainable_parameters([0])
    assert bank.slot_info(0).config.content_hash is None  # trainable weights no longer match their file
    with torch.no_grad():
        for p in params:
            p.add_(0.5)
    state = bank.slot_state_dict(0)
    assert all(bool((t != 0).all()) for t in state.values())  # B started at zero; the update is in the slot
    assert all(t.shape[0] == 2 or t.shape[1] == 2 for t in state.values())  # exported at the slot's rank
    bank.release_parameters()
    assert bank.slot_state_dict(0).keys() == state.keys()
    assert all(torch.equal(bank.slot_state_dict(0)[k], v) for k, v in state.items())


def test_dropout_applies_in_training_mode_only(fp32_backbone: Backbone, tools: SimpleNamespace) -> None:
    bank = inject_bank(fp32_backbone, target_modules=["q_proj"], n_slots=3, max_rank=4)
    layer = bank.layers["model.layers.0.self_attn.q_proj"]
    bank.load_slot(0, tools.random_adapter(bank, rank=4, seed=0), SlotConfig(rank=4, alpha=4, dropout=0.5))
    bank.load_slot(1, tools.random_adapter(bank, rank=4, seed=1), SlotConfig(rank=4, alpha=4))
    x = torch.randn(2, 5, layer.in_features)  # [batch, seq, d_in]
    for plan in (SlotPlan.single([0, 0]), SlotPlan.single([0, 1])):
        with bank.use(plan), torch.no_grad():
            layer.eval()
            assert torch.equal(layer(x), layer(x))
            layer.train()
            assert not torch.equal(layer(x), layer(x))
    with bank.use(SlotPlan.single([1, 1])), torch.no_grad():
        assert torch.equal(layer(x), layer(x))  # slot 1 has no dropout even in training mode


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_lora_dropout_drops_a_share_p_and_rescales_the_rest(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(63, 101, 97) + 1.0  # [batch, seq, d_in]: 617,211 elements (not a multiple of 4), no zeros
    x.requires_grad_(True)
    y = lora_dropout(x, p)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - p) < 0.005  # the share's sd is below 0.0006
    assert torch.allclose(y[~dropped], x[~dropped] / (1 - p))
    y.sum().backward()
    assert torch.equal(x.grad == 0, dropped)  # the gradient flows through the kept elements only
    # independent across elements and positions: no stripes from the 16-bit slices of one random word
    per_slice = dropped.reshape(-1)[: x.numel() // 4 * 4].view(-1, 4).float().mean(dim=0)  # [4]
    assert (per_slice - p).abs().max() < 0.01
    assert not torch.equal(lora_dropout(x, p) == 0, dropped)  # a fresh mask per call


def _nf4_grads(tiny_dir: Path, input_ids: torch.Tensor, *, infer_first: bool) -> list[torch.Tensor]:
    backbone = load_backbone(tiny_dir, quantization="nf4", device="cpu")
    bank = inject_bank(backbone, target_modules="all-linear", n_slots=1, max_rank=4)
    bank.init_slot(0, SlotConfig(rank=4, alpha=8), seed=0)
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_B[0].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    plan = SlotPlan.single([0] * input_ids.shape[0])
    if infer_first:  # e.g. QA or serving on the same backbone before a training job
        with torch.no_grad(), bank.use(plan):
            backbone.model(input_ids)
    backbone.model.train()
    params = bank.trainable_parameters([0])
    with bank.use(plan):
        backbone.model(input_ids, labels=input_ids).loss.backward()
    return [p.grad for p in params if p.grad is not None]


def test_inference_before_training_does_not_change_gradients(tiny_dir: Path, input_ids: torch.Tensor) -> None:
    fresh = _nf4_grads(tiny_dir, input_ids, infer_first=False)
    after_inference = _nf4_grads(tiny_dir, input_ids, infer_first=True)
    assert len(fresh) == len(after_inference) > 0
    assert all(torch.equal(a, b) for a, b in zip(fresh, after_inference, strict=True))
