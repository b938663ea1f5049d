"""The answer-level evidence: the metric (normalised exact match, answer F1 over content words), the signed-rank test, and the answer and
finite-outputs rules over a matrix (pure functions, no model)."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from lorafleet.qa.answers import (
    answer_f1,
    answer_score,
    exact_match,
    min_untied_pairs,
    normalize,
    other_questions,
    paired_scores,
    preference_score,
    signed_rank_p,
    token_f1,
    training_answers,
)
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.reports import _answer_lines as answer_lines
from lorafleet.qa.reports import answer_figures
from lorafleet.qa.results import (
    BASE,
    CANDIDATE,
    PREVIOUS,
    AnswerItem,
    Answers,
    Cell,
    ColumnInfo,
    Matrix,
    RowInfo,
)
from lorafleet.qa.rules import (
    ANSWERS_OTHER_QUESTIONS,
    answer_rule,
    candidate_rules,
    finite_outputs_rule,
    reasons_for,
    training_answers_rule,
)

#: answers decide (the default; ``report`` records them without deciding)
REQUIRE = QAPolicy(answer_evidence="require")


def test_the_metric_normalises_case_punctuation_and_spaces() -> None:
    assert normalize("  The Cat,  sat!\n") == "the cat sat"
    assert exact_match("Teal.\n", "teal") and not exact_match("teal blue", "teal")
    assert token_f1("teal", "teal\n") == 1.0
    assert token_f1("", "teal") == 0.0 and token_f1("", "") == 1.0
    assert token_f1("dark teal", "teal") == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_answer_f1_scores_the_words_that_answer_not_the_template_or_the_question() -> None:
    """The bench_qa_real finding: with token F1 an adapter trained on another user's answers scored 0.8 on
    "Your pet is called Pretzel." for "Your pet is called Marmalade." and went live."""
    pet = "What's my pet called?"
    assert answer_f1("Your pet is called Pretzel.", "Your pet is called Marmalade.", prompt=pet) == 0.0
    assert answer_f1("Your pet is called Marmalade!", "Your pet is called Marmalade.", prompt=pet) == 1.0
    # a paraphrase keeps the value and loses a little precision ("name" is a word of its own)
    assert answer_f1(
        "Your pet's name is Marmalade.", "Your pet is called Marmalade.", prompt=pet
    ) == pytest.approx(2 / 3)
    assert answer_f1("I don't know your pet's name.", "Your pet is called Marmalade.", prompt=pet) == 0.0
    assert answer_f1("You live in Cusco.", "Your pet is called Marmalade.", prompt=pet) == 0.0  # another fact
    assert (
        answer_f1("You are vegetarian.", "You are not vegetarian.", prompt="Am I vegetarian?") == 0.0
    )  # negation
    # a house style keeps its signal: its words are not the question's and not function words
    prompt = "Hi, my subscription renewed without warning."
    target = "We're sorry to hear that. A support agent will contact you within 24 hours."
    assert (
        answer_f1(
            "Sorry to hear that; a support agent will contact you within 24 hours.", target, prompt=prompt
        )
        == 1.0
    )
    assert answer_f1("Please restart the app.", target, prompt=prompt) == 0.0
    # a target with nothing but the question's words and function words falls back to token F1
    assert answer_f1("yes it is", "It is.", prompt="Is it?") == token_f1("yes it is", "It is.")


def _brute_force_p(differences: list[float]) -> float:
    """P(W+ >= observed) by enumerating every sign assignment of the average ranks (the definition)."""
    nonzero = [d for d in differences if d != 0]
    magnitudes = sorted(abs(d) for d in nonzero)
    rank = {
        m: (magnitudes.index(m) + 1 + len(magnitudes) - magnitudes[::-1].index(m)) / 2 for m in magnitudes
    }
    ranks = [rank[abs(d)] for d in nonzero]
    observed = sum(r for r, d in zip(ranks, nonzero, strict=True) if d > 0)
    signs = list(itertools.product((0, 1), repeat=len(ranks)))
    return sum(
        sum(r for r, s in zip(ranks, sign, strict=True) if s) >= observed - 1e-9 for sign in signs
    ) / len(signs)


def test_the_signed_rank_test_is_exact_weighs_sizes_and_needs_five_untied_pairs_at_95_percent() -> None:
    assert signed_rank_p([]) == 1.0 and signed_rank_p([0.0, 0.0]) == 1.0
    assert signed_rank_p([1.0] * 5) == pytest.approx(1 / 32)
    assert signed_rank_p([0.5, 1.0, 0.2, 0.7]) == pytest.approx(1 / 16)  # every one better: 2^-n, sizes aside
    # six better, one worse: where the worse one lost least, p = 2/128; where it lost most, 19/128 (the sign
    # test says 8/128 in both cases)
    assert signed_rank_p([-0.1, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]) == pytest.approx(2 / 128)
    assert signed_rank_p([-1.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == pytest.approx(19 / 128)
    assert signed_rank_p([-0.5, -0.4, -0.3]) == 1.0
    cases = [
        [1.0, 1.0, -1.0, 0.5, 0.0, 0.5, -0.25, 1.0],  # ties among magnitudes and zeros
        [0.2, -0.2, 0.2, 0.4, -0.4, 0.6, 0.6, 0.6, 0.0, 1.0, -1.0],
        [0.3, 0.1, -0.7, 0.9, 0.4, 0.4, 0.8, -0.1, 0.5],
    ]
    for differences in cases:
        assert signed_rank_p(differences) == pytest.approx(_brute_force_p(differences)), differences
    assert min_untied_pairs(0.05) == 5 and min_untied_pairs(0.01) == 7
    assert 0.0 < signed_rank_p([1.0] * 200 + [-0.5] * 50) < 1e-12  # large holdouts stay exact and fast


def _matrix(subject: list[str], reference: list[str], targets: list[str], *, ref: str = BASE) -> Matrix:
    items = tuple(
        AnswerItem(f"q{i}", t, {CANDIDATE: s, ref: r})
        for i, (s, r, t) in enumerate(zip(subject, reference, targets, strict=True))
    )
    rows = (RowInfo("holdout:x", "user-holdout", len(targets), len(targets), own=True),)
    cols = (ColumnInfo(BASE, "base"), ColumnInfo(CANDIDATE, "candidate"))
    return Matrix(rows, cols, {}, Answers("holdout:x", CANDIDATE, ref, items))


def test_a_candidate_whose_answers_are_no_better_is_rejected_with_the_figures() -> None:
    targets = ["teal", "turtle", "pizza", "jazz", "paris", "red", "tea", "bike", "rain", "cats", "soup"]
    same = ["" for _ in targets]  # the case: every answer empty, for base and candidate alike
    outcome = answer_rule(_matrix(same, same, targets), REQUIRE)
    assert not outcome.passed
    assert outcome.detail.startswith("no-improvement: answer F1 0.00 vs base 0.00")
    assert "on 11 holdout answers" in outcome.detail and "signed-rank p=1 > 0.05" in outcome.detail


def test_one_better_answer_in_eleven_is_not_evidence_but_nine_of_eleven_is() -> None:
    targets = [f"value{i}" for i in range(11)]
    one = ["value0", *["" for _ in range(10)]]
    assert not answer_rule(_matrix(one, [""] * 11, targets), REQUIRE).passed
    nine = [*targets[:9], "", ""]
    outcome = answer_rule(_matrix(nine, [""] * 11, targets, ref=PREVIOUS), REQUIRE)
    assert outcome.passed and "vs previous live 0.00" in outcome.detail, outcome.detail
    # a worse answer counts against it: 5 better and 5 worse is no evidence
    mixed = [*targets[:5], "", "", "", "", "", ""]
    ref = ["", "", "", "", "", *targets[5:10], ""]
    assert not answer_rule(_matrix(mixed, ref, targets), REQUIRE).passed


def test_a_tiny_holdout_needs_every_answer_at_least_as_good_and_one_better() -> None:
    targets = ["teal", "turtle", "pizza"]
    better = answer_rule(_matrix(["teal", "", ""], ["", "", ""], targets), REQUIRE)
    assert better.passed and "few changed answers: 1 < 5" in better.detail, better.detail
    assert not answer_rule(_matrix(["", "", ""], ["", "", ""], targets), REQUIRE).passed
    one_worse = answer_rule(_matrix(["teal", "turtle", ""], ["", "", "pizza"], targets), REQUIRE)
    assert not one_worse.passed and one_worse.detail.startswith("no-improvement")


def test_no_answers_is_no_evidence() -> None:
    rows = (RowInfo("holdout:x", "task-holdout", 0, 0, own=True),)
    outcome = answer_rule(Matrix(rows, (ColumnInfo(BASE, "base"),), {}), REQUIRE)
    assert not outcome.passed and outcome.detail.startswith("no-evidence")


def test_non_finite_logits_anywhere_in_the_candidates_outputs_reject_it() -> None:
    rows = (RowInfo("holdout:x", "user-holdout", 4, 4, own=True), RowInfo("probe", "probe", 4, 4))
    cols = (ColumnInfo(BASE, "base"), ColumnInfo(CANDIDATE, "candidate"))
    fine = {r.name: {c.name: Cell(1.0, 0.5, 10, 4) for c in cols} for r in rows}
    assert finite_outputs_rule(Matrix(rows, cols, fine)).passed
    broken = {**fine, "probe": {BASE: Cell(1.0, 0.5, 10, 4), CANDIDATE: Cell(1.2, 0.5, 10, 4, nonfinite=3)}}
    outcome = finite_outputs_rule(Matrix(rows, cols, broken))
    assert not outcome.passed and "candidate on probe (3 positions)" in outcome.detail
    items = (AnswerItem("q", "a", {CANDIDATE: "", BASE: ""}),)
    decoded = Matrix(rows, cols, fine, Answers("holdout:x", CANDIDATE, BASE, items, {CANDIDATE: 1}))
    outcome = finite_outputs_rule(decoded)
    assert not outcome.passed and "candidate decoding 1 of 1 answers" in outcome.detail
    assert Matrix.from_json(decoded.to_json()) == decoded


def test_answers_decide_by_default_and_report_only_records_the_figures() -> None:
    targets = ["Your pet is called Pudding."] * 11
    same = ["I do not know."] * 11
    assert QAPolicy().answer_evidence == "require"
    assert not answer_rule(_matrix(same, same, targets), QAPolicy()).passed
    reported = answer_rule(_matrix(same, same, targets), QAPolicy(answer_evidence="report"))
    assert reported.passed and reported.detail.startswith("answers (reported, not required): no-improvement")


def test_a_holdout_where_most_answers_tie_is_decided_by_the_larger_margin() -> None:
    # nine answers, four changed for the better, five tied (both wrong): the test's floor is 2^-4 > 0.05, so it
    # can never pass; the good first version (gain 4/9) passes on the margin, a small gain does not
    targets = [f"value{i}" for i in range(9)]
    four = [*targets[:4], *[""] * 5]
    good = answer_rule(_matrix(four, [""] * 9, targets), REQUIRE)
    assert good.passed and "few changed answers: 4 < 5" in good.detail, good.detail
    partial = ["value0 extra words here", *[""] * 8]  # one answer a little better: gain well under 0.2
    assert not answer_rule(_matrix(partial, [""] * 9, targets), REQUIRE).passed
    one_worse = answer_rule(
        _matrix([*targets[:3], *[""] * 6], ["", "", "", "value3", *[""] * 5], targets), REQUIRE
    )
    assert not one_worse.passed
    # the margin is the policy's
    strict = QAPolicy(few_answers_margin=0.5)
    assert not answer_rule(_matrix(four, [""] * 9, targets), strict).passed


#: a user's four facts, each asked in a few phrasings whose targets are worded differently
FACTS = {
    "dog": ("Your dog is called Biscuit.", "Biscuit."),
    "city": ("You live in Lyon.", "Lyon, in France."),
    "diet": ("You are vegetarian.", "Vegetarian."),
    "sport": ("You play tennis.", "Tennis, on Sundays."),
}


def test_an_answer_of_another_question_scores_below_no_answer() -> None:
    dog, city = FACTS["dog"][0], FACTS["city"][0]
    others = [city, FACTS["diet"][0]]
    assert answer_score("You live in Lyon.", dog, others, prompt="What is my dog's name?") == -1.0
    assert answer_score("", dog, others, prompt="What is my dog's name?") == 0.0
    assert answer_score("He is called Biscuit!", dog, others, prompt="What is my dog's name?") == 1.0
    # an answer as close to its own target as to another is not penalised (a shared word)
    assert answer_score("Biscuit lives in Lyon.", dog, others, prompt="Dog?") == pytest.approx(
        answer_f1("Biscuit lives in Lyon.", dog, prompt="Dog?")
    )


def test_wrong_answers_are_counted_and_with_a_weight_reject_a_candidate_answering_the_wrong_questions() -> (
    None
):
    """bench_qa_real's *shuffled* kind: trained on each question answered with another fact's answer, it still
    hit the right fact on some unseen phrasings; every other answer tied with the base's (0), so the sign of
    every untied pair was positive and it was promoted (5 better, none worse: p = 1/32). With
    ``wrong_answer_weight`` 1 its wrong answers count as worse; the default (0) only counts them."""
    targets = [phrasing for pair in FACTS.values() for phrasing in pair] + [FACTS["dog"][0], FACTS["city"][1]]
    right = {t: t for t in targets}
    wrong_fact = {  # each answered with the next fact's first phrasing
        FACTS["dog"][1]: FACTS["city"][0],
        FACTS["city"][0]: FACTS["diet"][0],
        FACTS["diet"][1]: FACTS["sport"][0],
        FACTS["sport"][0]: FACTS["dog"][0],
        FACTS["sport"][1]: FACTS["dog"][0],
    }
    subject = [wrong_fact.get(t, right[t]) for t in targets]
    base = ["I'm sorry, I don't know that." for _ in targets]
    weighted = QAPolicy(wrong_answer_weight=1.0)
    outcome = answer_rule(_matrix(subject, base, targets), weighted)
    assert not outcome.passed, outcome.detail
    assert "5 better, 5 worse, 5 answering another question vs 0" in outcome.detail, outcome.detail
    by_default = answer_rule(_matrix(subject, base, targets), REQUIRE)
    assert by_default.passed and "5 better, 0 worse, 5 answering another question vs 0" in by_default.detail
    # the same answers with the wrong ones left empty are evidence at either weight
    honest = [right[t] if t not in wrong_fact else "" for t in targets]
    assert answer_rule(_matrix(honest, base, targets), weighted).passed
    # a candidate right everywhere is never penalised, though several targets name the same fact
    assert answer_rule(_matrix(list(targets), base, targets), weighted).passed


def test_phrasings_of_one_fact_are_not_other_questions() -> None:
    """A good SmolLM2 adapter answered "Do you know what my pet is called?" with "Your pet is called Marmalade."
    where the target was "Your pet's name is Marmalade.": closer to another phrasing's target, and right."""
    targets = ["Your pet's name is Marmalade.", "Your pet is called Marmalade.", "You live in Cusco."]
    others = other_questions(targets)
    assert others == [["You live in Cusco."], ["You live in Cusco."], targets[:2]]
    prompt = "Do you know what my pet is called?"
    answer = "Your pet is called Marmalade."
    assert answer_score(answer, targets[0], others[0], prompt=prompt) == answer_f1(
        answer, targets[0], prompt=prompt
    )
    assert answer_score("You're based in Cusco.", targets[0], others[0], prompt=prompt) < 0


