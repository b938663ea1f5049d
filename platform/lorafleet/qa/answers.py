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
class PairedScores:
    """Per-example answer F1 and exact match of a subject and a reference, and the signed-rank test over them."""

    subject_f1: tuple[float, ...]
    reference_f1: tuple[float, ...]
    subject_exact: tuple[bool, ...]
    reference_exact: tuple[bool, ...]

    @property
    def n(self) -> int:
        return len(self.subject_f1)

    @property
    def wins(self) -> int:
        return sum(s - r > _TIE for s, r in zip(self.subject_f1, self.reference_f1, strict=True))

    @property
    def losses(self) -> int:
        return sum(r - s > _TIE for s, r in zip(self.subject_f1, self.reference_f1, strict=True))

    @property
    def p_value(self) -> float:
        """The one-sided signed-rank test's p that the subject's F1 is higher (``signed_rank_p``)."""
        return signed_rank_p([s - r for s, r in zip(self.subject_f1, self.reference_f1, strict=True)])

    @staticmethod
    def _mean(values: Sequence[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    @property
    def subject_mean_f1(self) -> float:
        return self._mean(self.subject_f1)

    @property
    def reference_mean_f1(self) -> float:
        return self._mean(self.reference_f1)

    @property
    def subject_exact_rate(self) -> float:
        return self._mean([float(x) for x in self.subject_exact])

    @property
    def reference_exact_rate(self) -> float:
        return self._mean([float(x) for x in self.reference_exact])


def paired_scores(
    subject: Sequence[str], reference: Sequence[str], targets: Sequence[str], prompts: Sequence[str]
) -> PairedScores:
    """Score two columns' answers against the same targets (answer F1 given each example's prompt)."""
    return PairedScores(
        tuple(answer_f1(a, t, prompt=p) for a, t, p in zip(subject, targets, prompts, strict=True)),
        tuple(answer_f1(a, t, prompt=p) for a, t, p in zip(reference, targets, prompts, strict=True)),
        tuple(exact_match(a, t) for a, t in zip(subject, targets, strict=True)),
        tuple(exact_match(a, t) for a, t in zip(reference, targets, strict=True)),
    )


__all__ = [
    "STOPWORDS",
    "PairedScores",
    "answer_f1",
    "content_words",
    "exact_match",
    "normalize",
    "paired_scores",
    "min_untied_pairs",
    "signed_rank_p",
    "token_f1",
]
