"""Routing claims on the real SmolLM2: a user's claim, fitted on their training prompts against the shipped general
prompts, keeps their unseen paraphrases and leaves general prompts it never saw to the base, where the nearest
general prompt (the rule before claims) lets more of them through. The gate maths is in the unit tier
(tests/unit/routing/test_routing_claims.py); the measured figures in tests/benchmarks/README.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafleet.adapters import inject_bank
from lorafleet.backbone import Backbone, load_backbone
from lorafleet.routing import CentroidGate, ExpertSet, GateSpec
from lorafleet.routing.embeddings import embed_prompts, routing_key_and_claim
from lorafleet.routing.experts import Expert
from lorafleet.training.general_prompts import EVAL_PROMPTS, general_exemplars
from lorafleet.training.personal_facts import make_users, split_questions, user_examples

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def smollm2_nf4(smollm2_data_dir: Path) -> Backbone:
    return load_backbone("builtin:smollm2-135m", quantization="nf4", device="cpu", data_dir=smollm2_data_dir)


def _to_base(gate: CentroidGate, embeddings: torch.Tensor, member: Expert) -> int:
    """How many of the prompts the gate serves with the base, over a bank of the one member."""
    revision = f"{member.adapter_name}/{member.routing_claim is None}"  # the gate caches keys by revision
    bank = ExpertSet(1, 1, member.adapter_name, (member,), GateSpec(), revision)
    return sum(d.is_base_only for d in gate.decide(bank, embeddings))


def test_a_claim_keeps_a_users_questions_and_sends_general_ones_to_the_base(smollm2_nf4: Backbone) -> None:
    bank = inject_bank(smollm2_nf4, n_slots=1, max_rank=4)
    general = general_exemplars(smollm2_nf4, bank)
    asked_general = embed_prompts(smollm2_nf4, bank, list(EVAL_PROMPTS))  # never used to fit anything
    gate = CentroidGate(general=general)
    kept = based = nearest_based = total_own = 0
    for user in make_users(2, seed=0):
        train = [e.prompt for e in user_examples(user, rounds=[1], split="train", seed=0)]
        key, claim = routing_key_and_claim(smollm2_nf4, bank, train, general=general)
        unseen = [q for f in user.facts_of([1]) for q in split_questions(f.kind, seed=0)[1]]
        asked_own = embed_prompts(smollm2_nf4, bank, unseen)

        with_claim = Expert(1, user.key, "personal", 1, 1, "x", 0, 8, key, claim)
        without = Expert(1, user.key, "personal", 1, 1, "x", 0, 8, key, None)
        kept += len(unseen) - _to_base(gate, asked_own, with_claim)
        total_own += len(unseen)
        based += _to_base(gate, asked_general, with_claim)
        nearest_based += _to_base(gate, asked_general, without)
    n_general = 2 * len(EVAL_PROMPTS)
    # measured on this machine: 48/48 kept; 124/126 general prompts to the base, 116/126 by the nearest prompt
    assert kept >= 0.9 * total_own, (kept, total_own)
    assert based >= 0.95 * n_general, (based, n_general)
    assert based > nearest_based, (based, nearest_based)