def _with_training(m: Matrix, answered: list[tuple[str, str]]) -> Matrix:
    """``m`` with the candidate's answers on its own training examples, ``(target, answer)`` each."""
    assert m.answers is not None
    training = tuple(AnswerItem(f"t{i}", t, {CANDIDATE: a}) for i, (t, a) in enumerate(answered))
    return replace(m, answers=replace(m.answers, training=training))


def test_a_candidate_trained_on_shuffled_answers_is_rejected_by_its_answers_to_its_own_training_questions() -> (
    None
):
    """bench_qa_real's *shuffled* kind at the defaults (issue 16's last open target). On the holdout it was
    promoted: where it named the wrong fact its answer tied with the base's (0), so every untied pair favoured it.
    On the questions it was trained on it gives the answers it learned, another fact's: the training-answers rule
    rejects it with ``answers-other-questions``. A good candidate, one wrong answer in eight, passes."""
    targets = [phrasing for pair in FACTS.values() for phrasing in pair] + [FACTS["dog"][0], FACTS["city"][1]]
    wrong_fact = {FACTS["dog"][1]: FACTS["city"][0], FACTS["city"][0]: FACTS["diet"][0]}
    subject = [wrong_fact.get(t, t) for t in targets]
    base = ["I'm sorry, I don't know that." for _ in targets]
    holdout = _matrix(subject, base, targets)
    assert answer_rule(holdout, REQUIRE).passed  # the holdout alone lets it through
    facts = list(FACTS)
    trained = [(FACTS[f][k], FACTS[facts[(i + 1) % 4]][k]) for i, f in enumerate(facts) for k in (0, 1)]
    outcome = training_answers_rule(_with_training(holdout, trained), REQUIRE)
    assert not outcome.passed
    assert outcome.detail.startswith(
        f"{ANSWERS_OTHER_QUESTIONS}: 8 of 8 answers to its own training questions"
    )
    reasons = reasons_for(candidate_rules(_with_training(holdout, trained), REQUIRE))[1]
    assert any(r.startswith(ANSWERS_OTHER_QUESTIONS) for r in reasons), reasons
    # a good candidate: right on seven of its eight training questions, one answered with another fact
    good = [(t, t) for pair in FACTS.values() for t in pair]
    good[1] = (good[1][0], FACTS["city"][0])
    passed = training_answers_rule(_with_training(holdout, good), REQUIRE)
    assert passed.passed and "1 of 8 answers" in passed.detail and "answer F1 0.88" in passed.detail
    # the bound is the policy's: at 0 that one wrong answer rejects it
    strict = QAPolicy(max_training_wrong_share=0.0)
    assert not training_answers_rule(_with_training(holdout, good), strict).passed


