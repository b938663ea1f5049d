"""Answer-level evidence: how a greedy answer is scored against its feedback target, and the paired test.

**Metric: answer F1** (``answer_f1``). Both texts are normalised (``normalize``: Unicode NFKC, lower case, every
character that is not a letter, digit or whitespace becomes a space, whitespace collapsed) and split into
words. The words that carry no answer are then left out of both: English function words (``STOPWORDS``: "your",
"is", "the", "you", ...; SQuAD's metric drops articles for the same reason) and every word of the prompt (echoing
the question is not an answer). The score is the F1 of what is left, counted as multisets. So "Your pet is
called Pretzel." scores 0 against the target "Your pet is called Marmalade." (it shares only the question's
words and the template), where plain token F1 gave it 0.8 and let adapters trained on another user's answers,
or on shuffled answers, through QA (``tests/benchmarks/bench_qa_real.py``). A house style keeps its signal:
"We're sorry to hear that ... a support agent will contact you within 24 hours" keeps "sorry", "hear",
"support", "agent", "contact", "24", "hours". When the target has no such word left (it only repeats the
prompt or is all function words) the plain token F1 of the whole texts is used. Two empty texts score 1, one
empty text 0. *Exact match* (the normalised texts are equal) is reported beside it.

**Preference pairs** (``preference_score``). A held-out preference record names the answer its user chose and the
one they rejected. Both often carry the same content in two styles (a sign-off or none, a greeting, one sentence or
five), so an answer that recites the rejected style still scores high F1 against the chosen one, and the base,
whose own answers such pairs often restyle, seems to know them already. A pair's score is therefore its answer F1
against the chosen answer less its answer F1 against the rejected one: positive when the answer is nearer the
side the user preferred. Its F1 (reported) stays the one against the chosen answer.

**Test.** A one-sided exact *Wilcoxon signed-rank test* on the paired per-example answer F1 scores (subject vs
reference). The differences ``d = subject - reference`` that are zero (ties: both answers empty, or both right)
are dropped; the rest are ranked by ``|d|`` (tied magnitudes share their average rank) and ``W+`` is the sum of
the ranks of the positive ones. Under the null hypothesis every sign is a fair coin, so ``p = P(W+ >= observed)``
is computed exactly from the distribution of a random-signed sum of those very ranks (conditional on ties; no
normal approximation, no seed, any holdout size). Chosen over the sign test because it weighs *how much* each
answer changed: with 6 answers better and 1 worse on a 7-answer holdout the sign test gives p = 0.0625 whatever
the sizes, the signed-rank test 0.016 when the worse answer lost least and 0.15 when it lost most.
Chosen over a paired bootstrap because it is exact at the 5-20 examples a holdout often has. With ``n`` untied
examples the smallest p it can give is ``2^-n`` (every difference positive), so it needs at least
``min_untied_pairs(alpha)`` of them to reach ``alpha`` at all (5 at ``alpha`` 0.05); smaller holdouts are
decided by the few-changed-answers rule (``lorafleet.qa.rules.answer_rule``).

**Wrong answers, and an opt-in penalty for them** (``other_questions``, ``wrong_answer``, ``answer_score``). An
answer closer to *another* question's target than to its own (the diet question answered with the user's city)
is a wrong answer: the other questions' targets are the holdout's targets that share no content word with its
own (targets that share one, the value, are phrasings of one fact). Reports count them (``wrong_answers``). With
``QAPolicy.wrong_answer_weight`` w > 0, the test and the margins use a score instead of the bare F1, ``own -
w * (crossed - own)`` for a wrong answer (``crossed``: its best answer F1 against the other questions' targets),
so a wrong answer counts as worse than no answer. Against a base that knows none of the user's facts every wrong
answer otherwise ties with the base's at 0. The default is w = 0 (the score is the F1), because on SmolLM2 good
first versions also answer some questions with another of the user's facts and their holdouts have 5-9 answers:
``bench_qa_real.py`` (3 seeds) promoted 9 of 9 good and 8 of 9 *shuffled* candidates at w = 0, 5 of 9 good and 1
of 9 shuffled at w = 1 (``docs/qa.md``).
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: English function words: pronouns, articles, auxiliaries, prepositions, conjunctions and the like. They carry no
#: answer, so the answer F1 leaves them out (what remains are the words an answer is right or wrong about).
#: Negations ("no", "not", "nor") are kept: "You are not vegetarian" must not match "You are vegetarian"
STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below between
    both but by can could did do does doing don down during each few for from further had has have having he her
    here hers herself him himself his how i if in into is it its itself just let me more most my myself
    now of off on once only or other our ours ourselves out over own re s same she should so some such t than
    that the their theirs them themselves then there these they this those through to too under until up very
    was we were what when where which while who whom why will with would you your yours yourself yourselves ll
    ve d m o y
    """.split()
)


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation and symbols to spaces, whitespace collapsed."""
    folded = unicodedata.normalize("NFKC", text).lower()
    kept = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in folded)
    return " ".join(kept.split())


#: an answer loops when one run of ``LOOP_WORDS`` normalised words stands in it ``LOOP_REPEATS`` times or more:
#: greedy decoding caught in a cycle ("It is often referred to as the City of the City of the City of ...")
LOOP_WORDS = 3
LOOP_REPEATS = 3


def loops(answer: str) -> bool:
    """Whether ``answer`` loops (``LOOP_WORDS``, ``LOOP_REPEATS``)."""
    words = normalize(answer).split()
    runs = Counter(tuple(words[i : i + LOOP_WORDS]) for i in range(len(words) - LOOP_WORDS + 1))
    return bool(runs) and max(runs.values()) >= LOOP_REPEATS


def exact_match(answer: str, target: str) -> bool:
    return normalize(answer) == normalize(target)


def token_f1(answer: str, target: str) -> float:
    """Token F1 of the normalised words (multisets); 1 for two empty texts, 0 when only one is empty."""
    return _f1(normalize(answer).split(), normalize(target).split())


def content_words(text: str, *, prompt: str = "") -> list[str]:
    """The normalised words of ``text`` that can carry an answer: not a ``STOPWORDS`` word, not in ``prompt``."""
    asked = set(normalize(prompt).split())
    return [w for w in normalize(text).split() if w not in STOPWORDS and w not in asked]


def answer_f1(answer: str, target: str, *, prompt: str = "") -> float:
    """The answer F1 of the module docstring: F1 over ``content_words`` (token F1 when the target has none)."""
    wanted = content_words(target, prompt=prompt)
    if not wanted:
        return token_f1(answer, target)
    return _f1(content_words(answer, prompt=prompt), wanted)


def answer_score(
    answer: str, target: str, others: Sequence[str], *, prompt: str = "", wrong_answer_weight: float = 1.0
) -> float:
    """``answer_f1`` less the wrong-question penalty of the module docstring:
    ``own - wrong_answer_weight * max(0, crossed - own)``, with ``crossed`` the best ``answer_f1`` of ``answer``
    against ``others`` (the targets of the other questions). In [-1, 1]."""
    return _penalised(*_own_and_crossed(answer, target, others, prompt), wrong_answer_weight)


def wrong_answer(answer: str, target: str, others: Sequence[str], *, prompt: str = "") -> bool:
    """The answer is closer to another question's target than to its own (``answer_score`` penalises it)."""
    own, crossed = _own_and_crossed(answer, target, others, prompt)
    return crossed - own > _TIE


