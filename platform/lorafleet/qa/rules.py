"""The promotion rules over a QA matrix: pure functions, so a decision can be recomputed from a stored report.

Each rule returns a ``RuleOutcome`` whose ``detail`` starts with the rule's name and states the numbers it
compared, so a rejection says which rule failed and by how much. A NaN loss (a non-finite forward) fails the
rule that reads it. Rows without examples are not compared (a missing holdout is reported, not guessed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorafleet.qa.answers import loops, min_untied_pairs
from lorafleet.qa.facts import GENERAL_FACTS_LOST, answers_kept
from lorafleet.qa.policy import QAPolicy
from lorafleet.qa.probe import PRETRAINED_EPSILON_PROBE
from lorafleet.qa.results import (
    BASE,
    CANDIDATE,
    GATED_CANDIDATE,
    GATED_PREVIOUS,
    PREVIOUS,
    Matrix,
    RowInfo,
)

USER_HOLDOUT = "user-holdout"
NO_REGRESSION = "no-regression"
GATE_VS_BEST_MEMBER = "gate-vs-best-member"
PROBE_RULE = "probe"
ANSWER_RULE = "answers"
TRAINING_ANSWERS_RULE = "training-answers"
GENERAL_FACTS_RULE = "general-facts"
#: the reason code of a candidate that answers too many of its own training questions with another's answer
ANSWERS_OTHER_QUESTIONS = "answers-other-questions"
FINITE_RULE = "finite-outputs"
PREFERENCE_RULE = "preference-accuracy"
LOOPING_RULE = "looping-answers"
#: the reason code of a preference candidate whose greedy answers loop more often than the reference's
ANSWERS_LOOP = "answers-loop"
#: the reason code of a candidate whose answers do not beat the reference's
NO_IMPROVEMENT = "no-improvement"
#: the reason code of a candidate without any example to answer (an import without evidence)
NO_EVIDENCE = "no-evidence"
RULES = (
    USER_HOLDOUT,
    ANSWER_RULE,
    TRAINING_ANSWERS_RULE,
    GENERAL_FACTS_RULE,
    PREFERENCE_RULE,
    LOOPING_RULE,
    NO_REGRESSION,
    GATE_VS_BEST_MEMBER,
    PROBE_RULE,
    FINITE_RULE,
)


@dataclass(frozen=True)
class RuleOutcome:
    """Whether a rule passed, and why (the numbers compared)."""

    rule: str
    passed: bool
    detail: str


def candidate_rules(matrix: Matrix, policy: QAPolicy, *, answers: bool = True) -> list[RuleOutcome]:
    """Every rule a candidate must pass to be promoted (``answers`` False: the same candidate evaluated in
    another bank, whose answers were judged already). The preference and looping rules apply when the matrix
    holds held-out preference pairs (a candidate trained with DPO)."""
    return [
        user_holdout_rule(matrix, policy),
        *(
            [
                answer_rule(matrix, policy),
                training_answers_rule(matrix, policy),
                general_facts_rule(matrix, policy),
            ]
            if answers
            else []
        ),
        *([preference_rule(matrix)] if matrix.preferences is not None else []),
        *([looping_rule(matrix, policy)] if answers and matrix.preferences is not None else []),
        no_regression_rule(matrix, policy),
        gate_vs_best_member_rule(matrix, policy),
        probe_rule(matrix, policy),
        finite_outputs_rule(matrix),
    ]


def recheck_rules(matrix: Matrix, policy: QAPolicy) -> list[RuleOutcome]:
    """The rules a live version must keep passing after its bank changed (nothing to compare it with)."""
    return [gate_vs_best_member_rule(matrix, policy), probe_rule(matrix, policy), finite_outputs_rule(matrix)]


def reasons_for(outcomes: list[RuleOutcome]) -> tuple[bool, list[str]]:
    """``(all passed, reasons)``: the failed rules' details, or every passed rule's when all passed."""
    failed = [o.detail for o in outcomes if not o.passed]
    return (not failed, failed or [o.detail for o in outcomes])


def user_holdout_rule(matrix: Matrix, policy: QAPolicy) -> RuleOutcome:
    """The candidate beats the previous live version on the user's holdout by at least ``delta``."""
    own = _own_row(matrix)
    if own is None or own.examples == 0:
        return RuleOutcome(USER_HOLDOUT, False, f"{USER_HOLDOUT}: no holdout examples to evaluate on")
    cand = matrix.loss(own.name, CANDIDATE)
    if not matrix.has_column(PREVIOUS):
        ok = math.isfinite(cand)
        base = matrix.loss(own.name, BASE)
        detail = f"no previous live version (candidate {cand:.4f}, base {base:.4f})"
        return RuleOutcome(USER_HOLDOUT, ok, f"{USER_HOLDOUT}: {detail}")
    prev = matrix.loss(own.name, PREVIOUS)
    needed = prev - policy.delta
    ok = math.isfinite(cand) and cand <= needed
    verdict = "beats" if ok else "does not beat"
    detail = (
        f"{USER_HOLDOUT}: candidate {cand:.4f} {verdict} previous live {prev:.4f} "
        f"by delta {policy.delta:g} (needs <= {needed:.4f})"
    )
    return RuleOutcome(USER_HOLDOUT, ok, detail)