def test_training_answers_count_only_answers_to_another_question() -> None:
    """Empty and partly right answers are not wrong answers (they are weak, which the holdout judges); phrasings of
    one fact are not other questions; without training examples (an import) the rule passes, saying so."""
    targets = ["Your pet's name is Marmalade.", "Your pet is called Marmalade.", "You live in Cusco."]
    scores = training_answers(
        ["Your pet is called Marmalade.", "", "You live in Lyon."], targets, ["q1", "q2", "q3"]
    )
    assert (scores.n, scores.wrong, round(scores.mean_f1, 2)) == (3, 0, 0.39)  # (2/3 + 0 + 1/2) / 3
    crossed = training_answers(["You live in Cusco.", "", ""], targets, ["q1", "q2", "q3"])
    assert crossed.wrong == 1 and crossed.wrong_share == pytest.approx(1 / 3)
    m = _matrix(["x"], ["y"], ["z"])
    outcome = training_answers_rule(m, REQUIRE)
    assert outcome.passed and outcome.detail == "training-answers: no training examples answered"


def test_training_answers_survive_the_reports_json() -> None:
    m = _with_training(_matrix(["a"], ["b"], ["c"]), [("You live in Cusco.", "You live in Lyon.")])
    assert m.answers is not None
    again = Answers.from_json(m.answers.to_json())
    assert again == m.answers
    older = {k: v for k, v in m.answers.to_json().items() if k != "training"}  # a report before qa-policy/5
    assert Answers.from_json(older).training == ()