def _own_and_crossed(answer: str, target: str, others: Sequence[str], prompt: str) -> tuple[float, float]:
    """The answer's F1 against its own target and its best F1 against the other questions' targets."""
    own = answer_f1(answer, target, prompt=prompt)
    return own, max((answer_f1(answer, other, prompt=prompt) for other in others), default=0.0)


def _penalised(own: float, crossed: float, weight: float) -> float:
    return own - weight * max(0.0, crossed - own)


def _f1(got: Sequence[str], want: Sequence[str]) -> float:
    if not got or not want:
        return 1.0 if not got and not want else 0.0
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def signed_rank_p(differences: Sequence[float]) -> float:
    """One-sided exact Wilcoxon signed-rank test that the differences are positive: ``P(W+ >= observed)``.

    Zero differences are dropped (1.0 when nothing is left); tied magnitudes get their average rank. Ranks are
    doubled so they stay integers, and the null distribution of ``W+`` is built by adding one rank at a time
    with a fair sign (an exact convolution, ``O(n^3)`` in the worst case: a few milliseconds at n = 256).
    """
    nonzero = [d for d in differences if abs(d) > _TIE]
    if not nonzero:
        return 1.0
    doubled = _doubled_ranks([abs(d) for d in nonzero])
    observed = sum(r for r, d in zip(doubled, nonzero, strict=True) if d > 0)
    distribution = np.zeros(sum(doubled) + 1)
    distribution[0] = 1.0
    for rank in doubled:  # each rank joins W+ with probability 1/2
        shifted = np.zeros_like(distribution)
        shifted[rank:] = distribution[:-rank]
        distribution = 0.5 * (distribution + shifted)
    return float(min(1.0, distribution[observed:].sum()))


