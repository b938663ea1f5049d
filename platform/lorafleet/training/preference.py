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


@dataclass(frozen=True)
class JobPairs:
    """One user's preference pairs in a DPO job and their reference log-probs ``[pairs, 2]`` (chosen, rejected),
    computed once for the job."""

    train: Sequence[Example]
    train_reference: torch.Tensor
    holdout: Sequence[Example]
    holdout_reference: torch.Tensor


def reference_pairs(
    bank: AdapterBank,
    tokenizer: Any,
    pairs: Sequence[tuple[Sequence[Example], Sequence[Example]]],
    routes: Sequence[Route],
    *,
    max_seq_len: int,
    prefix: FrozenPrefix | None = None,
) -> list[JobPairs]:
    """Each user's (train, holdout) pairs with their reference log-probs through the user's reference ``routes``:
    one scoring pass for the whole job, before any weight moves."""
    flat = [pair for train, holdout in pairs for pair in (*train, *holdout)]
    flat_routes = [route for (t, h), route in zip(pairs, routes, strict=True) for _ in range(len(t) + len(h))]
    logps = pair_logps(bank, tokenizer, flat, flat_routes, max_seq_len=max_seq_len, prefix=prefix)
    out, start = [], 0
    for train, holdout in pairs:
        mid, end = start + len(train), start + len(train) + len(holdout)
        out.append(JobPairs(train, logps[start:mid], holdout, logps[mid:end]))
        start = end
    return out


def holdout_margins(
    bank: AdapterBank,
    tokenizer: Any,
    jobs: Sequence[JobPairs],
    routes: Sequence[Route],
    *,
    beta: float,
    max_seq_len: int,
    prefix: FrozenPrefix | None = None,
) -> list[torch.Tensor]:
    """Each user's holdout pairs' reward margins ``[pairs]`` through its policy ``routes`` (empty without pairs)."""
    flat = [pair for job in jobs for pair in job.holdout]
    flat_routes = [route for job, route in zip(jobs, routes, strict=True) for _ in job.holdout]
    logps = pair_logps(bank, tokenizer, flat, flat_routes, max_seq_len=max_seq_len, prefix=prefix)
    margins, start = [], 0
    for job in jobs:
        policy = logps[start : start + len(job.holdout)]  # [pairs, 2]
        start += len(job.holdout)
        reference = job.holdout_reference
        margins.append(dpo_terms(*policy.T, *reference.T, beta=beta).margins)
    return margins


def batch_dpo(
    row_logps: torch.Tensor,
    pairs: Sequence[tuple[int, int, int]],
    jobs: Sequence[JobPairs],
    *,
    beta: float,
    n_users: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each user's mean DPO loss over its pairs in a batch ``[users]``, and each pair's reward margin ``[pairs]``.

    ``row_logps`` ``[rows]`` are the batch rows' summed completion log-probs (with gradients); ``pairs`` lists
    ``(user, pair index in its JobPairs.train, chosen row)``, the rejected row following the chosen one.
    """
    device, dtype = row_logps.device, row_logps.dtype
    users = torch.tensor([u for u, _, _ in pairs], device=device)  # [pairs]
    chosen_rows = torch.tensor([row for _, _, row in pairs], device=device)  # [pairs]
    reference = torch.stack([jobs[u].train_reference[i] for u, i, _ in pairs]).to(device, dtype)  # [pairs, 2]
    terms = dpo_terms(
        row_logps[chosen_rows], row_logps[chosen_rows + 1], reference[:, 0], reference[:, 1], beta=beta
    )
    user_sum = terms.losses.new_zeros(n_users).index_add(0, users, terms.losses)  # [users]
    user_pairs = terms.losses.new_zeros(n_users).index_add(0, users, torch.ones_like(terms.losses))
    return user_sum / user_pairs.clamp(min=1), terms.margins.detach()
