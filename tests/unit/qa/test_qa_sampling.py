"""The sampling rules: bank members (gate traffic first, then a seeded hash order) and capped example sets."""

from __future__ import annotations

from lorafleet.qa.sampling import cap_examples, member_budget, member_label, sample_members
from lorafleet.routing.experts import Expert
from lorafleet.training.dataset import Example


def member(i: int, kind: str = "task") -> Expert:
    return Expert(i, f"m{i}", kind, 100 + i, 1, f"{i:064x}", 1, 4, None)  # type: ignore[arg-type]


OTHERS = [member(i) for i in range(1, 9)]


def test_a_bank_within_budget_is_evaluated_whole() -> None:
    sample = sample_members(OTHERS[:3], budget=3, traffic={}, seed=0, salt="7")
    assert sample.sampled == tuple(OTHERS[:3]) and sample.left_out == ()
    assert sample.to_json()["bank_size"] == 3


def test_members_the_gate_routes_to_come_first_then_a_seeded_hash_order() -> None:
    traffic = {5: 2.5, 8: 0.5}
    sample = sample_members(OTHERS, budget=4, traffic=traffic, seed=0, salt="7")
    chosen = {m.adapter_id for m in sample.sampled}
    assert {5, 8} <= chosen and len(chosen) == 4 and len(sample.left_out) == 4
    assert sample == sample_members(OTHERS, budget=4, traffic=traffic, seed=0, salt="7")  # a retry: same
    assert [m.adapter_id for m in sample.sampled] == sorted(chosen)  # kept in bank order
    tops = sample_members(OTHERS, budget=1, traffic=traffic, seed=0, salt="7")
    assert [m.adapter_id for m in tops.sampled] == [5]
    data = sample.to_json()
    assert data["traffic"]["task:m5"] == 2.5 and len(data["left_out"]) == 4 and "sha256" in data["rule"]


def test_successive_versions_rotate_through_the_members_left_out() -> None:
    covered: set[int] = set()
    for salt in range(12):
        covered |= {
            m.adapter_id for m in sample_members(OTHERS, budget=2, traffic={}, seed=0, salt=str(salt)).sampled
        }
    assert covered == {m.adapter_id for m in OTHERS}


def test_budget_keeps_two_slots_and_labels_are_unique_by_kind() -> None:
    assert member_budget(max_members=6, free_slots=8) == 6
    assert member_budget(max_members=6, free_slots=4) == 2
    assert member_budget(max_members=6, free_slots=1) == 0
    assert member_label(member(1, "personal")) != member_label(member(1, "task"))


def test_capped_sets_are_deterministic_and_keep_their_order() -> None:
    examples = [Example(i, f"prompt {i}", "x", "sft") for i in range(100)]
    kept = cap_examples(examples, limit=10, seed=0, name="holdout:a")
    assert len(kept) == 10 and kept == sorted(kept, key=lambda e: e.record_id)
    assert kept == cap_examples(examples, limit=10, seed=0, name="holdout:a")
    assert kept != cap_examples(examples, limit=10, seed=1, name="holdout:a")
    assert cap_examples(examples[:5], limit=10, seed=0, name="x") == examples[:5]