def min_untied_pairs(alpha: float) -> int:
    """The fewest untied pairs for which the test can reach ``alpha`` (all of them better): ``2^-n <= alpha``."""
    return max(1, math.ceil(math.log2(1.0 / alpha) - 1e-12))


#: differences of F1 smaller than this are ties (F1 values are ratios of small integers)
_TIE = 1e-9


def _doubled_ranks(magnitudes: Sequence[float]) -> list[int]:
    """Twice the average ranks (1-based) of ``magnitudes``, so that shared ranks stay integers."""
    order = sorted(range(len(magnitudes)), key=lambda i: magnitudes[i])
    ranks = [0] * len(magnitudes)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and magnitudes[order[end + 1]] - magnitudes[order[start]] <= _TIE:
            end += 1
        for k in range(start, end + 1):  # positions start..end share the average of ranks start+1..end+1
            ranks[order[k]] = start + end + 2
        start = end + 1
    return ranks


@dataclass(frozen=True)
class ColumnScores:
    """One column's per-example answer F1, exact match, score (F1 less the wrong-question penalty) and whether
    the answer is closer to another question's target than to its own (``wrong_answer``)."""

    f1: tuple[float, ...]
    exact: tuple[bool, ...]
    score: tuple[float, ...]
    wrong_flags: tuple[bool, ...]

    @property
    def wrong(self) -> int:
        """Answers closer to another question's target than to their own."""
        return sum(self.wrong_flags)

    @property
    def mean_score(self) -> float:
        return _mean(self.score)

    @property
    def mean_f1(self) -> float:
        return _mean(self.f1)

    @property
    def exact_rate(self) -> float:
        return _mean([float(x) for x in self.exact])


@dataclass(frozen=True)
class PairedScores:
    """The scores of a subject and a reference on the same examples; better, worse and the signed-rank test
    are over the scores."""

    subject: ColumnScores
    reference: ColumnScores

    @property
    def n(self) -> int:
        return len(self.subject.f1)

    @property
    def wins(self) -> int:
        return sum(s - r > _TIE for s, r in zip(self.subject.score, self.reference.score, strict=True))

    @property
    def losses(self) -> int:
        return sum(r - s > _TIE for s, r in zip(self.subject.score, self.reference.score, strict=True))

    @property
    def p_value(self) -> float:
        """The one-sided signed-rank test's p that the subject's score is higher (``signed_rank_p``)."""
        return signed_rank_p([s - r for s, r in zip(self.subject.score, self.reference.score, strict=True)])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def other_questions(targets: Sequence[str]) -> list[list[str]]:
    """Per example, the holdout's targets that answer another question: distinct targets sharing no content word
    with its own. Targets that share one (the value: "Your pet is called Marmalade." and "Marmalade is your
    pet's name.") are phrasings of one fact, and an answer closer to one of them is not a wrong answer."""
    distinct = {normalize(t): (t, set(content_words(t))) for t in targets}
    out = []
    for own in targets:
        words = set(content_words(own))
        out.append([t for key, (t, w) in distinct.items() if key != normalize(own) and not (w & words)])
    return out


