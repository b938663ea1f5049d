"""Anchor distillation (``TrainingConfig.anchor_distill``): KL(base || adapter) on the anchors' answer positions,
from the base's top-k log-probs computed once per job, on the real tiny backbone (fp32)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lorafleet.adapters import AdapterBank, SlotPlan
from lorafleet.errors import ValidationError
from lorafleet.training import trainer
from lorafleet.training.anchors import ANCHOR_DISTILL_TOP_K, anchor_distill
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import Example, collate, pad_token_id
from lorafleet.training.metrics import scored_logits
from lorafleet.training.trainer import (
    SlotTraining,
    _Frozen,
    _Rows,
    _stream,
    anchor_targets,
    train_slots,
)

FAST = TrainingConfig(
    learning_rate=3e-3, max_steps=6, batch_size=6, max_seq_len=64, rank=4, alpha=8, dropout=0.0
)
TRAIN = [Example(i, f"Q: what is my pet called, take {i}?\nA: ", "Zorb Quix.", "sft") for i in range(8)]
ANCHORS = [
    Example(100 + i, f"Q: {q}?\nA: ", a, "sft")
    for i, (q, a) in enumerate(
        [("sky colour", "the sky is blue."), ("two and two", "that is four."), ("sea", "the sea is wet.")]
    )
]


def _task() -> SlotTraining:
    return SlotTraining(0, "ada", TRAIN, TRAIN[:2], anchors=ANCHORS)


def _every_row(
    bank: AdapterBank, tokenizer: Any, config: TrainingConfig, *, top_k: int = ANCHOR_DISTILL_TOP_K
) -> tuple[torch.Tensor, _Rows, torch.Tensor, torch.Tensor]:
    """Slot 0's logits (train mode) on all of the task's rows in one micro-batch, the rows, the scored tokens'
    rows, and the distillation term ``[1]`` against the base's targets."""
    task = _task()
    stream = _stream(tokenizer, task, config)
    assert stream is not None
    pad = pad_token_id(tokenizer)
    frozen = _Frozen(None, 0)
    targets = anchor_targets(bank, [stream], [task], config, pad, frozen, top_k=top_k)
    assert targets[0] is not None and len(targets[0]) == len(ANCHORS)
    packed = _Rows()
    packed.add_sft(0, stream, len(stream.encoded))
    batch = collate(packed.rows, pad_id=pad)
    bank.model.train()
    with bank.use(SlotPlan.single([0] * len(packed.rows))):
        logits, scored = scored_logits(bank.model, batch, sequences=[ids for ids, _ in packed.rows])
    freed = torch.zeros_like(scored.rows, dtype=torch.bool)
    kl = anchor_distill(logits, scored.rows, freed, packed.owners, packed.anchor_index, targets, 1)
    bank.model.eval()
    return logits, packed, scored.rows, kl


def test_the_term_is_zero_on_a_fresh_slot_while_the_anchor_nll_is_not(
    fp32_bank: AdapterBank, tokenizer: Any
) -> None:
    """At the first step of a fresh slot (B = 0: the adapter is the base) the KL is 0; the anchors' NLL on the
    base's greedy answers is not, and the job's first loss is the same with the term on or off."""
    config = FAST.with_changes(anchor_distill=1.0)
    fp32_bank.init_slot(0, config.slot_config(), seed=0)
    logits, packed, token_rows, kl = _every_row(fp32_bank, tokenizer, config)
    assert abs(float(kl[0])) < 1e-6
    labels = torch.cat([torch.tensor(ids[len(ids) - n :]) for ids, n in packed.rows])
    on_anchor = torch.tensor(packed.anchor)[token_rows]
    nll = torch.nn.functional.cross_entropy(logits[on_anchor], labels[on_anchor])
    assert float(nll) > 0.1

    first = {}
    for weight in (0.0, 5.0):
        fp32_bank.init_slot(0, config.slot_config(), seed=0, replace=True)
        result = train_slots(fp32_bank, tokenizer, [_task()], config.with_changes(anchor_distill=weight))
        first[weight] = result[0].metrics["train_loss_first"]
    assert first[5.0] == pytest.approx(first[0.0], abs=1e-6)


def test_top_k_over_the_whole_vocabulary_is_the_full_kl(fp32_bank: AdapterBank, tokenizer: Any) -> None:
    """With k >= the vocabulary, the top-k KL is KL(base || adapter) computed directly; with a small k it is a
    lower bound (the rest merged into one outcome)."""
    config = FAST.with_changes(anchor_distill=1.0)
    info = fp32_bank.init_slot(0, config.slot_config(), seed=0)
    generator = torch.Generator().manual_seed(0)
    state = {
        k: (v + 0.05 * torch.randn(v.shape, generator=generator)) if k.endswith("lora_B.weight") else v
        for k, v in fp32_bank.slot_state_dict(0).items()
    }
    fp32_bank.load_slot(0, state, info.config, replace=True)
    logits, packed, token_rows, kl = _every_row(fp32_bank, tokenizer, config, top_k=10**6)

    batch = collate(packed.rows, pad_id=pad_token_id(tokenizer))
    with torch.no_grad(), fp32_bank.use(SlotPlan.base_only(len(packed.rows))):
        base, _ = scored_logits(fp32_bank.model, batch, sequences=[ids for ids, _ in packed.rows])
    on_anchor = torch.tensor(packed.anchor)[token_rows]
    log_pb, log_pa = base[on_anchor].log_softmax(-1), logits[on_anchor].log_softmax(-1)
    full = (log_pb.exp() * (log_pb - log_pa)).sum(-1).mean()
    assert float(full) > 1e-3  # the perturbation moved the adapter away from the base
    assert float(kl[0]) == pytest.approx(float(full), abs=1e-5)

    _, _, _, small = _every_row(fp32_bank, tokenizer, config, top_k=4)
    assert 0 <= float(small[0]) <= float(full) + 1e-6


def test_a_zero_weight_leaves_the_objective_as_it_was(
    fp32_bank: AdapterBank, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``anchor_distill`` 0 computes neither the targets nor the term: the job's losses and weights are those of
    a job that cannot compute them."""
    config = FAST.with_changes(max_steps=4)
    fp32_bank.init_slot(0, config.slot_config(), seed=0)
    expected = train_slots(fp32_bank, tokenizer, [_task()], config)[0].metrics
    weights = fp32_bank.slot_state_dict(0)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("anchor distillation ran with weight 0")

    monkeypatch.setattr(trainer, "anchor_distill", refuse)
    monkeypatch.setattr(trainer, "base_targets", refuse)
    fp32_bank.init_slot(0, config.slot_config(), seed=0, replace=True)
    again = train_slots(fp32_bank, tokenizer, [_task()], config)[0].metrics
    assert again == expected
    assert all(torch.equal(v, weights[k]) for k, v in fp32_bank.slot_state_dict(0).items())


def test_a_negative_weight_is_a_validation_error_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="anchor_distill"):
        TrainingConfig(anchor_distill=-1.0)
    with pytest.raises(ValidationError, match="anchor_distill"):
        TrainingConfig(anchor_distill=float("inf"))
    assert TrainingConfig().anchor_distill == 0.0
