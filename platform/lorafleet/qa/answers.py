"""Answer-level evidence: how a greedy answer is scored against its feedback target, and the paired test.

**Metric.** Both texts are normalised (``normalize``: Unicode NFKC, lower case, every character that is not a
letter, digit or whitespace becomes a space, whitespace collapsed), then

- *exact match*: the normalised answer equals the normalised target;
- *token F1*: the harmonic mean of precision and recall of the answer's words against the target's words,
  counted as multisets (SQuAD-style). Two empty texts score 1, one empty text 0.

Token F1 is the per-example score QA compares (it gives partial credit, so an answer that names the right
thing in other words still counts); exact match is reported beside it.

**Test.** A one-sided exact *sign test* on the paired per-example F1 scores (subject vs reference): a *win* is
an example the subject answers strictly better, a *loss* one it answers strictly worse, ties are dropped, and
``p = P(Binomial(wins + losses, 1/2) >= wins)``. Chosen over a paired bootstrap because it is exact at every
holdout size (a bootstrap's p-value is unreliable at the 5-20 examples a holdout often has), needs no
resampling seed, is unaffected by the many ties bounded scores produce (both answers empty, or both right), and
makes no assumption about the score distribution. The price is power: it needs at least
``sign_test_min_pairs(alpha)`` untied examples to reach ``alpha`` at all (5 at ``alpha`` 0.05); smaller
holdouts are decided by the tiny-holdout rule (``lorafleet.qa.rules.answer_rule``).
"""

from __future__ import annotations

import math
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


def normalize(text: str) -> str:
    """NFKC, lower case, punctuation and symbols to spaces, whitespace collapsed."""
    folded = unicodedata.normalize("NFKC", text).lower()
    kept = "".join(ch if ch.isalnum() or ch.isspace() else " " for ch in folded)
    return " ".join(kept.split())


def exact_match(answer: str, target: str) -> bool:
    return normalize(answer) == normalize(target)


def token_f1(answer: str, target: str) -> float:
    """Token F1 of the normalised words (multisets); 1 for two empty texts, 0 when only one is empty."""
    got, want = normalize(answer).split(), normalize(target).split()
    if not got or not want:
        return 1.0 if got == want else 0.0
    common = sum((Counter(got) & Counter(want)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(got), common / len(want)
    return 2 * precision * recall / (precision + recall)


def sign_test_p(wins: int, losses: int) -> float:
    """One-sided exact sign test: ``P(Binomial(wins + losses, 1/2) >= wins)`` (1.0 when every pair ties)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def sign_test_min_pairs(alpha: float) -> int:
    """The fewest untied pairs for which the sign test can reach ``alpha`` (all of them wins): ``2^-n <= alpha``."""
    return max(1, math.ceil(math.log2(1.0 / alpha) - 1e-12))


@dataclass(frozen=True)
class PairedScores:
    """Per-example F1 and exact match of a subject and a reference, and the sign test over them."""

    subject_f1: tuple[float, ...]
    reference_f1: tuple[float, ...]
    subject_exact: tuple[bool, ...]
    reference_exact: tuple[bool, ...]

    @property
    def n(self) -> int:
        return len(self.subject_f1)

    @property
    def wins(self) -> int:
        return sum(s > r for s, r in zip(self.subject_f1, self.reference_f1, strict=True))

    @property
    def losses(self) -> int:
        return sum(s < r for s, r in zip(self.subject_f1, self.reference_f1, strict=True))

    @property
    def p_value(self) -> float:
        return sign_test_p(self.wins, self.losses)

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


def paired_scores(subject: Sequence[str], reference: Sequence[str], targets: Sequence[str]) -> PairedScores:
    """Score two columns' answers against the same targets."""
    return PairedScores(
        tuple(token_f1(a, t) for a, t in zip(subject, targets, strict=True)),
        tuple(token_f1(a, t) for a, t in zip(reference, targets, strict=True)),
        tuple(exact_match(a, t) for a, t in zip(subject, targets, strict=True)),
        tuple(exact_match(a, t) for a, t in zip(reference, targets, strict=True)),
    )


__all__ = [
    "PairedScores",
    "exact_match",
    "normalize",
    "paired_scores",
    "sign_test_min_pairs",
    "sign_test_p",
    "token_f1",
]