def no_regression_rule(matrix: Matrix, policy: QAPolicy) -> RuleOutcome:
    """No evaluation set is worse than under the previous live configuration by more than ``epsilon``."""
    subject = GATED_CANDIDATE if matrix.has_column(GATED_CANDIDATE) else CANDIDATE
    reference = next((c for c in (GATED_PREVIOUS, PREVIOUS, BASE) if matrix.has_column(c)), BASE)
    worse = []
    for row in _scored_rows(matrix):
        new, old = matrix.loss(row.name, subject), matrix.loss(row.name, reference)
        if not (math.isfinite(new) and new - old <= policy.epsilon):
            worse.append(f"{row.name} {old:.4f} -> {new:.4f}")
    what = f"{subject} vs {reference}, epsilon {policy.epsilon:g}"
    if worse:
        return RuleOutcome(NO_REGRESSION, False, f"{NO_REGRESSION}: worse on {', '.join(worse)} ({what})")
    return RuleOutcome(NO_REGRESSION, True, f"{NO_REGRESSION}: no set worse ({what})")


def gate_vs_best_member_rule(matrix: Matrix, policy: QAPolicy) -> RuleOutcome:
    """On every set, the gated bank is within ``epsilon`` of its best single member alone."""
    if not matrix.has_column(GATED_CANDIDATE):
        return RuleOutcome(GATE_VS_BEST_MEMBER, True, f"{GATE_VS_BEST_MEMBER}: no bank to gate")
    singles = [c.name for c in matrix.columns if c.name == CANDIDATE or c.kind == "alone"]
    worse = []
    for row in _scored_rows(matrix):
        gated = matrix.loss(row.name, GATED_CANDIDATE)
        best_name, best = min(((c, matrix.loss(row.name, c)) for c in singles), key=_nan_last)
        if not (math.isfinite(gated) and gated - best <= policy.epsilon):
            worse.append(f"{row.name} gated {gated:.4f} vs {best_name} {best:.4f}")
    if worse:
        detail = f"worse than the best single member on {', '.join(worse)} (epsilon {policy.epsilon:g})"
        return RuleOutcome(GATE_VS_BEST_MEMBER, False, f"{GATE_VS_BEST_MEMBER}: {detail}")
    detail = f"within epsilon {policy.epsilon:g} of the best single member on every set"
    return RuleOutcome(GATE_VS_BEST_MEMBER, True, f"{GATE_VS_BEST_MEMBER}: {detail}")


