"""Sanity checks on adapter files before evaluation: each problem is reported by name, nothing is loaded."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.adapters import AdapterBank, SlotConfig, save_slot
from lorafleet.backbone import Backbone
from lorafleet.domain import Adapter, AdapterVersion
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.sanity import check_adapter
from lorafleet.registry.peft_format import read_safetensors_header

CONFIGURED = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture
def saved(tiny_parts: tuple[Backbone, AdapterBank], tmp_path: Path) -> Path:
    """A trained-looking adapter (rank 4 on q/v, small non-zero B) saved from the bank."""
    _, bank = tiny_parts
    slot = bank.free_slot()
    bank.init_slot(slot, SlotConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")), seed=1)
    for layer in bank.layers.values():
        a, b = layer.read_slot(slot)
        layer.write_slot(slot, a, torch.full_like(b, 0.01), scaling=2.0, dropout=0.0)
    try:
        return save_slot(bank, slot, tmp_path / "adapter").directory
    finally:
        bank.evict_slot(slot)


def _version(bank: AdapterBank, **changes: object) -> AdapterVersion:
    version = AdapterVersion(
        id=1,
        adapter_id=1,
        number=1,
        blob_uri="file:///x",
        sha256="0" * 64,
        size_bytes=1,
        base_fingerprint=bank.fingerprint or "",
        rank=4,
        target_modules=("q_proj", "v_proj"),
        training_config={},
        metrics={},
        status="candidate",
        created_at=datetime.now(UTC),
    )
    return dataclasses.replace(version, **changes)  # type: ignore[arg-type]


def _adapter(**config: object) -> Adapter:
    return Adapter(1, 1, 1, "personal", {**CONFIGURED, **config}, datetime.now(UTC))


def _rewrite(folder: Path, change: object) -> None:
    weights = folder / "adapter_model.safetensors"
    meta = read_safetensors_header(weights).get("__metadata__") or {}
    tensors = load_file(str(weights))
    change(tensors)  # type: ignore[operator]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(weights), metadata=dict(meta))


def check(folder: Path, bank: AdapterBank, **kwargs: object) -> tuple[str, ...]:
    return check_adapter(
        folder,
        version=kwargs.pop("version", _version(bank)),  # type: ignore[arg-type]
        adapter=kwargs.pop("adapter", _adapter()),  # type: ignore[arg-type]
        bank=bank,
        policy=kwargs.pop("policy", QAPolicy()),  # type: ignore[arg-type]
    ).problems


def test_a_sound_adapter_passes_with_its_update_norms(
    tiny_parts: tuple[Backbone, AdapterBank], saved: Path
) -> None:
    _, bank = tiny_parts
    result = check_adapter(saved, version=_version(bank), adapter=_adapter(), bank=bank, policy=QAPolicy())
    assert result.passed and len(result.update_norms) == 4  # q and v of 2 layers
    assert all(0 < v < 10 for v in result.update_norms.values())
    assert result.to_json()["passed"] and result.to_json()["modules"] == 4
    assert bank.occupied() == {}


def test_non_finite_weights_are_named(tiny_parts: tuple[Backbone, AdapterBank], saved: Path) -> None:
    _, bank = tiny_parts
    _rewrite(saved, lambda t: t[sorted(t)[0]].__setitem__((0, 0), float("inf")))
    (problem,) = check(saved, bank)
    assert problem.startswith("sanity/non-finite: 1 tensors hold NaN or infinity")


def test_a_foreign_backbone_is_refused_by_row_and_by_file(
    tiny_parts: tuple[Backbone, AdapterBank], saved: Path
) -> None:
    _, bank = tiny_parts
    (problem,) = check(saved, bank, version=_version(bank, base_fingerprint="e" * 64))
    assert problem.startswith("sanity/fingerprint: version 1 records backbone eeeeeeee")
    weights = saved / "adapter_model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # no fingerprint recorded
    assert check(saved, bank) == ("sanity/fingerprint: the weights record no backbone fingerprint",)


def test_rank_and_target_modules_must_be_the_configured_ones(
    tiny_parts: tuple[Backbone, AdapterBank], saved: Path
) -> None:
    _, bank = tiny_parts
    problems = check(saved, bank, adapter=_adapter(rank=8), version=_version(bank, rank=8))
    assert problems == (
        "sanity/rank: the file has rank 4, the version row 8",
        "sanity/rank: rank 4 is not the configured rank 8",
    )
    (problem,) = check(saved, bank, adapter=_adapter(target_modules=["q_proj", "k_proj"]))
    assert problem == "sanity/target-modules: adapts ['q_proj', 'v_proj'], configured ['k_proj', 'q_proj']"
    (problem,) = check(saved, bank, adapter=_adapter(target_modules=r".*\.q_proj"))
    assert problem.startswith("sanity/target-modules: model.layers.0.self_attn.v_proj does not match")
    assert check(saved, bank, adapter=_adapter(target_modules="all-linear")) == ()


def test_update_norms_outside_the_bounds_are_refused(
    tiny_parts: tuple[Backbone, AdapterBank], saved: Path
) -> None:
    _, bank = tiny_parts
    (high,) = check(saved, bank, policy=QAPolicy(max_update_norm=1e-3))
    assert high.startswith("sanity/update-norm: 4 modules above 0.001")
    (low,) = check(saved, bank, policy=QAPolicy(min_update_norm=1e3, max_update_norm=1e4))
    assert low.startswith("sanity/update-norm: 4 modules below 1000")


def test_files_that_are_not_a_lora_adapter_are_a_format_problem(
    tiny_parts: tuple[Backbone, AdapterBank], saved: Path
) -> None:
    _, bank = tiny_parts
    _rewrite(saved, lambda t: t.__setitem__("base_model.model.lm_head.weight", torch.zeros(2, 2)))
    (problem,) = check(saved, bank)
    assert problem.startswith("sanity/format: unsupported tensor 'base_model.model.lm_head.weight'")
    _rewrite(saved, lambda t: t.pop("base_model.model.lm_head.weight"))
    (saved / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}), encoding="utf-8")  # no rank
    assert check(saved, bank)[-1].startswith("sanity/format:")


def test_absurd_finite_weights_are_the_first_reason_naming_the_tensor(
    tiny_parts: tuple[Backbone, AdapterBank], saved: Path
) -> None:
    _, bank = tiny_parts
    first = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    _rewrite(saved, lambda t: t[first].__setitem__((0, 0), 1e30))  # finite: the non-finite check lets it by
    problems = check(saved, bank, version=_version(bank, rank=8))  # and a second, unrelated problem
    assert problems[0] == (
        "sanity/weights: largest |value| above the bound 1000 in "
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight: 1e+30"
    )
    assert problems[1].startswith("sanity/weights: norm per rank (||B||_F/sqrt(r)) above the bound 10000 in")
    assert problems[2].startswith("sanity/weights: largest |value| of the update above the bound 1000")
    assert "sanity/rank: the file has rank 4, the version row 8" in problems
    policy = QAPolicy(
        max_abs_lora_weight=1e31,
        max_lora_weight_norm=1e31,
        max_abs_update=1e40,
        max_update_norm_per_rank=1e40,
    )
    assert not any(p.startswith("sanity/weights") for p in check(saved, bank, policy=policy))


def test_an_absurd_alpha_is_named(tiny_parts: tuple[Backbone, AdapterBank], saved: Path) -> None:
    _, bank = tiny_parts
    config = json.loads((saved / "adapter_config.json").read_text(encoding="utf-8"))
    (saved / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e30}), encoding="utf-8")
    problems = check(saved, bank)
    assert problems[0] == (
        "sanity/weights: adapter_config.json: lora_alpha=1e+30 with r=4 gives scaling 2.5e+29, "
        "above the bound 10000"
    )