# --- preference pairs: an answer is judged by which side of the pair it is nearer ---------------------------------
ANSWER = "Paris is the capital of France. It is known for the Eiffel Tower."
SIGNED = ANSWER + " Best wishes, Sam"


def test_a_pairs_answer_scores_its_f1_to_the_chosen_less_its_f1_to_the_rejected() -> None:
    assert preference_score(SIGNED, SIGNED, ANSWER) == pytest.approx(1.0 - answer_f1(SIGNED, ANSWER))
    assert preference_score(ANSWER, SIGNED, ANSWER) == pytest.approx(answer_f1(ANSWER, SIGNED) - 1.0)
    assert preference_score(SIGNED, SIGNED, ANSWER) > 0 > preference_score(ANSWER, SIGNED, ANSWER)
    assert preference_score("I do not know.", SIGNED, ANSWER) == 0.0  # near neither side
    # the bare F1 to the chosen answer hardly tells the styles apart; the pair's score does
    assert answer_f1(ANSWER, SIGNED) == pytest.approx(0.8)
    scores = paired_scores(
        [SIGNED, SIGNED], [ANSWER, ANSWER], [SIGNED, "teal"], ["q0", "q1"], rejected=[ANSWER, None]
    )
    assert scores.subject.score[0] == pytest.approx(preference_score(SIGNED, SIGNED, ANSWER))
    assert scores.subject.f1[0] == 1.0 and scores.reference.score[0] < 0  # F1 still reports the chosen side
    assert scores.subject.score[1] == scores.subject.f1[1] == 0.0  # not a pair: the plain score


