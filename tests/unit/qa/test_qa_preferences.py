"""The preference rule's evidence: held-out preference pairs scored through the QA matrix on the real tiny backbone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.torch_threads import one_torch_thread

from lorafleet.adapters import AdapterBank
from lorafleet.backbone import Backbone
from lorafleet.qa.evalsets import EvalSet
from lorafleet.qa.facts import fact_prompts
from lorafleet.qa.matrix import ColumnSpec, evaluate_matrix
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.results import AnswerItem, ColumnInfo, Matrix
from lorafleet.qa.rules import LOOPING_RULE, PREFERENCE_RULE, candidate_rules, preference_rule
from lorafleet.training.config import TrainingConfig
from lorafleet.training.dataset import Example
from lorafleet.training.trainer import SlotTraining, train_slots

CONFIG = TrainingConfig(
    rank=4,
    alpha=8,
    dropout=0.0,
    learning_rate=5e-3,
    max_steps=10,
    pairs_per_step=4,
    max_seq_len=64,
    target_modules=["q_proj", "v_proj"],
    dpo_weight=1.0,
    dpo_beta=0.5,
)
COLUMNS = [
    ColumnSpec(ColumnInfo("base", "base")),
    ColumnSpec(ColumnInfo("previous", "previous"), routes=(("previous", 1.0),)),
    ColumnSpec(ColumnInfo("candidate", "candidate"), routes=(("candidate", 1.0),)),
]


def pairs(start: int, n: int) -> list[Example]:
    return [
        Example(i, f"Request {i}: help with item {i}?", f"Sure, item {i}.", "preference", f"Nope, item {i}.")
        for i in range(start, start + n)
    ]


def answered(
    backbone: Backbone, bank: AdapterBank, own: EvalSet, policy: QAPolicy, beta: float | None
) -> Matrix:
    """The matrix of ``own`` with the candidate (slot 1) answering against the previous version (slot 0)."""
    return evaluate_matrix(
        backbone=backbone,
        bank=bank,
        sets=[own],
        columns=COLUMNS,
        slots={"previous": 0, "candidate": 1},
        policy=policy,
        answers=("candidate", "previous"),
        preference_beta=beta,
    )


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One torch thread: the tiny model gains nothing from two, and on shared cores a second one spin-waits."""
    with one_torch_thread():
        yield


@pytest.fixture
def bank(tiny_parts: tuple[Backbone, AdapterBank]) -> Iterator[AdapterBank]:
    _, bank = tiny_parts
    try:
        yield bank
    finally:
        for slot in list(bank.occupied()):
            bank.evict_slot(slot)


def test_held_out_pairs_are_scored_per_column_and_the_rule_reads_them(
    tiny_parts: tuple[Backbone, AdapterBank], bank: AdapterBank
) -> None:
    backbone = tiny_parts[0]
    bank.init_slot(0, CONFIG.slot_config(), seed=0)  # previous: a fresh adapter, the base's rankings
    bank.init_slot(1, CONFIG.slot_config(), seed=1)
    train_slots(bank, backbone.tokenizer, [SlotTraining(1, "u", pairs(0, 12), ())], CONFIG)
    sft = [Example(99, "Q: pet?", "cat", "sft")]
    own = EvalSet("holdout:u", "user-holdout", (*pairs(100, 4), *sft), 5, own=True)

    def run(slots: dict[str, int], beta: float | None) -> object:
        return evaluate_matrix(
            backbone=backbone,
            bank=bank,
            sets=[own],
            columns=COLUMNS,
            slots=slots,
            policy=QAPolicy(samples_per_cell=0),
            preference_beta=beta,
        )

    matrix = run({"previous": 0, "candidate": 1}, 0.5)
    prefs = matrix.preferences
    assert prefs is not None and (prefs.row, prefs.pairs, prefs.beta) == ("holdout:u", 4, 0.5)
    assert prefs.accuracy["base"] == 0.5 and prefs.accuracy["previous"] == 0.5  # a fresh slot is the base
    assert prefs.accuracy["candidate"] == 1.0 and prefs.margin["candidate"] > 0.5
    assert preference_rule(matrix).passed
    swapped = run({"previous": 1, "candidate": 0}, 0.5)  # the trained adapter as the live version
    outcome = preference_rule(swapped)
    assert (outcome.rule, outcome.passed) == (PREFERENCE_RULE, False)
    assert run({"previous": 0, "candidate": 1}, None).preferences is None  # not trained with DPO: no evidence


