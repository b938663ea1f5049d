"""Fixtures for the QA unit tests: the tiny backbone (fp32, built once per session) with an adapter bank."""

from __future__ import annotations

import pytest

from lorafleet.adapters import AdapterBank, inject_bank
from lorafleet.backbone import Backbone, build_tiny_backbone, load_backbone


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Backbone, AdapterBank]:
    folder = build_tiny_backbone(tmp_path_factory.mktemp("lorafleet-qa-unit"))
    backbone = load_backbone(folder, quantization="fp32", device="cpu")
    return backbone, inject_bank(backbone, target_modules=["q_proj", "v_proj"], n_slots=4, max_rank=8)
