"""PEFT folders in and out of slots; every bad input is refused with a typed error and changes nothing."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.adapters import (
    AdapterBank,
    SlotConfig,
    SlotPlan,
    inject_bank,
    load_slot_from_dir,
    save_slot,
)
from lorafleet.adapters.serialization import FINGERPRINT_METADATA_KEY, read_adapter_fingerprint
from lorafleet.backbone import Backbone
from lorafleet.errors import (
    AdapterFormatError,
    AdapterShapeError,
    BackboneMismatchError,
    ConflictError,
    LorafleetError,
    NonFiniteError,
    TargetModuleError,
    UnsafeFormatError,
)
from lorafleet.registry.peft_format import CONFIG_FILE, WEIGHTS_FILE, inspect_adapter_dir


@pytest.fixture
def bank(fp32_backbone: Backbone) -> AdapterBank:
    return inject_bank(fp32_backbone, target_modules=["q_proj", "v_proj"], n_slots=3, max_rank=8)


@pytest.fixture
def saved(bank: AdapterBank, tmp_path: Path, tools: SimpleNamespace) -> Path:
    """A valid adapter folder written from slot 0 (slot 0 stays loaded, slot 1 stays empty)."""
    bank.load_slot(0, tools.random_adapter(bank, rank=4, seed=0), SlotConfig(rank=4, alpha=8, dropout=0.05))
    save_slot(bank, 0, tmp_path / "good")
    return tmp_path / "good"


def test_round_trip_keeps_weights_config_and_fingerprint(bank: AdapterBank, saved: Path) -> None:
    config = json.loads((saved / CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert read_adapter_fingerprint(inspect_adapter_dir(saved)) == bank.fingerprint
    assert sorted(load_file(saved / WEIGHTS_FILE)) == sorted(bank.slot_state_dict(0))
    info = load_slot_from_dir(bank, 1, saved, require_fingerprint=True, name="user-7")
    assert info.config.name == "user-7" and info.config.dropout == pytest.approx(0.05)
    assert info.config.content_hash == bank.slot_info(0).config.content_hash
    assert all(
        torch.equal(a, b)
        for a, b in zip(bank.slot_state_dict(0).values(), bank.slot_state_dict(1).values(), strict=True)
    )
    with pytest.raises(ConflictError):
        load_slot_from_dir(bank, 1, saved)
    load_slot_from_dir(bank, 1, saved, replace=True)


def _rewrite(
    folder: Path, change: Callable[[dict[str, torch.Tensor]], None], metadata: dict[str, str]
) -> None:
    tensors = load_file(folder / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_FILE, metadata=metadata)


def _nan(t: dict[str, torch.Tensor]) -> None:
    next(iter(t.values()))[0, 0] = float("nan")


def _wrong_shape(t: dict[str, torch.Tensor]) -> None:
    key = next(k for k in t if "lora_A" in k)
    t[key] = torch.zeros(4, 63)


def _rank_too_high(t: dict[str, torch.Tensor]) -> None:
    for key in t:
        t[key] = torch.zeros(16, t[key].shape[1]) if "lora_A" in key else torch.zeros(t[key].shape[0], 16)


def _unknown_module(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    t["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"] = torch.zeros(128, 4)


def _dora(t: dict[str, torch.Tensor]) -> None:
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)


def _config(**changes: object) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / CONFIG_FILE).read_text())
        config.update(changes)
        (folder / CONFIG_FILE).write_text(json.dumps(config))

    return apply


def _tensors(
    change: Callable[[dict[str, torch.Tensor]], None], fingerprint: str | None = "keep"
) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        metadata = {"format": "pt"}
        if fingerprint == "keep":
            metadata[FINGERPRINT_METADATA_KEY] = read_adapter_fingerprint(inspect_adapter_dir(folder)) or ""
        elif fingerprint:
            metadata[FINGERPRINT_METADATA_KEY] = fingerprint
        _rewrite(folder, change, metadata)

    return apply


def _pickle(folder: Path) -> None:
    torch.save({"x": torch.zeros(1)}, folder / "adapter_model.bin")


def _truncate(folder: Path) -> None:
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) - 100])


BAD_INPUTS: dict[str, tuple[Callable[[Path], None], type[LorafleetError]]] = {
    "pickle": (_pickle, UnsafeFormatError),
    "truncated": (_truncate, AdapterFormatError),
    "non-finite": (_tensors(_nan), NonFiniteError),
    "wrong shape": (_tensors(_wrong_shape), AdapterShapeError),
    "rank in tensors above max": (_tensors(_rank_too_high), AdapterShapeError),
    "rank in config above max": (_config(r=16), AdapterShapeError),
    "rank differs from config": (_config(r=2), AdapterShapeError),
    "other backbone": (_tensors(lambda t: None, fingerprint="0" * 64), BackboneMismatchError),
    "module not in bank": (_tensors(_unknown_module), TargetModuleError),
    "dora tensor": (_tensors(_dora), AdapterFormatError),
    "dora config": (_config(use_dora=True), AdapterFormatError),
    "not lora": (_config(peft_type="IA3"), AdapterFormatError),
    "bias trained": (_config(bias="all"), AdapterFormatError),
    "dropout out of range": (_config(lora_dropout=1.5), AdapterFormatError),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_adapters_are_refused_and_change_nothing(
    case: str, bank: AdapterBank, saved: Path, tmp_path: Path, input_ids: torch.Tensor, tools: SimpleNamespace
) -> None:
    corrupt, error = BAD_INPUTS[case]
    folder = tmp_path / "bad"
    shutil.copytree(saved, folder)
    corrupt(folder)
    before = tools.bank_digest(bank)
    with bank.use(SlotPlan.single([0, 0, None, 0])), torch.no_grad():
        logits = bank.model(input_ids).logits
    for slot, replace in ((1, False), (0, True)):  # an empty slot, and replacing a loaded one
        with pytest.raises(error):
            load_slot_from_dir(bank, slot, folder, replace=replace)
    assert tools.bank_digest(bank) == before
    assert bank.slot_info(1) is None and bank.slot_info(0).config.rank == 4
    with bank.use(SlotPlan.single([0, 0, None, 0])), torch.no_grad():
        assert torch.equal(bank.model(input_ids).logits, logits)


def test_missing_fingerprint_is_refused_only_when_required(
    bank: AdapterBank, saved: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "foreign"
    shutil.copytree(saved, folder)
    _tensors(lambda t: None, fingerprint=None)(folder)
    with pytest.raises(BackboneMismatchError):
        load_slot_from_dir(bank, 1, folder, require_fingerprint=True)
    assert load_slot_from_dir(bank, 1, folder).config.backbone_fingerprint is None
