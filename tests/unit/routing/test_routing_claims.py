"""Routing claims: the linear probe that tells an adapter's prompts from general ones, and the gate's base side.

A claim (``routing.embeddings.fit_claim``) is fitted on the adapter's training prompts against the shipped general
prompts; the centroid gate with general prompts sends a request to the base when no member claims it, and falls
back to the nearest general prompt when a member has no claim (a version stored before claims).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from routing_helpers import member, user_bank

from lorafleet.errors import ValidationError
from lorafleet.routing import CentroidGate, GateDecision
from lorafleet.routing.embeddings import CLAIM_EVERYTHING_BIAS, claim_logits, fit_claim


def _clusters(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Own prompts and general prompts that share a large common direction and differ along one other (as
    a pretrained model's pooled embeddings do): unit rows in 8-d."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.zeros(8)
    common[0] = 1.0
    own_dir, general_dir = torch.zeros(8), torch.zeros(8)
    own_dir[1], general_dir[1] = 0.3, -0.3
    own = F.normalize(common + own_dir + 0.05 * torch.randn(24, 8, generator=gen), dim=-1)
    general = F.normalize(common + general_dir + 0.05 * torch.randn(60, 8, generator=gen), dim=-1)
    return own, general


def test_a_claim_separates_its_own_prompts_from_general_ones_and_generalises() -> None:
    own, general = _clusters(0)
    claim = fit_claim(own, general)
    assert len(claim) == 8 + 1
    claims = torch.tensor([claim])
    assert bool((claim_logits(claims, own) > 0).all()) and bool((claim_logits(claims, general) <= 0).all())
    unseen_own, unseen_general = _clusters(1)  # new draws of both kinds
    assert (claim_logits(claims, unseen_own) > 0).float().mean() >= 0.9
    assert (claim_logits(claims, unseen_general) <= 0).float().mean() >= 0.9
    assert fit_claim(own, general) == claim  # deterministic


def test_an_adapter_trained_on_general_prompts_claims_every_prompt() -> None:
    """A style preference taught on general questions: its prompts cannot be told from general ones, and its
    user wants it on general questions too."""
    own, general = _clusters(0)
    style = general[::3]  # its training prompts are general prompts
    claim = fit_claim(style, general)
    assert claim == (0.0,) * 8 + (CLAIM_EVERYTHING_BIAS,)
    assert bool((claim_logits(torch.tensor([claim]), torch.cat([own, general])) > 0).all())
    # mixed in with a few of its own, it still cannot be told apart
    assert fit_claim(torch.cat([style, own[:2]]), general) == claim
    # new prompts of the general kind, in more dimensions than prompts: a probe separates the very prompts it was
    # fitted on, but not held-out ones, so separability is judged held out
    gen = torch.Generator().manual_seed(3)
    wide_general = F.normalize(torch.randn(60, 96, generator=gen), dim=-1)
    wide_style = F.normalize(torch.randn(24, 96, generator=gen), dim=-1)  # the same distribution
    assert fit_claim(wide_style, wide_general) == (0.0,) * 96 + (CLAIM_EVERYTHING_BIAS,)
    # (prompts of a kind of their own keep a probe: the first test above)


def test_fit_claim_refuses_mismatched_or_empty_embeddings() -> None:
    own, general = _clusters(0)
    with pytest.raises(ValidationError):
        fit_claim(own[:, :4], general)
    with pytest.raises(ValidationError):
        fit_claim(own[:0], general)
    with pytest.raises(ValidationError):
        fit_claim(own[0], general)


def test_the_gate_sends_what_no_member_claims_to_the_base() -> None:
    # member 0's key is nearer the general prompt than the query, so the nearest-prompt rule would keep the
    # query on the adapter; its claim says the query is general
    general = torch.tensor([[0.0, 1.0, 0.0]])
    key = (1.0, 0.0, 0.0)
    claim_x = (4.0, -4.0, 0.0, -1.0)  # logit 4x - 4y - 1: claims prompts along x, not along y
    query = torch.tensor([[0.8, 0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    without = CentroidGate(general=general).decide(user_bank([member(0, key=key)]), query)
    assert [d.is_base_only for d in without] == [False, True, False]  # the last: a tie, within the margin
    claimed = CentroidGate(general=general).decide(user_bank([member(0, key=key, claim=claim_x)]), query)
    # logits: 0.8*4 - 0.6*4 - 1 = -0.2 (base), 0.6*4 - 0.8*4 - 1 < 0 (base), -1 (base)
    assert [d.is_base_only for d in claimed] == [True, True, True]
    near_x = torch.tensor([[0.95, 0.3, 0.0]])  # 3.8 - 1.2 - 1 > 0: claimed
    assert CentroidGate(general=general).decide(user_bank([member(0, key=key, claim=claim_x)]), near_x)[
        0
    ].routes == ((0, 1.0),)


def test_a_prompt_claimed_by_any_member_stays_with_the_members() -> None:
    general = torch.tensor([[0.0, 0.0, 1.0]])
    members = [
        member(0, key=(1.0, 0.0, 0.0), claim=(4.0, 0.0, 0.0, -2.0)),  # claims x
        member(1, key=(0.0, 1.0, 0.0), claim=(0.0, 4.0, 0.0, -2.0)),  # claims y
    ]
    query = torch.tensor([[0.0, 0.9, 0.43], [0.0, 0.3, 0.95]])
    decisions = CentroidGate(top_k=1, general=general).decide(user_bank(members), query)
    assert decisions[0].routes == ((1, 1.0),)  # claimed by member 1, routed to it
    assert decisions[1] == GateDecision()  # claimed by neither: the base


def test_claims_need_general_prompts_and_a_member_without_one_is_judged_by_the_nearest_general_prompt() -> (
    None
):
    general = torch.tensor([[0.0, 0.0, 1.0]])
    claims_nothing = (0.0, 0.0, 0.0, -1.0)
    query = torch.tensor([[1.0, 0.0, 0.1]])  # near member 0's key, far from the general prompt
    bank = user_bank([member(0, key=(1.0, 0.0, 0.0), claim=claims_nothing)])
    # the base side is off without general prompts: claims change nothing
    assert CentroidGate().decide(bank, query)[0].routes == ((0, 1.0),)
    assert CentroidGate(general=general).decide(bank, query)[0].is_base_only  # the claim says no
    # a member without a claim (stored before claims) holds what is nearer its key than any general prompt
    mixed = user_bank([member(0, key=(1.0, 0.0, 0.0), claim=claims_nothing), member(1, key=(0.0, 1.0, 0.0))])
    near_1 = torch.tensor([[0.1, 1.0, 0.1]])
    assert CentroidGate(top_k=1, general=general).decide(mixed, near_1)[0].routes == ((1, 1.0),)
    assert CentroidGate(general=general).decide(mixed, query)[0].is_base_only  # member 0 disclaims, 1 is far
    # a claim of another hidden size (another backbone) is not used: the nearest general prompt judges
    other = user_bank([member(0, key=(1.0, 0.0, 0.0), claim=(0.0, 0.0, -1.0))])
    assert not CentroidGate(general=general).decide(other, query)[0].is_base_only
