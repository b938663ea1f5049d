"""The frozen-prefix path is exact on the real SmolLM2 (30 layers; adapters on the top 6) in nf4: losses and every
slot's gradients equal the full-depth path. The tiny backbone's cases are in the unit tier
(tests/unit/training/test_training_prefix.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.prefix_exactness import bank_with_two_adapters, check_exact

from lorafleet.backbone import load_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # as in the unit tier they came from


def test_prefix_path_is_exact_on_smollm2_nf4(smollm2_data_dir: Path) -> None:
    backbone = load_backbone(
        "builtin:smollm2-135m", quantization="nf4", device="cpu", data_dir=smollm2_data_dir
    )
    bank, _ = bank_with_two_adapters(backbone, "top 6")
    assert {int(m.split(".")[2]) for m in bank.slot_info(0).modules} == set(range(24, 30))
    check_exact(bank, backbone.tokenizer, atol=1e-5)
