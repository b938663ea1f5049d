"""Deterministic choices QA makes when there is more than it evaluates: bank members and examples.

**Members.** QA evaluates the candidate with at most ``budget`` other members of the user's experts, where
``budget = min(policy.max_bank_members, free bank slots - 2)`` (two slots hold the candidate and the previous
live version). A bank within budget is evaluated whole. A larger bank is *sampled, never skipped*:

1. members the user's gate actually routes the candidate's holdout prompts to come first, by the total gate
   weight they receive (the members that shape what the user is served);
2. the rest of the budget is filled in the order of ``sha256("<seed>/<salt>/<adapter id>")``, with ``salt`` the
   candidate's version id: a retried job samples the same members, and successive versions of one adapter
   rotate through the others, so every member is covered over time.

The gated columns then route over the sampled sub-bank; the report lists the members left out.

**Examples.** An evaluation set larger than ``max_examples_per_set`` keeps the examples that come first in
the order of ``sha256("<seed>/<set name>/<record id>/<prompt>")`` (then back in their original order), so the
same set is scored on every run and every machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from lorafleet.routing.experts import Expert
from lorafleet.training.dataset import Example

T = TypeVar("T")


@dataclass(frozen=True)
class MemberSample:
    """The members QA evaluates, those it left out, and why (budget and gate traffic)."""

    sampled: tuple[Expert, ...]
    left_out: tuple[Expert, ...]
    budget: int
    traffic: dict[int, float]

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "bank_size": len(self.sampled) + len(self.left_out),
            "sampled": [member_label(m) for m in self.sampled],
            "left_out": [member_label(m) for m in self.left_out],
            "traffic": {member_label(m): self.traffic.get(m.adapter_id, 0.0) for m in self.sampled},
            "rule": "gate traffic on the candidate's holdout first, then sha256(seed/version id/adapter id) order",
        }


def member_label(member: Expert) -> str:
    """``personal:<name>`` or ``task:<name>``: unique within a bank (names are unique per owner)."""
    return f"{member.kind}:{member.adapter_name}"


def member_budget(*, max_members: int, free_slots: int) -> int:
    """How many other members fit: the policy's cap, and two slots kept for candidate and previous."""
    return max(0, min(max_members, free_slots - 2))


def sample_members(
    others: Sequence[Expert], *, budget: int, traffic: Mapping[int, float], seed: int, salt: str
) -> MemberSample:
    """The members to evaluate by the rule above (all of them when they fit the budget)."""
    if len(others) <= budget:
        return MemberSample(tuple(others), (), budget, dict(traffic))
    routed = sorted(
        (m for m in others if traffic.get(m.adapter_id, 0.0) > 0), key=lambda m: -traffic[m.adapter_id]
    )
    rest = sorted(
        (m for m in others if traffic.get(m.adapter_id, 0.0) <= 0),
        key=lambda m: _digest(f"{seed}/{salt}/{m.adapter_id}"),
    )
    chosen = {m.adapter_id for m in [*routed, *rest][:budget]}
    sampled = tuple(m for m in others if m.adapter_id in chosen)
    left_out = tuple(m for m in others if m.adapter_id not in chosen)
    return MemberSample(sampled, left_out, budget, dict(traffic))


def sample_enrolled(
    user_ids: Sequence[int], *, with_members: set[int], budget: int, seed: int, salt: str
) -> tuple[list[int], list[int]]:
    """The enrolled users a task candidate is evaluated with: users whose bank holds other live members
    (``with_members``: there is something to degrade) before the others, each group in the order of
    ``sha256("<seed>/<salt>/user/<id>")`` (``salt``: the candidate's version id, so successive versions rotate
    through the users). Returns ``(sampled, left_out)``."""
    ranked = sorted(user_ids, key=lambda u: (u not in with_members, _digest(f"{seed}/{salt}/user/{u}")))
    return ranked[:budget], ranked[budget:]


def cap_examples(examples: Sequence[Example], *, limit: int, seed: int, name: str) -> list[Example]:
    """At most ``limit`` examples, chosen by the rule above and kept in their original order."""
    if len(examples) <= limit:
        return list(examples)
    ranked = sorted(
        range(len(examples)),
        key=lambda i: _digest(f"{seed}/{name}/{examples[i].record_id}/{examples[i].prompt}"),
    )
    return [examples[i] for i in sorted(ranked[:limit])]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


__all__ = [
    "MemberSample",
    "cap_examples",
    "member_budget",
    "member_label",
    "sample_enrolled",
    "sample_members",
]