def probe_rule(matrix: Matrix, policy: QAPolicy) -> RuleOutcome:
    """The probe set's loss moves less than ``epsilon_probe`` from base, alone and gated.

    A candidate trained on preference pairs (the matrix holds held-out pairs) is read on the answers' body: every
    answer token but the first and the end of turn. Those two are where a style opens and closes answers its own
    way (a greeting, a sign-off), and where its training leaves the anchors free (``anchor_free_ends``); the
    body is where general answers keep their content. A report written before the body loss was recorded is
    read on the whole answers."""
    probe = next((r for r in matrix.rows if r.kind == "probe"), None)
    if probe is None or probe.examples == 0:
        return RuleOutcome(PROBE_RULE, False, f"{PROBE_RULE}: no probe set was evaluated")
    body = matrix.preferences is not None and math.isfinite(matrix.body_loss(probe.name, BASE))
    loss = matrix.body_loss if body else matrix.loss
    base = loss(probe.name, BASE)
    moves = []
    for column in (c for c in (CANDIDATE, GATED_CANDIDATE) if matrix.has_column(c)):
        value = loss(probe.name, column)
        moves.append((column, value, _move(value, base, one_sided=policy.probe_one_sided)))
    text = ", ".join(f"{c} {v:.4f} (moved {v - base:+.4f})" for c, v, _ in moves)
    # the evaluator fills in the backbone's bound; a policy used without one gets the pretrained default
    epsilon = PRETRAINED_EPSILON_PROBE if policy.epsilon_probe is None else policy.epsilon_probe
    ok = math.isfinite(base) and all(m < epsilon for _, _, m in moves)
    verdict = "within" if ok else "not within"
    bound = f"{'+' if policy.probe_one_sided else '+/-'}{epsilon:g}"
    where = " (answer body: a preference candidate's openings and closings are its style)" if body else ""
    detail = f"{PROBE_RULE}{where}: base {base:.4f}, {text}: {verdict} epsilon_probe {bound}"
    return RuleOutcome(PROBE_RULE, ok, detail)


