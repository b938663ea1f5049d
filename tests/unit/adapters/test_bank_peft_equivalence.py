"""The bank against PEFT (the reference), fp32 on the real tiny backbone: max |Δlogits| <= 1e-5."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from lorafleet.adapters import SlotConfig, SlotPlan, inject_bank, load_slot_from_dir, save_slot
from lorafleet.backbone import Backbone, load_backbone
from lorafleet.errors import AdapterFormatError
from lorafleet.training.config import TrainingConfig

TOL = 1e-5
QV = ["q_proj", "v_proj"]


def _peft_model(tiny_dir: Path, config: LoraConfig, name: str = "default") -> PeftModel:
    base = load_backbone(tiny_dir, quantization="fp32", device="cpu").model
    return get_peft_model(base, config, adapter_name=name)


def _logits(model: torch.nn.Module, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits  # [batch, seq, vocab]


def test_one_adapter_equals_peft(tiny_dir: Path, fp32_backbone: Backbone, input_ids: torch.Tensor) -> None:
    config = LoraConfig(r=4, lora_alpha=16, target_modules=QV, init_lora_weights=False)
    torch.manual_seed(1)
    peft_model = _peft_model(tiny_dir, config)
    peft_model.eval()
    bank = inject_bank(fp32_backbone, target_modules=QV, n_slots=3, max_rank=8)
    bank.load_slot(1, get_peft_model_state_dict(peft_model), SlotConfig(rank=4, alpha=16))
    with bank.use(SlotPlan.single([1] * 4)):
        ours = _logits(fp32_backbone.model, input_ids)
    theirs = _logits(peft_model, input_ids)
    with bank.base_only():
        base = _logits(fp32_backbone.model, input_ids)
    assert (ours - theirs).abs().max().item() <= TOL
    assert (ours - base).abs().max().item() > 1e-2  # the adapter does change the output


def test_mixed_batch_equals_each_user_alone_and_peft_adapter_names(
    tiny_dir: Path, fp32_backbone: Backbone, input_ids: torch.Tensor, tools: SimpleNamespace
) -> None:
    ranks, alphas = [2, 4, 8, 3], [4.0, 8.0, 16.0, 3.0]
    bank = inject_bank(fp32_backbone, target_modules="all-linear", n_slots=6, max_rank=8)
    for slot, (rank, alpha) in enumerate(zip(ranks, alphas, strict=True)):
        tools.load_random(bank, slot, rank=rank, alpha=alpha, seed=slot)
    batch = torch.cat([input_ids, input_ids[:2]])  # [6, seq]: rows 4-5 repeat 0-1 through other routes
    routes = [0, 1, 2, 3, None, 2]
    with bank.use(SlotPlan.single(routes)):
        mixed = _logits(fp32_backbone.model, batch)
    for row, slot in enumerate(routes):
        with bank.use(SlotPlan.single([slot])):
            alone = _logits(fp32_backbone.model, batch[row : row + 1])
        assert (mixed[row] - alone[0]).abs().max().item() <= TOL, f"row {row}"

    peft_model = None
    for slot, (rank, alpha) in enumerate(zip(ranks, alphas, strict=True)):
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear")
        if peft_model is None:
            peft_model = _peft_model(tiny_dir, config, name=f"u{slot}")
        else:
            peft_model.add_adapter(f"u{slot}", config)
        set_peft_model_state_dict(peft_model, bank.slot_state_dict(slot), adapter_name=f"u{slot}")
    assert peft_model is not None
    peft_model.eval()
    names = ["__base__" if s is None else f"u{s}" for s in routes]
    theirs = _logits(peft_model, batch, adapter_names=names)
    assert (mixed - theirs).abs().max().item() <= TOL


def test_adapter_trained_and_saved_by_peft_loads_into_a_slot(
    tiny_dir: Path, fp32_backbone: Backbone, input_ids: torch.Tensor, tmp_path: Path
) -> None:
    torch.manual_seed(3)
    peft_model = _peft_model(
        tiny_dir, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=QV + ["down_proj"])
    )
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = peft_model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft")
    peft_model.eval()

    bank = inject_bank(fp32_backbone, target_modules="all-linear", n_slots=2, max_rank=8)
    info = load_slot_from_dir(bank, 0, tmp_path / "peft")
    assert info.config.rank == 4 and info.config.dropout == pytest.approx(0.1)
    assert len(info.modules) == 6  # 2 layers x (q, v, down)
    with bank.use(SlotPlan.single([0] * 4)):
        ours = _logits(fp32_backbone.model, input_ids)
    assert (ours - _logits(peft_model, input_ids)).abs().max().item() <= TOL


def test_adapter_saved_by_lorafleet_loads_in_peft(
    tiny_dir: Path, fp32_backbone: Backbone, input_ids: torch.Tensor, tmp_path: Path, tools: SimpleNamespace
) -> None:
    bank = inject_bank(fp32_backbone, target_modules=QV, n_slots=2, max_rank=8)
    bank.load_slot(
        1, tools.random_adapter(bank, rank=6, seed=11), SlotConfig(rank=6, alpha=12, use_rslora=True)
    )
    saved = save_slot(bank, 1, tmp_path / "ours")
    assert bank.slot_info(1).config.content_hash == saved.content_hash
    with bank.use(SlotPlan.single([1] * 4)):
        ours = _logits(fp32_backbone.model, input_ids)

    base = load_backbone(tiny_dir, quantization="fp32", device="cpu").model
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ours")
    peft_model.eval()
    assert (ours - _logits(peft_model, input_ids)).abs().max().item() <= TOL


def test_partial_targets_save_as_a_regex_that_peft_matches(
    tiny_dir: Path, fp32_backbone: Backbone, input_ids: torch.Tensor, tmp_path: Path, tools: SimpleNamespace
) -> None:
    bank = inject_bank(fp32_backbone, target_modules=QV, n_slots=1, max_rank=4)
    only_first = [name for name in bank.layers if ".layers.0." in name]
    bank.load_slot(
        0, tools.random_adapter(bank, rank=2, seed=5, modules=only_first), SlotConfig(rank=2, alpha=2)
    )
    save_slot(bank, 0, tmp_path / "partial")
    with bank.use(SlotPlan.single([0] * 4)):
        ours = _logits(fp32_backbone.model, input_ids)
    peft_model = PeftModel.from_pretrained(
        load_backbone(tiny_dir, quantization="fp32", device="cpu").model, tmp_path / "partial"
    )
    assert (ours - _logits(peft_model.eval(), input_ids)).abs().max().item() <= TOL


def test_an_adapter_on_the_top_layers_round_trips_through_peft(
    tiny_dir: Path, fp32_backbone: Backbone, input_ids: torch.Tensor, tmp_path: Path, tools: SimpleNamespace
) -> None:
    """``layers="top 1"``: saved with PEFT's ``layers_to_transform``; PEFT loads it and computes the same logits;
    a PEFT adapter made with ``layers_to_transform`` loads back into a slot."""

    bank = inject_bank(fp32_backbone, target_modules="all-linear", n_slots=3, max_rank=8)
    config = TrainingConfig(rank=4, alpha=8, layers="top 1", dropout=0.0)
    bank.init_slot(0, config.slot_config(layer_names=list(bank.layers)), seed=0)
    with torch.no_grad():
        for name in bank.slot_info(0).modules:
            bank.layers[name].lora_B[0].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    assert {m.split(".")[2] for m in bank.slot_info(0).modules} == {"1"}
    saved = save_slot(bank, 0, tmp_path / "top1")
    written = json.loads((saved.directory / "adapter_config.json").read_text())
    assert written["layers_to_transform"] == [1] and written["layers_pattern"] == "layers"
    assert isinstance(written["target_modules"], list)

    peft_model = PeftModel.from_pretrained(
        load_backbone(tiny_dir, quantization="fp32", device="cpu").model, str(saved.directory)
    )
    peft_model.eval()
    adapted = {
        n.split(".base_model.model.")[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
    }
    assert adapted and all(".layers.1." in n for n in adapted)
    with bank.use(SlotPlan.single([0] * input_ids.shape[0])):
        ours = _logits(fp32_backbone.model, input_ids)
    assert (ours - _logits(peft_model, input_ids)).abs().max().item() <= TOL

    bank.evict_slot(0)
    info = load_slot_from_dir(bank, 1, saved.directory)
    assert all(".layers.1." in m for m in info.modules)
    with bank.use(SlotPlan.single([1] * input_ids.shape[0])):
        again = _logits(fp32_backbone.model, input_ids)
    assert (again - ours).abs().max().item() <= TOL


def test_layers_to_transform_that_disagrees_with_the_tensors_is_refused(
    fp32_backbone: Backbone, tmp_path: Path
) -> None:
    bank = inject_bank(fp32_backbone, target_modules="all-linear", n_slots=2, max_rank=8)
    bank.init_slot(0, TrainingConfig(rank=4, layers="top 1").slot_config(layer_names=list(bank.layers)))
    saved = save_slot(bank, 0, tmp_path / "bad")
    config = json.loads((saved.directory / "adapter_config.json").read_text())
    config["layers_to_transform"] = [0]  # the tensors sit on layer 1
    (saved.directory / "adapter_config.json").write_text(json.dumps(config))
    before = bank.occupied()
    with pytest.raises(AdapterFormatError, match="layers_to_transform"):
        load_slot_from_dir(bank, 1, saved.directory)
    assert bank.occupied() == before
