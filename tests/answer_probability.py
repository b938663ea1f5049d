"""What an adapter says first: the probability a slot gives to a set of tokens as an answer's first token (tests of
the trainer's unlikelihood terms)."""

from __future__ import annotations

from typing import Any

import torch

from lorafleet.adapters import AdapterBank, SlotPlan
from lorafleet.training.dataset import Example, encode_examples


def first_answer_probability(
    bank: AdapterBank, tokenizer: Any, examples: list[Example], tokens: torch.Tensor
) -> float:
    """Mean probability slot 0 gives to any of ``tokens`` as the first token of the answers of ``examples``."""
    batch = encode_examples(tokenizer, examples, max_seq_len=64)
    with torch.no_grad(), bank.use(SlotPlan.single([0] * len(examples))):
        logits = bank.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    probs = logits[:, :-1].softmax(-1)[..., tokens].sum(-1)  # [rows, seq - 1]
    answer = batch.labels[:, 1:] != -100  # [rows, seq - 1]: positions that predict an answer token
    first = answer.int().argmax(dim=1)  # [rows]: each row's first such position (rows are left-padded)
    return float(probs[torch.arange(len(examples)), first].mean())