def answer_rule(matrix: Matrix, policy: QAPolicy) -> RuleOutcome:
    """The candidate's greedy answers on its own holdout beat the reference's (previous live, else base) by answer
    F1 (``lorafleet.qa.answers``: the F1 over the words that can carry an answer; less a penalty for an answer
    naming another question's fact when ``wrong_answer_weight`` > 0): a one-sided Wilcoxon signed-rank test at
    ``answer_confidence`` and a mean gain of at least ``answer_margin``. When too few answers changed for the test
    ever to reach that confidence (fewer untied pairs than ``min_untied_pairs``: a tiny holdout, or one where most
    answers tie) it instead needs every answer at least as good as the reference's, at least one strictly better,
    and a mean gain of at least ``few_answers_margin``. An example that is a preference pair is scored by how much
    nearer the answer is to the chosen answer than to the rejected one (``lorafleet.qa.answers.preference_score``):
    both sides often share their content, and an answer that recites the rejected style must not count as near the
    chosen one. Fails with ``no-improvement`` and the figures, or ``no-evidence`` when there was nothing to
    answer. Under ``answer_evidence="report"`` a ``no-improvement`` is recorded with its figures but passes
    (``no-evidence`` still fails: without a holdout nothing can be compared)."""
    evidence = matrix.answers
    if evidence is None or not evidence.items:
        return RuleOutcome(ANSWER_RULE, False, f"{NO_EVIDENCE}: no holdout examples to answer")
    rejected = evidence.rejected()
    scores = evidence.holdout_scores(wrong_answer_weight=policy.wrong_answer_weight)
    alpha = 1.0 - policy.answer_confidence
    needed = min_untied_pairs(alpha)
    ref_name = "previous live" if evidence.reference == PREVIOUS else evidence.reference
    gain = scores.subject.mean_score - scores.reference.mean_score
    figures = (
        f"answer F1 {scores.subject.mean_f1:.2f} vs {ref_name} {scores.reference.mean_f1:.2f}, exact match "
        f"{scores.subject.exact_rate:.2f} vs {scores.reference.exact_rate:.2f} on {scores.n} holdout answers "
        f"({scores.wins} better, {scores.losses} worse, {scores.subject.wrong} answering another question "
        f"vs {scores.reference.wrong})"
    )
    pairs = [i for i, r in enumerate(rejected) if r is not None]
    if pairs:
        figures += (
            f"; on {len(pairs)} preference pairs, answer F1 to the chosen less to the rejected answer "
            f"{_mean_at(scores.subject.score, pairs):+.2f} vs {ref_name} {_mean_at(scores.reference.score, pairs):+.2f}"
        )
    untied = scores.wins + scores.losses
    # too few changed answers for the test ever to reach alpha (none changed: p = 1 says it): the margin decides
    if 0 < untied < needed:
        margin = max(policy.answer_margin, policy.few_answers_margin)
        ok = scores.losses == 0 and scores.wins >= 1 and gain >= margin
        test = (
            f"few changed answers: {untied} < {needed}, too few for the test at {policy.answer_confidence:g}; "
            f"needs none worse, at least one better and a gain >= {margin:g}"
        )
    else:
        p = scores.p_value
        ok = p <= alpha + 1e-12 and gain >= policy.answer_margin
        relation = "<=" if p <= alpha + 1e-12 else ">"
        test = f"signed-rank p={p:.3g} {relation} {alpha:.3g}, gain {gain:+.2f} (needs >= {policy.answer_margin:g})"
    code = ANSWER_RULE if ok else NO_IMPROVEMENT
    if (
        not ok and policy.answer_evidence == "report"
    ):  # figures in the report, the decision to the other rules
        return RuleOutcome(
            ANSWER_RULE, True, f"{ANSWER_RULE} (reported, not required): {code}: {figures}; {test}"
        )
    return RuleOutcome(ANSWER_RULE, ok, f"{code}: {figures}; {test}")


def training_answers_rule(matrix: Matrix, policy: QAPolicy) -> RuleOutcome:
    """At most ``max_training_wrong_share`` of the candidate's greedy answers on examples of its own training split
    answer another question (``lorafleet.qa.answers.training_answers``). A candidate trained on the user's
    feedback reproduces most of it; one trained on answers misaligned with their questions answers with those.
    Passes when there were no training examples (an import, or ``training_answers`` 0)."""
    evidence = matrix.answers
    if evidence is None or not evidence.training:
        return RuleOutcome(
            TRAINING_ANSWERS_RULE, True, f"{TRAINING_ANSWERS_RULE}: no training examples answered"
        )
    scores = evidence.training_scores()
    ok = scores.wrong_share <= policy.max_training_wrong_share + 1e-12
    figures = (
        f"{scores.wrong} of {scores.n} answers to its own training questions answer another question "
        f"({scores.wrong_share:.0%}, at most {policy.max_training_wrong_share:.0%} allowed; answer F1 "
        f"{scores.mean_f1:.2f})"
    )
    code = TRAINING_ANSWERS_RULE if ok else ANSWERS_OTHER_QUESTIONS
    return RuleOutcome(TRAINING_ANSWERS_RULE, ok, f"{code}: {figures}")