@dataclass(frozen=True)
class TrainingAnswers:
    """A candidate's greedy answers on examples of its own training split: how many, how many answer another
    question (``wrong_answer`` against the other training questions' targets) and their mean answer F1."""

    n: int
    wrong: int
    mean_f1: float

    @property
    def wrong_share(self) -> float:
        return self.wrong / self.n if self.n else 0.0


def training_answers(
    answers: Sequence[str], targets: Sequence[str], prompts: Sequence[str]
) -> TrainingAnswers:
    """Score answers to training questions: a candidate trained on the user's feedback gets most of them right;
    one trained on answers misaligned with their questions (shuffled completions) gives the answers it was
    trained on, which are other questions' targets."""
    others = other_questions(targets)
    scored = [
        _own_and_crossed(a, t, o, p) for a, t, o, p in zip(answers, targets, others, prompts, strict=True)
    ]
    wrong = sum(crossed - own > _TIE for own, crossed in scored)
    return TrainingAnswers(len(scored), wrong, _mean([own for own, _ in scored]))


def preference_score(answer: str, chosen: str, rejected: str, *, prompt: str = "") -> float:
    """How much nearer ``answer`` is to the answer a user chose than to the one they rejected: its ``answer_f1``
    against ``chosen`` less its ``answer_f1`` against ``rejected``, in [-1, 1]. Both sides of a pair usually share
    their content and differ in style (a greeting, a sign-off, a length), so an answer that recites either
    scores high on the bare F1 against the chosen one; the difference credits only the side the user preferred."""
    return answer_f1(answer, chosen, prompt=prompt) - answer_f1(answer, rejected, prompt=prompt)


def paired_scores(
    subject: Sequence[str],
    reference: Sequence[str],
    targets: Sequence[str],
    prompts: Sequence[str],
    *,
    wrong_answer_weight: float = 0.0,
    rejected: Sequence[str | None] | None = None,
) -> PairedScores:
    """Score two columns' answers against the same targets (answer F1 and ``answer_score`` given each example's
    prompt). The other targets of an example are ``other_questions``. ``rejected`` gives, per example, the answer
    the user ranked below its target (None: not a preference pair); a pair's score then also subtracts the answer's
    F1 against the rejected answer (``preference_score``), so its F1 says how near the chosen answer it is and its
    score which side of the pair it is nearer."""
    others = other_questions(targets)
    against = list(rejected) if rejected is not None else [None] * len(targets)

    def column(answers: Sequence[str]) -> ColumnScores:
        """Each answer's F1, exact match, score and wrong-answer flag, from one F1 against its own and the other
        targets."""
        f1s, exact, scores, wrong = [], [], [], []
        for a, t, o, p, r in zip(answers, targets, others, prompts, against, strict=True):
            own, crossed = _own_and_crossed(a, t, o, p)
            f1s.append(own)
            exact.append(exact_match(a, t))
            score = _penalised(own, crossed, wrong_answer_weight)
            scores.append(score if r is None else score - answer_f1(a, r, prompt=p))
            wrong.append(crossed - own > _TIE)
        return ColumnScores(tuple(f1s), tuple(exact), tuple(scores), tuple(wrong))

    return PairedScores(column(subject), column(reference))


__all__ = [
    "LOOP_REPEATS",
    "LOOP_WORDS",
    "STOPWORDS",
    "ColumnScores",
    "PairedScores",
    "answer_f1",
    "answer_score",
    "content_words",
    "exact_match",
    "loops",
    "normalize",
    "other_questions",
    "paired_scores",
    "preference_score",
    "min_untied_pairs",
    "signed_rank_p",
    "token_f1",
    "TrainingAnswers",
    "training_answers",
    "wrong_answer",
]