def test_a_preference_candidate_answers_general_questions_for_the_looping_rule(
    tiny_parts: tuple[Backbone, AdapterBank], bank: AdapterBank
) -> None:
    """With ``preference_beta`` the candidate and the base also answer ``looping_questions`` general questions (the
    looping rule's evidence beyond a handful of held-out pairs); without it, only ``general_facts`` of them."""
    backbone = tiny_parts[0]
    bank.init_slot(0, CONFIG.slot_config(), seed=0)
    bank.init_slot(1, CONFIG.slot_config(), seed=1)
    own = EvalSet("holdout:u", "user-holdout", tuple(pairs(100, 2)), 2, own=True)

    def run(beta: float | None, policy: QAPolicy) -> Matrix:
        return answered(backbone, bank, own, policy, beta)

    policy = QAPolicy(samples_per_cell=0, looping_questions=3, answer_max_new_tokens=4)
    found = run(0.5, policy)
    assert found.answers is not None
    assert [item.prompt for item in found.answers.general] == fact_prompts(3)
    assert all(set(item.outputs) == {"candidate", "base"} for item in found.answers.general)
    (looping,) = [o for o in candidate_rules(found, policy) if o.rule == LOOPING_RULE]
    assert looping.detail.startswith("looping-answers: ") and "of 5 answers loop" in looping.detail
    plain = run(None, policy)
    assert plain.answers is not None and plain.answers.general == ()
    facts_only = run(None, policy.with_changes(general_facts=2)).answers
    assert facts_only is not None and [i.prompt for i in facts_only.general] == fact_prompts(2)


def test_a_held_out_pair_is_answered_to_its_longer_side_and_keeps_its_rejected_answer(
    tiny_parts: tuple[Backbone, AdapterBank], bank: AdapterBank
) -> None:
    """A pair's answer may run to the longer of its two sides (styles often differ at the end: a sign-off, a
    length), up to ``pair_answer_max_new_tokens``; the item keeps the rejected answer for the answers rule."""
    backbone = tiny_parts[0]
    bank.init_slot(0, CONFIG.slot_config(), seed=0)
    bank.init_slot(1, CONFIG.slot_config(), seed=1)
    detailed = " ".join(f"detail {i}," for i in range(12))
    pair = Example(1, "Tell me about item 1?", "Item 1.", "preference", f"Item 1. {detailed}")
    sft = Example(2, "Q: pet?", "cat", "sft")
    own = EvalSet("holdout:u", "user-holdout", (pair, sft), 2, own=True)

    def answers(pair_cap: int) -> tuple[AnswerItem, ...]:
        policy = QAPolicy(
            samples_per_cell=0,
            answer_extra_tokens=0,
            answer_max_new_tokens=4,
            pair_answer_max_new_tokens=pair_cap,
        )
        matrix = answered(backbone, bank, own, policy, 0.5)
        assert matrix.answers is not None
        return matrix.answers.items

    short_pair, short_sft = answers(4)
    long_pair, long_sft = answers(12)
    assert (long_pair.rejected, long_sft.rejected) == (pair.rejected, None)
    # greedy: the longer budget extends the pair's answers (the random-init model rarely ends its turn) and
    # leaves the other example's, whose target is one token, as they were
    for column in ("candidate", "previous"):
        assert long_pair.outputs[column].startswith(short_pair.outputs[column])
        assert len(long_pair.outputs[column]) > len(short_pair.outputs[column])
        assert long_sft.outputs[column] == short_sft.outputs[column]