def general_facts_rule(matrix: Matrix, policy: QAPolicy) -> RuleOutcome:
    """Of the general questions with known answers that the base answers right, the candidate alone still answers
    right at least ``min_general_facts_kept`` (``lorafleet.qa.facts``): an adapter that learnt its user's style or
    facts by unlearning what the base knew ("The capital of Kenya is KIST.") is rejected with
    ``general-facts-lost``. Passes when none were asked or the base answers none right (nothing to keep). Reads the
    first ``general_facts`` general answers. A candidate trained on preference pairs answers ``looping_questions`` of
    them for the looping rule anyway: it is read on all of them with ``preference_facts_kept`` (unless that is 0)."""
    evidence = matrix.answers
    limit: int | None = policy.general_facts
    bound = policy.min_general_facts_kept
    if matrix.preferences is not None and policy.preference_facts_kept > 0:  # every general answer it gave
        limit, bound = None, policy.preference_facts_kept
    if evidence is None or not evidence.general[:limit]:
        return RuleOutcome(GENERAL_FACTS_RULE, True, f"{GENERAL_FACTS_RULE}: no general questions asked")
    kept = answers_kept(evidence, limit)
    if not kept.base_right:
        return RuleOutcome(
            GENERAL_FACTS_RULE,
            True,
            f"{GENERAL_FACTS_RULE}: the base answers none of {kept.asked} general questions right: nothing to keep",
        )
    ok = kept.share >= bound - 1e-12
    figures = (
        f"keeps {len(kept.kept)} of the {len(kept.base_right)} general questions the base answers right "
        f"({kept.share:.0%}, at least {bound:.0%} required; {kept.asked} asked)"
    )
    if kept.lost:
        shown = "; ".join(f"{prompt!r} -> {answer[:60]!r}" for prompt, answer in kept.lost[:3])
        figures += f"; lost: {shown}" + (f" and {len(kept.lost) - 3} more" if len(kept.lost) > 3 else "")
    code = GENERAL_FACTS_RULE if ok else GENERAL_FACTS_LOST
    return RuleOutcome(GENERAL_FACTS_RULE, ok, f"{code}: {figures}")


def looping_rule(matrix: Matrix, policy: QAPolicy) -> RuleOutcome:
    """A candidate trained on preference pairs loops (``lorafleet.qa.answers.loops``) on at most
    ``max_looping_increase`` more of its greedy answers than the reference: its holdout's answers against the
    reference's (the previous live version, else the base), the general questions' (``looping_questions``, or
    ``general_facts`` if more) against the base's. The probe reads such a candidate on the answers' body
    (``probe_rule``), where an adapter that no longer stops ("the City of the City of ...") can look like the base
    teacher-forced; its answers show it. Fails with ``answers-loop``."""
    evidence = matrix.answers
    if evidence is None or not (evidence.items or evidence.general):
        return RuleOutcome(LOOPING_RULE, True, f"{LOOPING_RULE}: no answers to read")
    pairs = [
        (i.outputs.get(evidence.subject, ""), i.outputs.get(evidence.reference, "")) for i in evidence.items
    ]
    pairs += [(i.outputs.get(evidence.subject, ""), i.outputs.get(BASE, "")) for i in evidence.general]
    looping = [answer for answer, _ in pairs if loops(answer)]
    reference = sum(loops(answer) for _, answer in pairs)
    increase = (len(looping) - reference) / len(pairs)
    ok = increase <= policy.max_looping_increase + 1e-12
    figures = (
        f"{len(looping)} of {len(pairs)} answers loop against {reference} of the reference's ({increase:+.0%}, "
        f"at most +{policy.max_looping_increase:.0%} allowed)"
    )
    if not ok:
        figures += "; e.g. " + "; ".join(repr(answer[:80]) for answer in looping[:2])
    code = LOOPING_RULE if ok else ANSWERS_LOOP
    return RuleOutcome(LOOPING_RULE, ok, f"{code}: {figures}")


