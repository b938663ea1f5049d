"""The frozen-prefix path is exact: losses and every slot's gradients equal the full-depth path.

On the real tiny backbone (2 layers; adapters on the top one) in fp32 and nf4 (the real SmolLM2, 30 layers with
adapters on the top 6, is in the integration tier: tests/integration/backbone/test_training_prefix_smollm2.py).
Dropout is 0, so both paths compute the same function.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.prefix_exactness import (
    EXAMPLES,
    OPENING,
    SHARED_START_EXAMPLES,
    SharedRuns,
    bank_with_two_adapters,
    check_exact,
)

from lorafleet.adapters import SlotPlan
from lorafleet.adapters.prefix import DecoderSplit, FrozenPrefix, PrefixCache
from lorafleet.backbone import load_backbone
from lorafleet.routing.embeddings import embed_prompts, routing_key
from lorafleet.training.dataset import Example, collate, encode_example, pad_token_id
from lorafleet.training.metrics import score_examples, scored_positions, shared_start
from lorafleet.training.trainer import SlotTraining, train_slots


@pytest.mark.parametrize("quantization", ["fp32", "nf4"])
def test_prefix_path_is_exact_on_tiny(tiny_dir: Path, quantization: str) -> None:
    backbone = load_backbone(tiny_dir, quantization=quantization, device="cpu")
    bank, _ = bank_with_two_adapters(backbone, "top 1")
    assert all(m.startswith("model.layers.1.") for m in bank.slot_info(0).modules)
    check_exact(bank, backbone.tokenizer, atol=1e-5)


@pytest.mark.parametrize("quantization", ["fp32", "nf4"])
def test_a_shared_start_runs_once_per_route_and_stays_exact(
    tiny_dir: Path, quantization: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows that begin alike (as a chat template's system prompt makes them) run that start once per route: the
    losses and every slot's gradients are still the full-depth path's. One row's prompt is the opening alone, so
    its first scored position is where the start would otherwise run on."""
    backbone = load_backbone(tiny_dir, quantization=quantization, device="cpu")
    bank, _ = bank_with_two_adapters(backbone, "top 1")
    runs = SharedRuns(monkeypatch)
    check_exact(bank, backbone.tokenizer, atol=1e-5, examples=SHARED_START_EXAMPLES)
    assert (
        len(runs.batches) == 2
    )  # the first pass and the one from the cache; the full-depth pass has no prefix
    for length, groups, rows in runs.batches:
        assert length >= len(OPENING) - 1 and (groups, rows) == (2, 4)
    opening_only = [*SHARED_START_EXAMPLES[:3], Example(9, OPENING, "Hello.", "sft")]
    check_exact(bank, backbone.tokenizer, atol=1e-5, examples=opening_only)
    assert len(runs.batches) == 4


def test_when_a_batch_shares_its_start(tiny_dir: Path) -> None:
    """By route, only past the shortest scored prompt, never per token or with a route per row."""
    backbone = load_backbone(tiny_dir, quantization="fp32", device="cpu")
    bank, _ = bank_with_two_adapters(backbone, "top 1")
    tok = backbone.tokenizer
    prefix = FrozenPrefix.for_bank(bank, identity="test", pad_id=pad_token_id(tok))
    assert prefix is not None

    def start_of(examples: list[Example], plan: SlotPlan) -> object:
        encoded = [encode_example(tok, e, max_seq_len=128) for e in examples]
        batch = collate(encoded, pad_id=pad_token_id(tok))
        with bank.use(plan):
            return shared_start(
                prefix, [ids for ids, _ in encoded], scored_positions(batch.labels), batch.input_ids.shape[1]
            )

    shared = start_of(SHARED_START_EXAMPLES, SlotPlan.single([0, 1, 0, 1]))
    assert shared is not None
    assert shared.representatives == [0, 1] and shared.owners.tolist() == [0, 1, 0, 1]
    assert shared.plan is not None and shared.plan.slot_ids[:, 0].tolist() == [0, 1]
    three = start_of(SHARED_START_EXAMPLES, SlotPlan.single([0, None, None, 1]))
    assert three is not None and three.owners.tolist() == [0, 1, 1, 2]
    assert start_of(SHARED_START_EXAMPLES[:2], SlotPlan.single([0, 1])) is None  # a route per row: no gain
    assert start_of(EXAMPLES, SlotPlan.single([0, 1, 0, 1])) is None  # nothing shared
    per_token = SlotPlan.single([0, 1, 0, 1]).with_token_weights(torch.ones(4, 100, 1))
    assert start_of(SHARED_START_EXAMPLES, per_token) is None
    short = start_of(
        [*SHARED_START_EXAMPLES[:3], Example(9, OPENING, "Hello.", "sft")], SlotPlan.single([0] * 4)
    )
    assert short is not None and short.length < shared.length  # the opening-only row's answer is scored
    prefix.split.shares_starts = False
    assert start_of(SHARED_START_EXAMPLES, SlotPlan.single([0, 1, 0, 1])) is None


