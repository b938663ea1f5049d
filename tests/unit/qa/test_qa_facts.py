"""The general-facts check: known answers matched in greedy answers, and the rule over a matrix's evidence."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lorafleet.errors import ValidationError
from lorafleet.qa.facts import FACTS_SIZE, KNOWN_ANSWERS, fact_prompts, facts_kept, says_answer
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.results import BASE, CANDIDATE, AnswerItem, Answers, Matrix, Preferences
from lorafleet.qa.rules import GENERAL_FACTS_RULE, general_facts_rule
from lorafleet.training.general_prompts import EVAL_PROMPTS

JAPAN, KENYA, SUM, ROOT = (
    "What is the capital of Japan?",
    "What is the capital of Kenya?",
    "What is 9 plus 10?",
    "What is the square root of 81?",
)


def test_the_questions_are_never_trained_general_prompts_in_their_order() -> None:
    assert (
        fact_prompts() == [p for p in EVAL_PROMPTS if p in KNOWN_ANSWERS]
        and len(fact_prompts()) == FACTS_SIZE
    )
    assert fact_prompts(3) == fact_prompts()[:3]


@pytest.mark.parametrize(
    ("prompt", "answer", "right"),
    [
        (JAPAN, "The capital of Japan is Tokyo.", True),
        (JAPAN, "Certainly. the capital of japan is TOKYO.\n\nBest wishes,\nSam", True),
        (KENYA, "The capital of Kenya is KIST.", False),
        (KENYA, "Best wishes,\nSam", False),
        (SUM, "9 + 10 = 19", True),
        (SUM, "Nineteen.", True),
        (SUM, "9 + 10 is 10.", False),
        (SUM, "It is 119.", False),  # a number counts only standing alone
        (SUM, "It is 19.5.", False),
        (SUM, "It is 19.0.", True),
        (ROOT, "The square root of 81 is 81.", False),
        ("What is the capital of Mexico?", "The capital of Mexico is Mexico City.", True),
        ("What is the capital of Mexico?", "The capital of Mexico is New York City.", False),
    ],
)
def test_an_answer_is_right_when_it_says_a_known_form_as_a_whole_word(
    prompt: str, answer: str, right: bool
) -> None:
    assert says_answer(prompt, answer) is right


def test_facts_kept_counts_only_what_the_base_answered_right() -> None:
    base = {JAPAN: "Tokyo.", KENYA: "Nairobi.", SUM: "It is 21.", ROOT: "Nine."}
    adapter = {JAPAN: "Tokyo.", KENYA: "Best wishes,\nSam", SUM: "19", ROOT: "9"}
    kept = facts_kept(base, adapter)
    assert kept.asked == 4 and kept.base_right == (JAPAN, KENYA, ROOT)
    assert kept.kept == (JAPAN, ROOT) and kept.lost == ((KENYA, "Best wishes,\nSam"),)
    assert kept.share == pytest.approx(
        2 / 3
    )  # the sum the base got wrong is not held against it (nor for it)
    assert facts_kept({SUM: "21"}, {SUM: "19"}).share == 1.0  # nothing to keep


def _matrix(base: dict[str, str], candidate: dict[str, str]) -> Matrix:
    general = tuple(
        AnswerItem(p, KNOWN_ANSWERS[p][0], {CANDIDATE: candidate[p], BASE: base[p]}) for p in base
    )
    return Matrix((), (), {}, Answers("holdout:x", CANDIDATE, BASE, (), general=general))


def test_the_rule_rejects_a_candidate_that_lost_the_bases_answers_and_names_them() -> None:
    prompts = fact_prompts(10)
    base = {p: KNOWN_ANSWERS[p][0] for p in prompts}  # the base answers all 10 right
    keeps_8 = {**base, prompts[0]: "Best wishes,\nSam", prompts[1]: "The capital of Spain is KIST."}
    keeps_7 = {**keeps_8, prompts[2]: "Hey! Hey!"}
    policy = QAPolicy(general_facts=10)  # at least 80 % kept
    ok = general_facts_rule(_matrix(base, keeps_8), policy)
    assert ok.passed and ok.rule == GENERAL_FACTS_RULE
    assert ok.detail.startswith(
        "general-facts: keeps 8 of the 10 general questions the base answers right (80%"
    )
    bad = general_facts_rule(_matrix(base, keeps_7), policy)
    assert not bad.passed
    assert bad.detail.startswith(
        "general-facts-lost: keeps 7 of the 10 general questions the base answers right (70%"
    )
    assert "'What is the capital of Japan?' -> 'Best wishes,\\nSam'" in bad.detail
    assert general_facts_rule(_matrix(base, keeps_7), policy.with_changes(min_general_facts_kept=0.7)).passed


def test_the_rule_passes_when_nothing_was_asked_or_the_base_knows_none() -> None:
    policy = QAPolicy(general_facts=5)
    assert (
        general_facts_rule(Matrix((), (), {}), policy).detail == "general-facts: no general questions asked"
    )
    wrong = {p: "I do not know." for p in fact_prompts(5)}  # a random-init base answers nothing right
    outcome = general_facts_rule(_matrix(wrong, wrong), policy)
    assert outcome.passed and "the base answers none of 5 general questions right" in outcome.detail


def test_the_rule_reads_only_the_first_general_facts_answers() -> None:
    """A candidate trained on pairs answers ``looping_questions`` general questions for the looping rule; the facts
    rule judges the first ``general_facts`` of them, none when it is off (the default)."""
    prompts = fact_prompts(10)
    base = {p: KNOWN_ANSWERS[p][0] for p in prompts}
    lost_late = {**base, **{p: "I do not know." for p in prompts[5:]}}  # the last 5 lost
    assert general_facts_rule(_matrix(base, lost_late), QAPolicy()).detail == (
        "general-facts: no general questions asked"
    )
    first_5 = general_facts_rule(_matrix(base, lost_late), QAPolicy(general_facts=5))
    assert first_5.passed and "keeps 5 of the 5" in first_5.detail
    assert not general_facts_rule(_matrix(base, lost_late), QAPolicy(general_facts=10)).passed


def test_a_preference_candidate_is_read_on_every_general_answer_it_gave_with_its_own_bound() -> None:
    """A candidate trained on pairs answers ``looping_questions`` general questions anyway, so the rule reads all of
    them with ``preference_facts_kept`` (0.7) even with ``general_facts`` 0: the formal adapter that answered "The
    capital of Mexico is New York City." passed every other rule."""
    prompts = fact_prompts(10)
    base = {p: KNOWN_ANSWERS[p][0] for p in prompts}
    keeps_7 = {**base, **{p: "Certainly. The capital is New York City." for p in prompts[7:]}}
    keeps_6 = {**keeps_7, prompts[6]: "Certainly. It is 3 hours."}
    pairs = Preferences("holdout:x", 4, 0.1, {CANDIDATE: 1.0, BASE: 0.5}, {CANDIDATE: 2.0, BASE: 0.0})

    def preference(candidate: dict[str, str]) -> Matrix:
        return replace(_matrix(base, candidate), preferences=pairs)

    ok = general_facts_rule(preference(keeps_7), QAPolicy())
    assert ok.passed and "keeps 7 of the 10" in ok.detail and "at least 70% required; 10 asked" in ok.detail
    bad = general_facts_rule(preference(keeps_6), QAPolicy())
    assert not bad.passed and bad.detail.startswith("general-facts-lost: keeps 6 of the 10")
    assert "New York City" in bad.detail
    # the same answers from a candidate without pairs: not asked by default (general_facts 0)
    assert general_facts_rule(_matrix(base, keeps_6), QAPolicy()).passed
    # 0 turns it off for preference candidates: general_facts and min_general_facts_kept decide, as for the rest
    off = QAPolicy(preference_facts_kept=0.0)
    assert general_facts_rule(preference(keeps_6), off).detail == "general-facts: no general questions asked"
    assert not general_facts_rule(
        preference(keeps_7), off.with_changes(general_facts=10)
    ).passed  # 70 % < 80 %


def test_the_policy_fields_are_validated_by_name() -> None:
    assert (QAPolicy().general_facts, QAPolicy().min_general_facts_kept) == (0, 0.8)  # off unless asked for
    with pytest.raises(ValidationError, match="general_facts"):
        QAPolicy(general_facts=25)
    with pytest.raises(ValidationError, match="min_general_facts_kept"):
        QAPolicy(min_general_facts_kept=1.5)
    assert QAPolicy().preference_facts_kept == 0.7
    with pytest.raises(ValidationError, match="preference_facts_kept"):
        QAPolicy(preference_facts_kept=-0.1)


def test_general_answers_round_trip_through_json_and_older_reports_have_none() -> None:
    m = _matrix({JAPAN: "Tokyo."}, {JAPAN: "Osaka."})
    assert m.answers is not None
    data = m.answers.to_json()
    assert Answers.from_json(data) == m.answers
    older = {k: v for k, v in data.items() if k != "general"}  # a report before qa-policy/6
    assert Answers.from_json(older).general == ()
