"""Fused joins (``serving/fused.py``): newcomers' prefill inside the running rows' decoding step, one forward for
both, decodes exactly what separate forwards decode, on the real tiny backbone with real adapters."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_world import PROMPTS, Setup, assert_same, request

from lorafleet.adapters import AdapterBank
from lorafleet.adapters.plan import PartsPlan, PlanPart, SlotPlan
from lorafleet.adapters.serialization import load_slot_from_dir
from lorafleet.backbone import Backbone
from lorafleet.errors import ValidationError
from lorafleet.serving import ContinuousBatcher
from lorafleet.serving.decode import DecodeBatch, RowOutput, RowSpec, RowUpdate
from lorafleet.serving.fused import fusable


def _loaded_bank(bank: AdapterBank, adapter_folders: Callable[[int], Path]) -> AdapterBank:
    for slot in (1, 2, 3):
        load_slot_from_dir(bank, slot, adapter_folders(slot))
    return bank


def _spec(backbone: Backbone, prompt: str, routes: tuple[tuple[int, float], ...], tokens: int) -> RowSpec:
    ids = tuple(backbone.tokenizer(prompt)["input_ids"])
    return RowSpec(ids, routes, max_new_tokens=tokens, keep_logits=True)


def _run(
    batch: DecodeBatch, first: list[RowSpec], later: list[RowSpec], *, fused: bool
) -> dict[int, RowOutput]:
    """``first`` rows decode two steps, then ``later`` rows join (fused or not) and all run to their end."""
    outputs: dict[int, RowOutput] = {}

    def note(updates: list[RowUpdate]) -> None:
        outputs.update({int(u.key): u.output for u in updates if u.output is not None})  # type: ignore[call-overload]

    note(batch.join(list(enumerate(first))))
    note(batch.step())
    joiners = [(len(first) + i, spec) for i, spec in enumerate(later)]
    if fused:
        note(batch.join_and_step(joiners))
    else:
        note(batch.join(joiners))
        note(batch.step())
    while len(batch):
        note(batch.step())
    return outputs


def test_the_tiny_llama_fuses_joins_and_a_merged_bank_does_not(
    backbone: Backbone, bank: AdapterBank, adapter_folders: Callable[[int], Path]
) -> None:
    bank = _loaded_bank(bank, adapter_folders)
    assert fusable(backbone.model, bank) and fusable(backbone.model, None)
    assert not fusable(torch.nn.Linear(2, 2), None)
    bank.merge(1)  # a merged bank computes one adapter for every row: a join keeps its own forward
    assert not DecodeBatch(backbone.model, bank, backbone.tokenizer, device=backbone.device).fuses_joins
    bank.unmerge()
    assert fusable(backbone.model, bank)


def test_a_fused_join_decodes_what_separate_forwards_decode(
    backbone: Backbone, bank: AdapterBank, adapter_folders: Callable[[int], Path]
) -> None:
    bank = _loaded_bank(bank, adapter_folders)
    first = [
        _spec(backbone, PROMPTS["carol"], ((1, 1.0),), 9),
        _spec(backbone, PROMPTS["alice"], ((1, 0.3), (2, 0.7)), 7),
        _spec(backbone, PROMPTS["dave"], (), 6),  # base only
    ]
    later = [  # prompts of different lengths (left padding among the newcomers), one done at its first token
        _spec(backbone, PROMPTS["bob"], ((3, 0.5),), 5),
        _spec(backbone, PROMPTS["carol"] + " And again.", ((2, 1.0),), 8),
        _spec(backbone, PROMPTS["alice"], ((1, 1.0),), 1),
    ]
    batch = DecodeBatch(backbone.model, bank, backbone.tokenizer, device=backbone.device)
    assert batch.fuses_joins
    fused = _run(batch, first, later, fused=True)
    separate = _run(batch, first, later, fused=False)
    assert sorted(fused) == sorted(separate) == list(range(6))
    for key in range(6):
        a, b = fused[key], separate[key]
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
        assert len(a.token_ids) == (first + later)[key].max_new_tokens
        gap = max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))
        assert gap <= 1e-4, f"row {key}: logits differ by {gap}"


def test_a_fused_join_into_a_batch_without_adapters(backbone: Backbone) -> None:
    """The base model alone (no bank): the same tokens as joining with a forward of its own."""
    batch = DecodeBatch(backbone.model, None, backbone.tokenizer, device=backbone.device)
    first = [_spec(backbone, PROMPTS["carol"], (), 6)]
    later = [_spec(backbone, PROMPTS["bob"], (), 4), _spec(backbone, PROMPTS["alice"], (), 5)]
    fused, separate = _run(batch, first, later, fused=True), _run(batch, first, later, fused=False)
    assert [fused[k].token_ids for k in range(3)] == [separate[k].token_ids for k in range(3)]


def test_a_parts_plan_must_tile_its_input(bank: AdapterBank) -> None:
    plan = SlotPlan.from_rows([[], []])
    with pytest.raises(ValidationError, match="tile"):
        PartsPlan((PlanPart(0, 2, 2, 1, plan), PlanPart(3, 5, 1, 2, None)))
    with pytest.raises(ValidationError, match="plan of 2 rows"):
        PartsPlan((PlanPart(0, 3, 3, 1, plan),))


def test_requests_joining_a_running_batch_every_step_decode_what_they_would_alone(setup: Setup) -> None:
    """The continuous batcher's default over a fusable model: newcomers join at every step, in its forward."""
    with ContinuousBatcher(setup.engine, max_batch_size=8, max_wait_ms=0.0) as batcher:
        assert batcher.join_ratio == 0.0
        reqs = [request(user, max_new_tokens=3 + 2 * i) for i, user in enumerate(PROMPTS)] * 2
        futures = [batcher.submit(r) for r in reqs]
        results = [f.result(timeout=120) for f in futures]
    for req, result in zip(reqs, results, strict=True):
        (alone,) = setup.engine.generate([req])
        assert_same(result, alone)
