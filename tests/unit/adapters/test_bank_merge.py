"""Merge/unmerge: same logits as the routed slot, bit-for-bit restore, NaN check first, refused on 4/8-bit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lorafleet.adapters import SlotPlan, inject_bank
from lorafleet.backbone import Backbone, load_backbone
from lorafleet.errors import MergeError, NonFiniteError, NotFoundError


def _logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits  # [batch, seq, vocab]


def test_merge_matches_routing_and_unmerge_restores_bits(
    fp32_backbone: Backbone, input_ids: torch.Tensor, tools: SimpleNamespace
) -> None:
    model = fp32_backbone.model
    bank = inject_bank(fp32_backbone, target_modules="all-linear", n_slots=3, max_rank=8)
    tools.load_random(bank, 0, rank=8, alpha=16, seed=0)
    tools.load_random(bank, 1, rank=3, alpha=3, seed=1)
    before = tools.base_digest(model)
    originals = {name: layer.base_layer.weight for name, layer in bank.layers.items()}
    with bank.use(SlotPlan.single([0] * 4)):
        routed = _logits(model, input_ids)

    bank.merge(0)
    assert bank.merged_slots == (0,)
    assert tools.base_digest(model) != before
    merged = _logits(model, input_ids)  # no plan needed: the merged model is the base now
    assert (merged - routed).abs().max().item() <= 1e-5
    with bank.use(SlotPlan.single([0] * 4)):
        assert (_logits(model, input_ids) - routed).abs().max().item() <= 1e-5
    with pytest.raises(MergeError, match="unmerge"), bank.use(SlotPlan.single([1] * 4)):
        model(input_ids)
    bank.merge(1)
    assert bank.unmerge() == 1 and bank.unmerge() == 0
    assert tools.base_digest(model) == before
    assert all(
        layer.base_layer.weight.data_ptr() == originals[n].data_ptr() for n, layer in bank.layers.items()
    )
    with pytest.raises(MergeError, match="no slot"):
        bank.unmerge()


def test_merge_refuses_bad_states_without_touching_weights(
    fp32_backbone: Backbone, tools: SimpleNamespace
) -> None:
    bank = inject_bank(fp32_backbone, target_modules=["q_proj", "v_proj"], n_slots=3, max_rank=4)
    tools.load_random(bank, 0, rank=4, alpha=4, seed=0)
    tools.load_random(bank, 1, rank=4, alpha=4, seed=1)
    before = tools.base_digest(fp32_backbone.model)
    with pytest.raises(NotFoundError):
        bank.merge(2)
    bank.layers["model.layers.1.self_attn.v_proj"].lora_A[1, 0, 0] = float(
        "nan"
    )  # e.g. a diverged training run
    with pytest.raises(NonFiniteError):
        bank.merge(1)
    assert tools.base_digest(fp32_backbone.model) == before and bank.merged_slots == ()
    bank.merge(0)
    with pytest.raises(MergeError, match="already merged"):
        bank.merge(0)
    with pytest.raises(MergeError):
        bank.evict_slot(0)
    with pytest.raises(MergeError):
        bank.load_slot(0, bank.slot_state_dict(1), bank.slot_info(1).config, replace=True)
    with pytest.raises(MergeError):
        bank.trainable_parameters([0])


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_merge_is_refused_on_quantized_bases(
    tiny_dir: Path, quantization: str, tools: SimpleNamespace
) -> None:
    backbone = load_backbone(tiny_dir, quantization=quantization, device="cpu")
    bank = inject_bank(backbone, target_modules=["q_proj"], n_slots=1, max_rank=4)
    tools.load_random(bank, 0, rank=2, alpha=2, seed=0)
    before = tools.base_digest(backbone.model)
    with pytest.raises(MergeError, match="quantised"):
        bank.merge(0)
    assert tools.base_digest(backbone.model) == before and bank.merged_slots == ()
