"""The promotion rules over hand-made matrices: which rule fails, with which numbers, and NaN handling."""

from __future__ import annotations

import math

from lorafleet.qa.answers import loops
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.results import AnswerItem, Answers, Cell, ColumnInfo, Matrix, Preferences, RowInfo
from lorafleet.qa.rules import (
    ANSWER_RULE,
    FINITE_RULE,
    GATE_VS_BEST_MEMBER,
    GENERAL_FACTS_RULE,
    LOOPING_RULE,
    NO_REGRESSION,
    PREFERENCE_RULE,
    PROBE_RULE,
    TRAINING_ANSWERS_RULE,
    USER_HOLDOUT,
    candidate_rules,
    reasons_for,
    recheck_rules,
)

POLICY = QAPolicy(delta=0.1, epsilon=0.05, epsilon_probe=0.2)
OWN, TASK, PROBE = "holdout:personal:personal", "holdout:task:t", "probe"


def matrix(losses: dict[str, dict[str, float]], *, own_examples: int = 5) -> Matrix:
    """Rows own/task/probe; columns in the order first seen; kinds from the names."""
    columns: list[str] = []
    for row in losses.values():
        columns += [c for c in row if c not in columns]
    kinds = {"base": "base", "previous": "previous", "candidate": "candidate"}
    infos = tuple(
        ColumnInfo(c, kinds.get(c, c.split(":")[0] if not c.startswith("gated") else c.replace(":", "-")))  # type: ignore[arg-type]
        for c in columns
    )
    rows = (
        RowInfo(OWN, "user-holdout", own_examples, own_examples, 1, True),
        RowInfo(TASK, "task-holdout", 4, 4, 2),
        RowInfo(PROBE, "probe", 8, 8),
    )
    cells = {r: {c: Cell(v, 0.5, 10, 5) for c, v in cols.items()} for r, cols in losses.items()}
    # the candidate answers every own-holdout example right, the previous live version none (answer evidence)
    reference = "previous" if "previous" in columns else "base"
    items = tuple(
        AnswerItem(f"q{i}", f"v{i}", {"candidate": f"v{i}", reference: ""}) for i in range(own_examples)
    )
    return Matrix(rows, infos, cells, Answers(OWN, "candidate", reference, items))


def good() -> dict[str, dict[str, float]]:
    return {
        OWN: {
            "base": 5.0,
            "previous": 4.0,
            "candidate": 3.8,
            "gated:previous": 4.0,
            "gated:candidate": 3.8,
            "alone:task:t": 5.0,
            "pair:task:t": 4.2,
        },
        TASK: {
            "base": 5.0,
            "previous": 5.0,
            "candidate": 5.0,
            "gated:previous": 3.0,
            "gated:candidate": 3.02,
            "alone:task:t": 3.0,
            "pair:task:t": 4.0,
        },
        PROBE: {
            "base": 5.0,
            "previous": 5.05,
            "candidate": 5.1,
            "gated:previous": 5.05,
            "gated:candidate": 5.1,
            "alone:task:t": 5.0,
            "pair:task:t": 5.0,
        },
    }


def outcome(m: Matrix, rule: str, recheck: bool = False) -> tuple[bool, str]:
    found = next(o for o in (recheck_rules if recheck else candidate_rules)(m, POLICY) if o.rule == rule)
    return found.passed, found.detail


def test_a_good_candidate_passes_every_rule_and_the_reasons_say_why() -> None:
    outcomes = candidate_rules(matrix(good()), POLICY)
    assert [o.rule for o in outcomes] == [
        USER_HOLDOUT,
        ANSWER_RULE,
        TRAINING_ANSWERS_RULE,
        GENERAL_FACTS_RULE,
        NO_REGRESSION,
        GATE_VS_BEST_MEMBER,
        PROBE_RULE,
        FINITE_RULE,
    ]
    passed, reasons = reasons_for(outcomes)
    assert passed and reasons[0] == (
        "user-holdout: candidate 3.8000 beats previous live 4.0000 by delta 0.1 (needs <= 3.9000)"
    )


def test_user_holdout_needs_delta_improvement_or_no_previous_version() -> None:
    losses = good()
    losses[OWN]["candidate"] = 3.95  # better, but not by delta
    passed, detail = outcome(matrix(losses), USER_HOLDOUT)
    assert not passed and "does not beat previous live 4.0000" in detail
    without_previous = {r: {c: v for c, v in cols.items() if c != "previous"} for r, cols in good().items()}
    passed, detail = outcome(matrix(without_previous), USER_HOLDOUT)
    assert passed and detail.startswith("user-holdout: no previous live version")
    passed, detail = outcome(matrix(good(), own_examples=0), USER_HOLDOUT)
    assert not passed and "no holdout examples" in detail