def test_a_model_whose_shared_start_does_not_reproduce_its_logits_takes_whole_rows(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backbone = load_backbone(tiny_dir, quantization="fp32", device="cpu")
    bank, _ = bank_with_two_adapters(backbone, "top 1")
    assert DecoderSplit.find(bank.model).shares_starts  # type: ignore[union-attr]
    real = DecoderSplit.run_from_shared
    monkeypatch.setattr(DecoderSplit, "run_from_shared", lambda *a, **k: real(*a, **k) + 0.1)
    split = DecoderSplit.find(bank.model)
    assert split is not None and not split.shares_starts  # the split itself still holds
    prefix = FrozenPrefix(
        split, PrefixCache(identity="test"), pad_id=pad_token_id(backbone.tokenizer), bank=bank
    )
    runs = SharedRuns(monkeypatch)
    score_examples(
        bank, backbone.tokenizer, SHARED_START_EXAMPLES, [[(0, 1.0)]] * 4, max_seq_len=128, prefix=prefix
    )
    assert runs.batches == []


@pytest.mark.parametrize("examples", [EXAMPLES, SHARED_START_EXAMPLES], ids=["own-starts", "shared-start"])
def test_training_with_the_prefix_gives_the_same_adapters(
    tiny_dir: Path, examples: list[Example], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole train_slots run (holdouts before/after included) is the same with and without the prefix."""
    runs = SharedRuns(monkeypatch)
    results = []
    for use_prefix in (False, True):
        backbone = load_backbone(tiny_dir, quantization="fp32", device="cpu")
        bank, config = bank_with_two_adapters(backbone, "top 1")
        config = config.with_changes(max_steps=5, batch_size=2, learning_rate=3e-3, max_seq_len=128)
        prefix = (
            FrozenPrefix.for_bank(bank, identity="test", pad_id=pad_token_id(backbone.tokenizer))
            if use_prefix
            else None
        )
        tasks = [SlotTraining(s, f"u{s}", examples[s::2], examples[s + 2 :: 4]) for s in (0, 1)]
        out = train_slots(bank, backbone.tokenizer, tasks, config, prefix=prefix)
        results.append(
            ([r.metrics for r in out], {k: v for s in (0, 1) for k, v in bank.slot_state_dict(s).items()})
        )
    (plain_metrics, plain_state), (prefix_metrics, prefix_state) = results
    assert bool(runs.batches) == (examples is SHARED_START_EXAMPLES)
    for a, b in zip(plain_metrics, prefix_metrics, strict=True):
        assert set(a) == set(b)
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    for key in plain_state:
        assert torch.allclose(plain_state[key], prefix_state[key], atol=1e-5), key


@pytest.mark.parametrize("rows", [EXAMPLES, SHARED_START_EXAMPLES], ids=["own-starts", "shared-start"])
def test_scoring_shares_the_prefix_across_routes(
    tiny_dir: Path, rows: list[Example], monkeypatch: pytest.MonkeyPatch
) -> None:
    """QA's columns score the same rows under several routes: the prefix is computed once per row (and a shared
    start once per route: the mixture of two adapters is a route of its own)."""
    backbone = load_backbone(tiny_dir, quantization="fp32", device="cpu")
    bank, _ = bank_with_two_adapters(backbone, "top 1")
    tok = backbone.tokenizer
    prefix = FrozenPrefix.for_bank(bank, identity="test", pad_id=pad_token_id(tok))
    assert prefix is not None
    runs = SharedRuns(monkeypatch)
    columns: list[list[tuple[int, float]]] = [[], [(0, 1.0)], [(1, 1.0)], [(0, 0.5), (1, 0.5)]]
    examples = [e for _ in columns for e in rows]
    routes = [c for c in columns for _ in rows]
    plain = score_examples(bank, tok, examples, routes, max_seq_len=128)
    shared = score_examples(bank, tok, examples, routes, max_seq_len=128, prefix=prefix)
    assert prefix.cache.stats["computed"] == len(rows)
    assert [(g, r) for _, g, r in runs.batches] == ([(4, 16)] if rows is SHARED_START_EXAMPLES else [])
    for a, b in zip(plain, shared, strict=True):
        assert a.tokens == b.tokens and a.correct == b.correct
        assert a.loss_sum == pytest.approx(b.loss_sum, abs=1e-4)


def test_the_cache_spills_to_disk_then_drops_and_never_fails(tmp_path: Path) -> None:
    states = [torch.full((10, 4), float(i)) for i in range(6)]  # 160 bytes each
    cache = PrefixCache(identity="t", memory_budget=400, disk_budget=400, spill_dir=tmp_path)
    keys = [cache.key(3, [i, i + 1]) for i in range(6)]
    for key, s in zip(keys, states, strict=True):
        cache.put(key, s)
    assert cache.memory_bytes <= 400 and cache.disk_bytes <= 400
    assert cache.stats["spilled"] == 2 and cache.stats["dropped"] == 2
    assert torch.equal(cache.get(keys[0]), states[0])  # spilled, read back from disk
    assert cache.get(keys[2]) is None  # dropped: the caller recomputes it
    assert torch.equal(cache.get(keys[5]), states[5])
    assert cache.key(3, [1, 2]) != cache.key(4, [1, 2]) != PrefixCache(identity="u").key(3, [1, 2])
    cache.clear()
    assert cache.get(keys[0]) is None and not list(tmp_path.glob("*/*.safetensors"))


def test_routing_keys_through_the_prefix_equal_the_full_forward(tiny_dir: Path) -> None:
    """A routing key made from cached final states is the one the base model's forward gives; a later round's
    replayed prompts are not run again."""
    backbone = load_backbone(tiny_dir, quantization="nf4", device="cpu")
    bank, _ = bank_with_two_adapters(backbone, "top 1")
    prefix = FrozenPrefix.for_bank(bank, identity="test", pad_id=pad_token_id(backbone.tokenizer))
    assert prefix is not None
    prompts = [e.prompt for e in EXAMPLES]
    plain = embed_prompts(backbone, bank, prompts)
    cached = embed_prompts(backbone, bank, prompts, prefix=prefix)
    assert torch.allclose(plain, cached, atol=1e-5)
    computed = prefix.cache.stats["computed"]
    key = routing_key(backbone, bank, [*prompts, "A new prompt"], prefix=prefix)
    assert prefix.cache.stats["computed"] == computed + 1
    assert key == pytest.approx(routing_key(backbone, bank, [*prompts, "A new prompt"]), abs=1e-5)
