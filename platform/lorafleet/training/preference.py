"""Preference learning: the DPO sigmoid loss on (prompt, chosen, rejected) pairs, and its reference log-probs.

DPO (Rafailov et al. 2023) trains a policy ``pi`` against a frozen reference ``ref`` so that, for each pair,
the implicit reward ``r(y) = beta * (log pi(y|x) - log ref(y|x))`` of the chosen answer exceeds the rejected one's:
``loss = -log sigmoid(r(chosen) - r(rejected))``. A log-probability is the sum over the completion's tokens
(end-of-turn included), the quantity TRL's ``DPOTrainer`` uses (``tests/unit/training/test_training_preference.py``
checks the two agree).

The reference of a user's job is the slot's own weights before the first step: the parent version a continued
adapter was loaded from, or the base model for a fresh slot (B = 0 adds exactly nothing). The reference never
changes during a job, so the trainer scores every pair once, before training, through the same
bank with :func:`pair_logps` (a routing plan, no second model copy), and keeps the numbers for the whole job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from lorafleet.adapters import AdapterBank
from lorafleet.adapters.prefix import FrozenPrefix
from lorafleet.errors import ValidationError
from lorafleet.training.dataset import Example
from lorafleet.training.metrics import Route, score_examples

#: rows per forward when scoring reference log-probs
REFERENCE_BATCH_ROWS = 64


@dataclass(frozen=True)
class DpoTerms:
    """Per pair: the DPO loss and the chosen / rejected implicit rewards (``beta`` times the log-ratio)."""

    losses: torch.Tensor  # [pairs]
    chosen_rewards: torch.Tensor  # [pairs]
    rejected_rewards: torch.Tensor  # [pairs]

    @property
    def margins(self) -> torch.Tensor:
        """``r(chosen) - r(rejected)`` per pair; > 0 means the pair is ranked as the user ranked it."""
        return self.chosen_rewards - self.rejected_rewards  # [pairs]


def is_pair(example: Example) -> bool:
    """Whether the example is a preference pair (it has a rejected answer)."""
    return example.rejected is not None


def pair_sides(example: Example) -> tuple[Example, Example]:
    """The pair as two plain examples on the same conversation: the chosen answer, then the rejected one."""
    if example.rejected is None:
        raise ValidationError(f"record {example.record_id} is not a preference pair (no rejected answer)")
    chosen = replace(example, rejected=None)
    return chosen, replace(chosen, completion=example.rejected)


def dpo_terms(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
) -> DpoTerms:
    """The sigmoid DPO loss of each pair from summed completion log-probs (all ``[pairs]``)."""
    chosen_rewards = beta * (policy_chosen - reference_chosen)  # [pairs]
    rejected_rewards = beta * (policy_rejected - reference_rejected)  # [pairs]
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)  # [pairs]
    return DpoTerms(losses, chosen_rewards, rejected_rewards)


def pair_logps(
    bank: AdapterBank,
    tokenizer: Any,
    pairs: Sequence[Example],
    routes: Sequence[Route],
    *,
    max_seq_len: int,
    prefix: FrozenPrefix | None = None,
) -> torch.Tensor:
    """``[pairs, 2]``: the summed log-probs of each pair's chosen and rejected answer through its route (an empty
    route: the base), in eval mode without gradients; all pairs' rows in shared batches. Through the reference's
    route these are the reference log-probs; through a trained slot, that policy's."""
    if len(routes) != len(pairs):
        raise ValidationError(f"{len(pairs)} pairs but {len(routes)} routes")
    if not pairs:
        return torch.zeros((0, 2), dtype=torch.float64)
    sides = [side for pair in pairs for side in pair_sides(pair)]
    scores = score_examples(
        bank,
        tokenizer,
        sides,
        [route for route in routes for _ in range(2)],
        max_seq_len=max_seq_len,
        batch_size=REFERENCE_BATCH_ROWS,
        prefix=prefix,
    )
    return -torch.tensor([s.loss_sum for s in scores], dtype=torch.float64).view(len(pairs), 2)


def preference_accuracy(margins: torch.Tensor) -> float:
    """Share of pairs ranked as the user ranked them (margin > 0; a tie counts a half, so a policy equal to its
    reference scores 0.5)."""
    if margins.numel() == 0:
        return float("nan")
    wins = (margins > 0).to(torch.float64).sum() + 0.5 * (margins == 0).to(torch.float64).sum()
    return float(wins / margins.numel())