def preference_rule(matrix: Matrix) -> RuleOutcome:
    """The candidate ranks more held-out preference pairs as the user did than the previous live version (the
    base, 50 %, without one); a candidate that ranks all of them right passes (nothing is left to improve)."""
    prefs = matrix.preferences
    if prefs is None or prefs.pairs == 0:
        return RuleOutcome(PREFERENCE_RULE, True, f"{PREFERENCE_RULE}: no held-out preference pairs")
    reference = PREVIOUS if PREVIOUS in prefs.accuracy else BASE
    cand, ref = prefs.accuracy.get(CANDIDATE, math.nan), prefs.accuracy.get(reference, math.nan)
    passed = cand > ref or cand == 1.0
    detail = (
        f"{PREFERENCE_RULE}: {cand:.1%} of {prefs.pairs} held-out pairs ranked right vs {ref:.1%} for the "
        f"{reference} (mean reward margin {prefs.margin.get(CANDIDATE, math.nan):.3f} vs "
        f"{prefs.margin.get(reference, math.nan):.3f})"
    )
    return RuleOutcome(PREFERENCE_RULE, passed, detail if passed else f"{detail}: no improvement")


def finite_outputs_rule(matrix: Matrix) -> RuleOutcome:
    """No logit the candidate produced is NaN or infinite: scoring (every column that routes through it) and
    decoding its answers. A non-finite forward is a broken adapter, whatever its loss happens to read."""
    columns = [c.name for c in matrix.columns if c.name in (CANDIDATE, GATED_CANDIDATE) or c.kind == "pair"]
    problems = []
    for row in matrix.rows:
        for column in columns:
            cell = matrix.cell(row.name, column)
            if cell is None or cell.examples == 0:
                continue
            if cell.nonfinite or not math.isfinite(cell.loss):
                what = f"{cell.nonfinite} positions" if cell.nonfinite else f"loss {cell.loss}"
                problems.append(f"{column} on {row.name} ({what})")
    evidence = matrix.answers
    if evidence is not None and evidence.nonfinite.get(evidence.subject):
        answered = len(evidence.items) + len(evidence.training)  # holdout and training answers
        problems.append(
            f"{evidence.subject} decoding {evidence.nonfinite[evidence.subject]} of {answered} answers"
        )
    if problems:
        detail = f"{FINITE_RULE}: NaN or Inf in the candidate's logits: {', '.join(problems)}"
        return RuleOutcome(FINITE_RULE, False, detail)
    return RuleOutcome(FINITE_RULE, True, f"{FINITE_RULE}: every logit finite")


def _move(value: float, base: float, *, one_sided: bool) -> float:
    """How far the probe moved (only upwards when one-sided); infinite for a NaN loss."""
    if not math.isfinite(value):
        return math.inf
    return value - base if one_sided else abs(value - base)


def _mean_at(values: tuple[float, ...], indices: list[int]) -> float:
    return sum(values[i] for i in indices) / len(indices)


def _own_row(matrix: Matrix) -> RowInfo | None:
    return next((r for r in matrix.rows if r.own), None)


def _scored_rows(matrix: Matrix) -> list[RowInfo]:
    """Holdout rows with examples (the probe has its own rule)."""
    return [r for r in matrix.rows if r.kind != "probe" and r.examples > 0]


def _nan_last(item: tuple[str, float]) -> tuple[bool, float]:
    return (not math.isfinite(item[1]), item[1] if math.isfinite(item[1]) else 0.0)


__all__ = [
    "ANSWER_RULE",
    "ANSWERS_OTHER_QUESTIONS",
    "TRAINING_ANSWERS_RULE",
    "training_answers_rule",
    "GENERAL_FACTS_RULE",
    "general_facts_rule",
    "looping_rule",
    "FINITE_RULE",
    "GATE_VS_BEST_MEMBER",
    "NO_EVIDENCE",
    "NO_IMPROVEMENT",
    "answer_rule",
    "finite_outputs_rule",
    "NO_REGRESSION",
    "PROBE_RULE",
    "RULES",
    "USER_HOLDOUT",
    "RuleOutcome",
    "candidate_rules",
    "gate_vs_best_member_rule",
    "no_regression_rule",
    "probe_rule",
    "reasons_for",
    "recheck_rules",
    "user_holdout_rule",
]
