"""The frozen-prefix exactness check the training tests run on tiny (unit tier) and on SmolLM2 (integration tier):
two adapters on a bank, and the losses and every slot's gradients through the prefix equal the full-depth path."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from lorafleet.adapters import AdapterBank, SlotPlan, inject_bank
from lorafleet.adapters.prefix import DecoderSplit, FrozenPrefix, PrefixCache, lowest_adapted_layer
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import Example, collate, encode_example, pad_token_id
from lorafleet.training.trainer import user_losses

EXAMPLES = [
    Example(1, "What is my dog called?", "Your dog is called Biscuit.", "sft"),
    Example(2, "Where do I live?", "You live in Porto.", "sft"),
    Example(3, "Hi", "Hello there, friend of mine!", "sft"),
    Example(4, "What do I eat? Tell me about my diet in a sentence.", "You are vegetarian.", "sft"),
]
#: the same rows behind one shared opening, as a chat template's system prompt puts before every prompt (the
#: tiny backbone's plain format has none; 29 byte tokens, each row's own part of several lengths)
OPENING = "You answer in one sentence. "
SHARED_START_EXAMPLES = [replace(e, prompt=OPENING + e.prompt) for e in EXAMPLES]


class SharedRuns:
    """Counts the forwards that ran a shared start once per route (``DecoderSplit.run_from_shared``): the length
    of each start, its groups and rows."""

    def __init__(self, monkeypatch: Any) -> None:
        self.runs: list[tuple[int, int, int]] = []
        real = DecoderSplit.run_from_shared

        def spy(
            split: DecoderSplit, layer: int, start: torch.Tensor, rest: torch.Tensor, *a: Any, **k: Any
        ) -> Any:
            self.runs.append((start.shape[1], start.shape[0], rest.shape[0]))
            return real(split, layer, start, rest, *a, **k)

        monkeypatch.setattr(DecoderSplit, "run_from_shared", spy)

    @property
    def batches(self) -> list[tuple[int, int, int]]:
        """The runs of real batches (not ``DecoderSplit.find``'s own check, whose start is 5 tokens)."""
        return [r for r in self.runs if r[0] != 5]


def bank_with_two_adapters(backbone: Any, layers: str) -> tuple[AdapterBank, TrainingConfig]:
    bank = inject_bank(backbone, n_slots=3, max_rank=4)
    config = TrainingConfig(rank=4, alpha=8, dropout=0.0, layers=layers, max_seq_len=64)
    for slot in (0, 1):
        bank.init_slot(slot, config.slot_config(layer_names=list(bank.layers)), seed=slot)
        with torch.no_grad():  # non-zero B, so every A gets a gradient
            for name in bank.slot_info(slot).modules:
                bank.layers[name].lora_B[slot].normal_(0, 0.05, generator=torch.Generator().manual_seed(slot))
    return bank, config


def losses_and_grads(
    bank: AdapterBank,
    tokenizer: Any,
    prefix: FrozenPrefix | None,
    layer: int,
    examples: Sequence[Example] = EXAMPLES,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    # long enough for a shared opening not to be cut (a row over the length loses its prompt's start)
    max_seq_len = 64 if examples is EXAMPLES else 128
    encoded = [encode_example(tokenizer, e, max_seq_len=max_seq_len) for e in examples]
    batch = collate(encoded, pad_id=pad_token_id(tokenizer))
    owners = [0, 1, 0, 1]
    params = bank.trainable_parameters([0, 1])
    with bank.use(SlotPlan.single(owners)):
        losses, _ = user_losses(
            bank.model,
            batch,
            torch.tensor(owners),
            2,
            prefix=prefix,
            layer=layer,
            sequences=[ids for ids, _ in encoded],
        )
        losses.sum().backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    bank.release_parameters()
    return losses.detach(), grads


def check_exact(
    bank: AdapterBank, tokenizer: Any, *, atol: float, examples: Sequence[Example] = EXAMPLES
) -> None:
    split = DecoderSplit.find(bank.model)
    assert split is not None and split.shares_starts
    layer = lowest_adapted_layer(bank, [0, 1], split.num_layers)
    assert 0 < layer < split.num_layers
    prefix = FrozenPrefix(split, PrefixCache(identity="test"), pad_id=pad_token_id(tokenizer), bank=bank)
    full_loss, full_grads = losses_and_grads(bank, tokenizer, None, 0, examples)
    cached_loss, cached_grads = losses_and_grads(bank, tokenizer, prefix, layer, examples)
    again_loss, again_grads = losses_and_grads(bank, tokenizer, prefix, layer, examples)  # from the cache
    assert prefix.cache.stats["misses"] == len(examples) and prefix.cache.stats["hits"] == len(examples)
    assert torch.allclose(full_loss, cached_loss, atol=atol, rtol=0), (full_loss, cached_loss)
    assert torch.equal(cached_loss, again_loss)
    assert len(full_grads) == len(cached_grads) > 0
    assert sum(float(g.abs().sum()) for g in full_grads) > 0
    for full, cached in zip(full_grads, cached_grads, strict=True):
        assert torch.allclose(full, cached, atol=atol, rtol=0), float((full - cached).abs().max())
    for cached, again in zip(cached_grads, again_grads, strict=True):
        assert torch.equal(cached, again)
