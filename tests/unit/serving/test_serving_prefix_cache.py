"""Prefix caching (``serving.prefix_cache``): a request whose prompt begins as an earlier one's reuses that start's
keys and values, and decodes what it decodes without the cache, on the real tiny backbone with real adapters.
A start is reused only under the same salt (tenant), the same adapters' weights files and the same weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_world import make_setup, request

from lorafleet.adapters import AdapterBank, SlotConfig
from lorafleet.adapters.serialization import load_slot_from_dir
from lorafleet.backbone import Backbone
from lorafleet.serving.decode import DecodeBatch, RowOutput, RowSpec, RowUpdate, run_to_end
from lorafleet.serving.prefix_cache import PrefixCache

#: the tiny backbone's byte tokens make this opening 50 tokens: six whole blocks of 8
OPENING = "You answer in one sentence, politely and briefly. "
Routes = tuple[tuple[int, float], ...]


def _spec(
    backbone: Backbone, prompt: str, routes: Routes, tokens: int = 6, salt: str = "tenant:1"
) -> RowSpec:
    ids = tuple(backbone.tokenizer(OPENING + prompt)["input_ids"])
    return RowSpec(ids, routes, max_new_tokens=tokens, keep_logits=True, cache_salt=salt)


def _loaded(bank: AdapterBank, adapter_folders: Callable[[int], Path]) -> AdapterBank:
    for slot in (1, 2):
        load_slot_from_dir(bank, slot, adapter_folders(slot))
    return bank


def _alone(backbone: Backbone, bank: AdapterBank, spec: RowSpec) -> RowOutput:
    """What the row decodes by itself, without any cache."""
    batch = DecodeBatch(backbone.model, bank, backbone.tokenizer, device=backbone.device)
    return run_to_end(batch, [spec])[0]


def _assert_same(cached: RowOutput, alone: RowOutput) -> None:
    assert cached.token_ids == alone.token_ids and cached.text == alone.text
    gap = max((a - b).abs().max().item() for a, b in zip(cached.logits, alone.logits, strict=True))
    assert gap <= 1e-4, f"logits differ by {gap}"


def _continuous(batch: DecodeBatch, first: list[RowSpec], later: list[RowSpec]) -> dict[int, RowOutput]:
    """``first`` rows decode two steps, then ``later`` rows join a running batch (fused into a step when the
    batch fuses joins), and all run to their end."""
    outputs: dict[int, RowOutput] = {}

    def note(updates: list[RowUpdate]) -> None:
        outputs.update({int(u.key): u.output for u in updates if u.output is not None})  # type: ignore[call-overload]

    note(batch.join(list(enumerate(first))))
    note(batch.step())
    note(batch.join_and_step([(len(first) + i, s) for i, s in enumerate(later)]))
    while len(batch):
        note(batch.step())
    return outputs


@pytest.mark.parametrize("fuse_joins", [True, False], ids=["fused-join", "join-forward"])
def test_newcomers_reuse_cached_starts_and_decode_what_they_would_alone(
    backbone: Backbone, bank: AdapterBank, adapter_folders: Callable[[int], Path], fuse_joins: bool
) -> None:
    bank = _loaded(bank, adapter_folders)
    cache = PrefixCache()
    batch = DecodeBatch(
        backbone.model,
        bank,
        backbone.tokenizer,
        device=backbone.device,
        fuse_joins=fuse_joins,
        prefix_cache=cache,
    )
    assert batch.fuses_joins is fuse_joins
    first = [_spec(backbone, "What is two and two?", ((1, 1.0),)), _spec(backbone, "Hi.", ())]
    later = [
        _spec(backbone, "Name a colour.", ((1, 1.0),)),  # the first row's start, through the same adapter
        _spec(backbone, "And a fruit, please?", ()),  # the base model's start
        _spec(backbone, "Name a colour.", ((1, 0.5), (2, 0.5))),  # the same text through a mixture: a miss
    ]
    outputs = _continuous(batch, first, later)
    assert cache.stats.hit_tokens == 2 * 48  # six blocks each for the two hits (a start of 50 tokens)
    for key, spec in enumerate(first + later):
        _assert_same(outputs[key], _alone(backbone, bank, spec))

    again = _spec(backbone, "Name a colour.", ((1, 0.5), (2, 0.5)))  # stored by the join above
    hits = cache.stats.hit_tokens
    _assert_same(run_to_end(batch, [again])[0], _alone(backbone, bank, again))
    assert (
        cache.stats.hit_tokens - hits == (len(again.prompt_ids) - 1) // 8 * 8
    )  # all of it but its last block


def test_a_start_is_reused_only_under_the_same_salt_adapter_file_and_weight(
    backbone: Backbone, bank: AdapterBank, adapter_folders: Callable[[int], Path]
) -> None:
    bank = _loaded(bank, adapter_folders)
    cache = PrefixCache()
    batch = DecodeBatch(backbone.model, bank, backbone.tokenizer, device=backbone.device, prefix_cache=cache)
    prime = _spec(backbone, "Prime.", ((1, 1.0),))
    run_to_end(batch, [prime])
    assert len(cache) == len(prime.prompt_ids) // 8 and cache.stats.hit_tokens == 0  # its whole blocks

    def hits(spec: RowSpec) -> int:
        before = cache.stats.hit_tokens
        _assert_same(run_to_end(batch, [spec])[0], _alone(backbone, bank, spec))
        return cache.stats.hit_tokens - before

    assert hits(_spec(backbone, "Another question?", ((1, 1.0),), salt="tenant:2")) == 0  # another tenant
    assert hits(_spec(backbone, "Another question?", ((1, 0.7),))) == 0  # another weight
    assert hits(_spec(backbone, "Another question?", ((1, 1.0),))) == 48
    load_slot_from_dir(bank, 1, adapter_folders(3), replace=True)  # another version in the same slot
    assert hits(_spec(backbone, "Another question?", ((1, 1.0),))) == 0  # the new weights, not the old blocks

    trained = bank.free_slot()  # a slot being trained has no content hash: its rows are never cached
    bank.init_slot(trained, SlotConfig(rank=4, alpha=8), seed=1)
    looked_up = cache.stats.lookup_tokens
    spec = _spec(backbone, "Prime.", ((trained, 1.0),))
    run_to_end(batch, [spec])
    run_to_end(batch, [spec])
    assert cache.stats.lookup_tokens == looked_up


def test_the_cache_keeps_to_its_budget_dropping_the_least_recently_used_blocks() -> None:
    layers, kv, head_dim = 2, 3, 4
    block_bytes = 2 * layers * kv * 8 * head_dim * 4  # keys and values, float32
    cache = PrefixCache(max_bytes=10 * block_bytes)

    def store(prompt: list[int]) -> None:
        tensors = [torch.randn(kv, len(prompt), head_dim) for _ in range(layers)]
        cache.store("", "", prompt, tensors, tensors)

    prompts = [[p] * 33 for p in range(5)]  # four whole blocks each
    for prompt in prompts[:2]:
        store(prompt)
    assert len(cache) == 8 and cache.nbytes == 8 * block_bytes
    assert len(cache.lookup("", "", prompts[0])) == 4  # now the most recently used
    store(prompts[2])  # 12 blocks: prompts[1]'s go first
    assert cache.nbytes <= 10 * block_bytes and cache.stats.evicted_blocks == 2
    assert len(cache.lookup("", "", prompts[0])) == 4 and len(cache.lookup("", "", prompts[2])) == 4
    assert len(cache.lookup("", "", prompts[1])) == 0  # its first blocks were evicted: the chain is broken
    assert cache.lookup("", "other", prompts[0]) == [] and cache.lookup("salt", "", prompts[0]) == []
    assert len(cache.lookup("", "", prompts[0][:9])) == 1  # a shorter prompt with the same start: one block
    assert cache.lookup("", "", prompts[0][:8]) == []  # a whole block would leave no token to run


def test_the_engine_caches_per_tenant_and_serves_the_same_answers_with_it_off(
    backbone: Backbone, bank: AdapterBank, adapter_folders: Callable[[int], Path]
) -> None:
    setup = make_setup(bank, backbone, adapter_folders)
    engine = setup.engine
    assert engine.prefix_cache is not None
    prompt = OPENING + "What is the capital of France?"
    first = engine.generate([request("alice", prompt=prompt)])[0]
    second = engine.generate([request("alice", prompt=prompt)])[0]
    assert engine.prefix_cache.stats.hit_tokens > 0
    assert second.token_ids == first.token_ids
    hits = engine.prefix_cache.stats.hit_tokens
    engine.generate([dataclasses.replace(request("alice", prompt=prompt), tenant_id=2)])
    assert engine.prefix_cache.stats.hit_tokens == hits  # another tenant's identical prompt: no reuse

    engine.prefix_cache = None  # off: the same answer
    off = engine.generate([request("alice", prompt=prompt)])[0]
    assert off.token_ids == first.token_ids
    assert off.logits is not None and second.logits is not None
    assert (off.logits - second.logits).abs().max().item() <= 1e-4