def test_no_regression_names_each_set_that_got_worse_than_the_previous_configuration() -> None:
    losses = good()
    losses[TASK]["gated:candidate"] = 3.1  # 0.1 worse than gated:previous > epsilon
    passed, detail = outcome(matrix(losses), NO_REGRESSION)
    assert not passed and "holdout:task:t 3.0000 -> 3.1000" in detail and OWN not in detail


def test_the_gated_bank_must_stay_within_epsilon_of_its_best_single_member() -> None:
    losses = good()
    losses[OWN]["gated:candidate"] = 3.9  # candidate alone is 3.8
    passed, detail = outcome(matrix(losses), GATE_VS_BEST_MEMBER, recheck=True)
    assert not passed and f"{OWN} gated 3.9000 vs candidate 3.8000" in detail
    losses = good()
    losses[TASK]["gated:candidate"] = 3.2  # the task adapter alone is 3.0
    passed, detail = outcome(matrix(losses), GATE_VS_BEST_MEMBER)
    assert not passed and "vs alone:task:t 3.0000" in detail


def test_the_probe_may_move_less_than_epsilon_probe_either_way() -> None:
    for value, ok in ((5.19, True), (5.21, False), (4.79, False)):
        losses = good()
        losses[PROBE]["candidate"] = value
        assert outcome(matrix(losses), PROBE_RULE)[0] is ok, value


def test_a_one_sided_probe_only_counts_moves_for_the_worse() -> None:
    one_sided = POLICY.with_changes(probe_one_sided=True)
    for value, ok in ((4.0, True), (5.19, True), (5.21, False)):
        losses = good()
        losses[PROBE]["candidate"] = value
        (found,) = [o for o in candidate_rules(matrix(losses), one_sided) if o.rule == PROBE_RULE]
        assert found.passed is ok, value
    assert found.detail.endswith(
        "candidate 5.2100 (moved +0.2100), gated:candidate 5.1000 (moved +0.1000): "
        "not within epsilon_probe +0.2"
    )


def test_a_nan_loss_fails_the_rules_that_read_it() -> None:
    losses = good()
    losses[OWN]["candidate"] = math.nan
    losses[OWN]["gated:candidate"] = math.nan
    losses[PROBE]["candidate"] = math.nan
    failed = {o.rule for o in candidate_rules(matrix(losses), POLICY) if not o.passed}
    assert failed == {USER_HOLDOUT, NO_REGRESSION, GATE_VS_BEST_MEMBER, PROBE_RULE, FINITE_RULE}
    passed, reasons = reasons_for(candidate_rules(matrix(losses), POLICY))
    assert not passed and len(reasons) == 5


def test_recheck_rules_ignore_the_comparison_with_a_previous_version() -> None:
    assert [o.rule for o in recheck_rules(matrix(good()), POLICY)] == [
        GATE_VS_BEST_MEMBER,
        PROBE_RULE,
        FINITE_RULE,
    ]


def with_preferences(accuracy: dict[str, float], *, pairs: int = 4) -> Matrix:
    margins = {column: 2.0 * value - 1.0 for column, value in accuracy.items()}
    found = matrix(good())
    return Matrix.from_json(
        {**found.to_json(), "preferences": Preferences(OWN, pairs, 0.1, accuracy, margins).to_json()}
    )


def test_the_preference_rule_needs_more_held_out_pairs_ranked_right_than_the_live_version() -> None:
    assert PREFERENCE_RULE not in [
        o.rule for o in candidate_rules(matrix(good()), POLICY)
    ]  # no pairs: not run
    cases = [
        ({"base": 0.5, "previous": 0.5, "candidate": 0.75}, True),
        ({"base": 0.5, "previous": 0.75, "candidate": 0.75}, False),
        ({"base": 0.5, "previous": 1.0, "candidate": 1.0}, True),  # nothing left to improve
        ({"base": 0.5, "candidate": 0.5}, False),  # no live version: against the base's 50 %
        ({"base": 0.5, "candidate": math.nan}, False),
    ]
    for accuracy, ok in cases:
        outcomes = candidate_rules(with_preferences(accuracy), POLICY)
        (found,) = [o for o in outcomes if o.rule == PREFERENCE_RULE]
        assert found.passed is ok, accuracy
    assert found.detail == (
        "preference-accuracy: nan% of 4 held-out pairs ranked right vs 50.0% for the base "
        "(mean reward margin nan vs 0.000): no improvement"
    )
    passed, reasons = reasons_for(candidate_rules(with_preferences(cases[0][0]), POLICY))
    assert passed and reasons[4] == (
        "preference-accuracy: 75.0% of 4 held-out pairs ranked right vs 50.0% for the previous "
        "(mean reward margin 0.500 vs 0.000)"
    )
    decoded = with_preferences(cases[4][0])
    assert Matrix.from_json(decoded.to_json()).to_json() == decoded.to_json()  # NaN stored as null and back