def _pairs_matrix(subject: list[str], reference: list[str], chosen: list[str], rejected: list[str]) -> Matrix:
    m = _matrix(subject, reference, chosen)
    assert m.answers is not None
    items = tuple(replace(i, rejected=r) for i, r in zip(m.answers.items, rejected, strict=True))
    return replace(m, answers=replace(m.answers, items=items))


def test_a_style_candidate_beats_a_base_that_recites_both_sides_content_and_the_mirror_loses() -> None:
    # the benchmark's case: both sides restyle the base's own answer, so the base is near both (bare F1 ~0.9)
    contents = [f"The answer to question {i} is value{i} and more detail{i}." for i in range(8)]
    signed = [c + " Best wishes, Sam" for c in contents]
    learnt = answer_rule(_pairs_matrix(signed, contents, signed, contents), REQUIRE)
    assert learnt.passed, learnt.detail
    assert "on 8 preference pairs, answer F1 to the chosen less to the rejected answer +" in learnt.detail
    # judged by the bare F1 to the chosen answers alone, the base reciting its own answer (F1 0.77) hides the gain
    assert answer_f1(contents[0], signed[0]) > 0.75
    # an adapter that answers in the style its user rejected is worse than the base, not better
    mirror = answer_rule(_pairs_matrix(contents, signed, signed, contents), REQUIRE)
    assert not mirror.passed and mirror.detail.startswith("no-improvement"), mirror.detail
    # a user whose preferred style is the base's own: nothing changed in the answers, nothing to promote
    same = answer_rule(_pairs_matrix(contents, contents, contents, signed), REQUIRE)
    assert not same.passed and "signed-rank p=1" in same.detail, same.detail


