"""A serving engine on CPU computes its 4-bit layers from dense copies made once (``adapters.dense.densify``).

On the real tiny backbone in nf4 (real bitsandbytes layers): the engine ``build_engine`` makes serves from dense
views of every 4-bit layer by default and none with ``serving_dense_mb=0`` (how a budget picks the top layers
first: ``tests/unit/training/test_training_dense.py``); and the answers (tokens and logits, through adapters, a mixture and the base) are those of the 4-bit layers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from engine_world import make_setup, request

from lorafleet.adapters import inject_bank
from lorafleet.adapters.dense import DenseView, densify
from lorafleet.backbone import load_backbone
from lorafleet.config import Settings
from lorafleet.registry import Registry
from lorafleet.serving import GenerationResult
from lorafleet.serving.factory import build_engine
from lorafleet.store.blob import open_blob_store
from lorafleet.store.sql.database import Database


def _kinds(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(names of the 4-bit linear layers, names of the dense views) in ``model``."""
    four_bit = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    dense = [n for n, m in model.named_modules() if isinstance(m, DenseView)]
    return four_bit, dense


@pytest.mark.parametrize("dense_mb", [None, 0])  # None: the default on CPU (1 GiB); 0: none
def test_build_engine_serves_from_dense_views_unless_told_not_to(
    tiny_dir: Path, sqlite_database: Database, tmp_path: Path, dense_mb: int | None
) -> None:
    registry = Registry(sqlite_database, open_blob_store((tmp_path / "blobs").as_uri()))
    settings = Settings(backbone=str(tiny_dir), device="cpu", data_dir=tmp_path, serving_dense_mb=dense_mb)
    engine = build_engine(settings, sqlite_database, registry, quantization="nf4", n_slots=2, max_rank=4)
    four_bit, dense = _kinds(engine.backbone.model)
    if dense_mb is None:
        assert dense and not four_bit
    else:
        assert four_bit and not dense
    assert all(n.endswith(".base_layer") for n in dense)  # the bank's layers wrap the views


def test_dense_views_serve_the_answers_of_the_4bit_layers(
    tiny_dir: Path, adapter_folders: Callable[[int], Path]
) -> None:
    results: list[list[GenerationResult]] = []
    for dense in (False, True):
        backbone = load_backbone(tiny_dir, quantization="nf4", device="cpu")
        bank = inject_bank(backbone, target_modules="all-linear", n_slots=8, max_rank=8)
        if dense:
            assert densify(backbone.model, budget_bytes=1 << 30) > 0
            assert not _kinds(backbone.model)[0]
        setup = make_setup(bank, backbone, adapter_folders)
        # alice: one adapter; bob: a 0.3/0.7 mixture; carol: the base; all in one batch
        outcomes = setup.engine.generate_each([request(u) for u in ("alice", "bob", "carol")])
        assert all(isinstance(o, GenerationResult) for o in outcomes), outcomes
        results.append([o for o in outcomes if isinstance(o, GenerationResult)])
    for four_bit, dense_result in zip(*results, strict=True):
        assert four_bit.token_ids == dense_result.token_ids and four_bit.text == dense_result.text
        assert four_bit.logits is not None and dense_result.logits is not None
        assert (four_bit.logits - dense_result.logits).abs().max().item() <= 1e-4