def test_a_preference_candidates_probe_is_read_on_the_answers_body() -> None:
    """A sign-off moves the probe's end-of-turn tokens (the whole answers' loss passes epsilon), not the body: a
    candidate trained on pairs is read on the body, one without pairs on the whole answers, and a report written
    before the body loss was recorded on the whole answers too."""

    def with_probe(whole: float, body: float, *, pairs: bool) -> Matrix:
        found = (
            with_preferences({"base": 0.5, "previous": 0.5, "candidate": 0.75}) if pairs else matrix(good())
        )
        probe = {
            **found.cells[PROBE],
            "base": Cell(5.0, 0.5, 10, 5, body_loss=4.0),
            "gated:candidate": Cell(whole, 0.5, 10, 5, body_loss=body),
            "candidate": Cell(whole, 0.5, 10, 5, body_loss=body),
        }
        return Matrix(
            found.rows, found.columns, {**found.cells, PROBE: probe}, found.answers, found.preferences
        )

    passed, detail = outcome(with_probe(5.6, 4.1, pairs=True), PROBE_RULE)
    assert passed and detail.startswith("probe (answer body: ") and "base 4.0000" in detail, detail
    assert not outcome(with_probe(5.6, 4.3, pairs=True), PROBE_RULE)[0]  # the body moved 0.3 > 0.2
    passed, detail = outcome(with_probe(5.6, 4.1, pairs=False), PROBE_RULE)
    assert not passed and detail.startswith("probe: base 5.0000"), detail
    stored = with_probe(5.6, 4.1, pairs=True).to_json()
    for cell in stored["cells"][PROBE].values():
        cell.pop("body_loss")
    passed, detail = outcome(Matrix.from_json(stored), PROBE_RULE)
    assert not passed and detail.startswith("probe: base 5.0000"), detail


def test_a_preference_candidate_may_not_loop_on_more_answers_than_the_reference() -> None:
    """``looping-answers``: a candidate trained on pairs whose greedy answers loop more often than the reference's
    by more than ``max_looping_increase`` is rejected with ``answers-loop``; one without pairs is not read."""
    loop = "It is often referred to as the City of the City of the City of the City of"
    assert loops(loop) and not loops("The capital of Japan is Tokyo. Tokyo is large; Tokyo is old.")

    def answered(candidate: list[str], reference: list[str], *, pairs: bool = True) -> Matrix:
        found = (
            with_preferences({"base": 0.5, "previous": 0.5, "candidate": 0.75}) if pairs else matrix(good())
        )
        items = tuple(
            AnswerItem(f"q{i}", f"v{i}", {"candidate": c, "previous": r})
            for i, (c, r) in enumerate(zip(candidate, reference, strict=True))
        )
        evidence = Answers(OWN, "candidate", "previous", items)
        return Matrix(found.rows, found.columns, found.cells, evidence, found.preferences)

    fine = ["Short and right."] * 10
    passed, detail = outcome(answered([loop] + fine[1:], fine), LOOPING_RULE)  # +10 %: at the bound
    assert passed and detail == (
        "looping-answers: 1 of 10 answers loop against 0 of the reference's (+10%, at most +10% allowed)"
    )
    passed, detail = outcome(answered([loop, loop] + fine[2:], fine), LOOPING_RULE)
    assert not passed and detail.startswith("answers-loop: 2 of 10 answers loop against 0"), detail
    assert "'It is often referred to as the City of the City" in detail
    # the reference loops as often: nothing got worse
    assert outcome(answered([loop, loop] + fine[2:], [loop, loop] + fine[2:]), LOOPING_RULE)[0]
    unread = candidate_rules(answered([loop] * 10, fine, pairs=False), POLICY)
    assert LOOPING_RULE not in [o.rule for o in unread]
