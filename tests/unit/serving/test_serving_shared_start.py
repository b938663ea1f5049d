"""A join whose prompts begin alike (as a chat template's system prompt makes them) runs that start once per route
and copies its keys and values to each row: the rows then decode what a whole-prompt prefill decodes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from engine_world import PROMPTS

import lorafleet.serving.decode as decode
from lorafleet.adapters import AdapterBank
from lorafleet.adapters.serialization import load_slot_from_dir
from lorafleet.backbone import Backbone
from lorafleet.serving.decode import DecodeBatch, RowOutput, RowSpec, RowUpdate

#: the tiny backbone has no chat template: its byte tokens make this opening a 29-token shared start
OPENING = "You answer in one sentence. "


def _spec(backbone: Backbone, prompt: str, routes: tuple[tuple[int, float], ...], tokens: int) -> RowSpec:
    ids = tuple(backbone.tokenizer(prompt)["input_ids"])
    return RowSpec(ids, routes, max_new_tokens=tokens, keep_logits=True)


def _decode(
    batch: DecodeBatch, specs: list[RowSpec], later: list[RowSpec]
) -> tuple[dict[int, RowOutput], int]:
    """Every spec joins at once, later ones after two steps (fused into a step); the outputs, and the forwards
    the first join took."""
    outputs: dict[int, RowOutput] = {}
    forwards = 0

    def count(*_: object) -> None:
        nonlocal forwards
        forwards += 1

    def note(updates: list[RowUpdate]) -> None:
        outputs.update({int(u.key): u.output for u in updates if u.output is not None})  # type: ignore[call-overload]

    handle = batch.model.register_forward_pre_hook(count)
    try:
        note(batch.join(list(enumerate(specs))))
    finally:
        handle.remove()
    note(batch.step())
    note(batch.step())
    note(batch.join_and_step([(len(specs) + i, s) for i, s in enumerate(later)]))
    while len(batch):
        note(batch.step())
    return outputs, forwards


def _same_as_whole_prompts(
    backbone: Backbone,
    bank: AdapterBank | None,
    routes: list[tuple[tuple[int, float], ...]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prompts = [PROMPTS["carol"], PROMPTS["alice"], PROMPTS["bob"], PROMPTS["dave"], "Why?"]
    lengths = [9, 7, 6, 5, 8]
    specs = [_spec(backbone, OPENING + p, r, n) for p, r, n in zip(prompts, routes, lengths, strict=True)]
    later = [_spec(backbone, OPENING + "And again.", routes[0], 4)]

    def batch() -> DecodeBatch:
        return DecodeBatch(backbone.model, bank, backbone.tokenizer, device=backbone.device)

    shared, shared_forwards = _decode(batch(), specs, later)
    with monkeypatch.context() as patch:
        patch.setattr(decode, "MIN_SHARED_START", 10**9)
        whole, whole_forwards = _decode(batch(), specs, later)
    assert (shared_forwards, whole_forwards) == (2, 1)  # the start once per route, then the rest; one prefill
    assert sorted(shared) == sorted(whole) == list(range(6))
    for key in range(6):
        a, b = shared[key], whole[key]
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason
        gap = max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits, strict=True))
        assert gap <= 1e-4, f"row {key}: logits differ by {gap}"


def test_a_shared_start_runs_once_per_route_and_decodes_the_same(
    backbone: Backbone,
    bank: AdapterBank,
    adapter_folders: Callable[[int], Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for slot in (1, 2):
        load_slot_from_dir(bank, slot, adapter_folders(slot))
    routes = [((1, 1.0),), ((1, 0.3), (2, 0.7)), ((1, 1.0),), (), ()]
    _same_as_whole_prompts(backbone, bank, routes, monkeypatch)


def test_a_shared_start_on_a_model_without_adapters(
    backbone: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    _same_as_whole_prompts(backbone, None, [()] * 5, monkeypatch)


def test_a_join_shares_a_start_only_when_it_pays(
    backbone: Backbone, bank: AdapterBank, adapter_folders: Callable[[int], Path]
) -> None:
    """A start of at least ``MIN_SHARED_START`` tokens, fewer routes than rows; a prompt that is all start keeps
    its last token to run with the rest."""
    for slot in (1, 2):
        load_slot_from_dir(bank, slot, adapter_folders(slot))

    def forwards(specs: list[RowSpec]) -> int:
        batch = DecodeBatch(backbone.model, bank, backbone.tokenizer, device=backbone.device)
        calls = 0

        def count(*_: object) -> None:
            nonlocal calls
            calls += 1

        handle = backbone.model.register_forward_pre_hook(count)
        try:
            batch.join(list(enumerate(specs)))
        finally:
            handle.remove()
        return calls

    assert forwards([_spec(backbone, p, (), 2) for p in ("Hello there", "Hello world")]) == 1  # 6 alike
    assert forwards([_spec(backbone, OPENING + p, (), 2) for p in ("a", "b")]) == 2
    assert forwards([_spec(backbone, OPENING + p, ((1, 1.0),), 2) for p in ("a", "b", "c")]) == 2
    assert forwards([_spec(backbone, OPENING + p, ((s, 1.0),), 2) for p, s in (("a", 1), ("b", 2))]) == 1
    assert forwards([_spec(backbone, OPENING.strip(), (), 2), _spec(backbone, OPENING + "b", (), 2)]) == 2
    assert forwards([_spec(backbone, OPENING + "a", (), 2)]) == 1  # one row: nothing to share
