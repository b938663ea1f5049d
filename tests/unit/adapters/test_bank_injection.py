"""Injection by target names, the base-layer kinds (plain, 4-bit, 8-bit, Conv1D), and slot management."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from lorafleet.adapters import (
    BankLinear,
    SlotConfig,
    SlotPlan,
    find_target_modules,
    inject_bank,
    layers,
    remove_bank,
)
from lorafleet.adapters.layers import BaseLayerKind, base_kind_for, register_base_kind
from lorafleet.backbone import Backbone, load_backbone
from lorafleet.errors import (
    AdapterFormatError,
    AdapterShapeError,
    CapacityError,
    ConflictError,
    NonFiniteError,
    NotFoundError,
    TargetModuleError,
    ValidationError,
)


def test_target_names_follow_peft_rules(fp32_backbone: Backbone) -> None:
    model = fp32_backbone.model
    all_linear = find_target_modules(model, "all-linear")
    assert len(all_linear) == 14 and "lm_head" not in all_linear  # 2 layers x 7 projections
    assert find_target_modules(model, ["q_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert find_target_modules(model, r"model\.layers\.1\..*_proj") == [
        n for n in all_linear if ".layers.1." in n
    ]
    with pytest.raises(TargetModuleError, match="qkv"):
        find_target_modules(model, ["q_proj", "qkv"])  # every name must match something
    with pytest.raises(TargetModuleError, match="cannot wrap"):
        find_target_modules(model, ["self_attn"])
    with pytest.raises(TargetModuleError):
        find_target_modules(model, "nothing.*")


def test_inject_wraps_in_place_and_remove_restores(fp32_backbone: Backbone, input_ids: torch.Tensor) -> None:
    model = fp32_backbone.model
    with torch.no_grad():
        expected = model(input_ids).logits
    q_proj = model.model.layers[0].self_attn.q_proj
    bank = inject_bank(fp32_backbone, target_modules=["q_proj", "down_proj"], n_slots=2, max_rank=4)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, BankLinear) and layer.base_layer is q_proj and layer.weight is q_proj.weight
    assert not layer.training and bank.fingerprint == fp32_backbone.fingerprint.digest
    assert [p for p in model.parameters() if p.requires_grad] == []
    with pytest.raises(ConflictError):
        inject_bank(model, target_modules=["v_proj"], n_slots=1, max_rank=1)
    with bank.base_only(), torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected)
    assert remove_bank(bank) is model and model.model.layers[0].self_attn.q_proj is q_proj
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, expected)  # no routing context needed any more


@pytest.mark.parametrize(
    ("quantization", "layer_type"), [("nf4", bnb.nn.Linear4bit), ("int8", bnb.nn.Linear8bitLt)]
)
def test_quantized_bases_are_wrapped(
    tiny_dir: Path, quantization: str, layer_type: type, input_ids: torch.Tensor, tools: SimpleNamespace
) -> None:
    backbone = load_backbone(tiny_dir, quantization=quantization, device="cpu")
    bank = inject_bank(backbone, target_modules="all-linear", n_slots=2, max_rank=4)
    assert all(isinstance(layer.base_layer, layer_type) for layer in bank.layers.values())
    assert {layer.kind.name for layer in bank.layers.values()} == {
        f"bnb-{'4bit' if quantization == 'nf4' else 'int8'}"
    }
    tools.load_random(bank, 0, rank=4, alpha=8, seed=0)
    with torch.no_grad():
        with bank.base_only():
            base = backbone.model(input_ids).logits
        with bank.use(SlotPlan.single([0, None, 0, None])):
            routed = backbone.model(input_ids).logits
    # LLM.int8 picks outlier columns over the whole batch, so a base-only row may move slightly with its batch
    tolerance = 0.0 if quantization == "nf4" else 2e-2
    assert (routed[1] - base[1]).abs().max() <= tolerance and (routed[0] - base[0]).abs().max() > 5e-2


def test_conv1d_bases_match_a_dense_computation(input_ids: torch.Tensor, tools: SimpleNamespace) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=259, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    bank = inject_bank(model, target_modules=["c_attn"], n_slots=1, max_rank=4)
    layer = bank.layers["transformer.h.0.attn.c_attn"]
    assert layer.kind.fan_in_fan_out and (layer.in_features, layer.out_features) == (32, 96)
    tools.load_random(bank, 0, rank=4, alpha=4, seed=0)
    x = torch.randn(2, 3, 32)  # [batch, seq, d_in]
    with bank.use(SlotPlan.single([0, 0])), torch.no_grad():
        got = layer(x)
    lora_a, lora_b = layer.read_slot(0)
    expected = layer.base_layer(x) + x @ lora_a.T @ lora_b.T
    assert (got - expected).abs().max().item() <= 1e-5
    bank.merge(0)
    with torch.no_grad():
        assert (layer(x) - expected).abs().max().item() <= 1e-5


def test_registry_accepts_new_kinds() -> None:
    class Custom(nn.Linear):
        pass

    assert base_kind_for(Custom(2, 3)).name == "linear"  # subclasses of nn.Linear fall back to "linear"
    register_base_kind(BaseLayerKind("custom", lambda m: isinstance(m, Custom), lambda m: (m.in_features, 7)))
    try:
        assert base_kind_for(Custom(2, 3)).name == "custom"
    finally:
        layers._REGISTRY.pop(0)


def test_slots_are_loaded_and_evicted_in_place(fp32_backbone: Backbone, tools: SimpleNamespace) -> None:
    bank = inject_bank(fp32_backbone, target_modules=["q_proj", "v_proj"], n_slots=2, max_rank=4)
    model_ids = {id(m) for m in fp32_backbone.model.modules()}
    assert bank.free_slot() == 0
    bank.init_slot(0, SlotConfig(rank=4, alpha=4, target_modules=("v_proj",)), seed=0)
    tools.load_random(bank, 1, rank=2, alpha=2, seed=1)
    assert bank.slot_info(0).modules == ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj")
    assert sorted(bank.occupied()) == [0, 1]
    with pytest.raises(CapacityError):
        bank.free_slot()
    bank.evict_slot(1)
    assert bank.slot_info(1) is None and bank.free_slot() == 1
    assert all(
        float(layer.lora_A[1].abs().sum()) == 0 and 1 not in layer.present for layer in bank.layers.values()
    )
    with pytest.raises(NotFoundError):
        bank.evict_slot(1)
    with pytest.raises(ValidationError):
        bank.slot_info(2)
    with pytest.raises(TargetModuleError):
        bank.init_slot(1, SlotConfig(rank=2, alpha=2, target_modules=("o_proj",)))
    assert {id(m) for m in fp32_backbone.model.modules()} == model_ids  # nothing was rebuilt


def test_in_memory_loads_are_validated_first(fp32_backbone: Backbone, tools: SimpleNamespace) -> None:
    bank = inject_bank(fp32_backbone, target_modules=["q_proj"], n_slots=1, max_rank=4)
    good = tools.random_adapter(bank, rank=4, seed=0)
    before = tools.bank_digest(bank)
    nan = {k: v.clone() for k, v in good.items()}
    next(iter(nan.values()))[0, 0] = float("inf")
    one_sided = {k: v for k, v in good.items() if "lora_A" in k}
    cases = [
        (nan, SlotConfig(rank=4, alpha=4), NonFiniteError),
        (good, SlotConfig(rank=8, alpha=4), AdapterShapeError),
        (good, SlotConfig(rank=2, alpha=4), AdapterShapeError),
        (one_sided, SlotConfig(rank=4, alpha=4), AdapterFormatError),
        ({}, SlotConfig(rank=4, alpha=4), TargetModuleError),
    ]
    for tensors, config, error in cases:
        with pytest.raises(error):
            bank.load_slot(0, tensors, config)
    assert tools.bank_digest(bank) == before and bank.slot_info(0) is None


def test_dtype_conversion_keeps_training_views_attached(fp32_backbone: Backbone) -> None:
    bank = inject_bank(fp32_backbone, target_modules=["q_proj"], n_slots=2, max_rank=4)
    bank.init_slot(1, SlotConfig(rank=2, alpha=2), seed=0)
    params = bank.trainable_parameters([1])
    fp32_backbone.model.to(torch.float64)
    layer = bank.layers["model.layers.0.self_attn.q_proj"]
    assert layer.lora_A.dtype == torch.float64 and params[0].dtype == torch.float64
    assert params[0].data_ptr() == layer.lora_A[1].data_ptr()