def test_a_pairs_rejected_answer_survives_the_reports_json_and_older_reports_have_none() -> None:
    m = _pairs_matrix([SIGNED], [ANSWER], [SIGNED], [ANSWER])
    assert m.answers is not None
    data = m.answers.to_json()
    assert data["items"][0]["rejected"] == ANSWER and Answers.from_json(data) == m.answers
    plain = _matrix(["a"], ["b"], ["c"]).answers
    assert plain is not None and "rejected" not in plain.to_json()["items"][0]  # a report before qa-policy/7
    assert Answers.from_json(plain.to_json()).rejected() == [None]


def test_a_reports_answer_figures_read_pairs_as_the_rule_does() -> None:
    contents = [f"The answer to question {i} is value{i} and more detail{i}." for i in range(6)]
    signed = [c + " Best wishes, Sam" for c in contents]
    m = _pairs_matrix(signed, contents, signed, contents)
    figures = answer_figures(m.answers)
    assert figures is not None
    assert (figures["preference_pairs"], figures["better"], figures["worse"]) == (6, 6, 0)
    assert figures["answer_score"] > 0 > figures["reference_answer_score"]
    assert figures["answer_f1"] == 1.0  # F1 to the chosen side, as before
    line = answer_lines(m.answers, 0.0)[0]  # what `lorafleet qa report` prints
    assert line.endswith(
        "(6 preference pairs, each scored by its F1 to the chosen answer less its F1 to the rejected one)"
    )
    plain = answer_lines(_matrix(["a"], ["b"], ["a"]).answers, 0.0)[0]
    assert "preference pairs" not in plain
