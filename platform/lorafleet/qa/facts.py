"""General questions with known answers: whether a candidate still knows what the base model knows.

QA's probe rule reads a loss: how likely the base's own answers to general prompts stay under the candidate. A
loss cannot tell a restyled answer from a wrong one, and on the real backbone it passed adapters whose greedy
answers had lost much of what the base knew: a DPO adapter for a formal style answered "The capital of Kenya is
KIST." and "9 + 10 is 10." and moved the probe by +0.10 nats, inside its 0.25 bound (``docs/qa.md``). This check
reads the answers a person would read.

**The questions** are the ``FACTS_SIZE`` of ``general_prompts.EVAL_PROMPTS`` that have one right answer (the first
24: capitals, arithmetic, facts; six later ones: a mountain, a city, a language...; never trained on), each with
the forms a right answer may take (``KNOWN_ANSWERS``). An answer is right when it says one of them as a whole
word, case aside; a number counts when it stands alone ("40" and "40.0" count for 40, "40.5" and "140" do not).
Both the base and the candidate answer every question greedily, through the chat template, at most
``FACT_MAX_NEW_TOKENS`` tokens.

**The figure** is the share of the questions the base answers right that the candidate still answers right
("facts kept"). A question the base gets wrong is not held against the candidate (a 135M model gets "25 plus
17" wrong). When the base answers none of them right (the built-in random-init tiny backbone) there is nothing
to keep and the rule passes. The rule (``lorafleet.qa.rules.general_facts_rule``) asks for at least
``QAPolicy.min_general_facts_kept``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lorafleet.qa.results import BASE, Answers
from lorafleet.training.general_prompts import EVAL_PROMPTS

#: what a right answer to each of the first general evaluation prompts says; any one of the forms counts
KNOWN_ANSWERS: dict[str, tuple[str, ...]] = {
    "What is the capital of Japan?": ("Tokyo",),
    "What is the capital of Spain?": ("Madrid",),
    "What is the capital of Germany?": ("Berlin",),
    "What is the capital of Australia?": ("Canberra",),
    "What is the capital of Kenya?": ("Nairobi",),
    "What is the capital of Mexico?": ("Mexico City",),
    "What is the capital of China?": ("Beijing",),
    "What is the capital of India?": ("Delhi",),
    "What is the capital of the United Kingdom?": ("London",),
    "What is 7 times 8?": ("56", "fifty-six"),
    "What is 100 divided by 4?": ("25", "twenty-five"),
    "What is 9 plus 10?": ("19", "nineteen"),
    "What is half of 50?": ("25", "twenty-five"),
    "What is the square root of 81?": ("9", "nine"),
    "What is 25 plus 17?": ("42", "forty-two"),
    "What is 11 times 3?": ("33", "thirty-three"),
    "What is 6 times 7?": ("42", "forty-two"),
    "What is 20 percent of 200?": ("40", "forty"),
    "How many minutes are in an hour?": ("60", "sixty"),
    "What planet is closest to the sun?": ("Mercury",),
    "What is the largest ocean on Earth?": ("Pacific",),
    "Who painted the Mona Lisa?": ("Leonardo",),
    "What colour is the sky on a clear day?": ("blue",),
    "How many continents are there?": ("7", "seven"),
    # the later evaluation prompts with one right answer (QA asks at most the first 24 questions: ``QAPolicy``)
    "What is the tallest mountain in the world?": ("Everest",),
    "How many sides does a hexagon have?": ("6", "six"),
    "What is the freezing point of water in Fahrenheit?": ("32", "thirty-two"),
    "What is the largest city in Japan?": ("Tokyo",),
    "What instrument has 88 keys?": ("piano",),
    "What language is spoken in Brazil?": ("Portuguese",),
}
#: how many questions there are (every one of ``KNOWN_ANSWERS``)
FACTS_SIZE = len(KNOWN_ANSWERS)
#: token budget of each greedy answer (the base's answers say their fact within it)
FACT_MAX_NEW_TOKENS = 48
#: the reason code of a candidate that lost too many of the base's right answers
GENERAL_FACTS_LOST = "general-facts-lost"


def fact_prompts(size: int = FACTS_SIZE) -> list[str]:
    """The first ``size`` questions with known answers, in ``EVAL_PROMPTS`` order."""
    return [p for p in EVAL_PROMPTS if p in KNOWN_ANSWERS][:size]


def says_answer(prompt: str, answer: str) -> bool:
    """Whether ``answer`` says one of the known answers to ``prompt`` (the rule in the module docstring)."""
    return any(
        re.search(rf"(?<![\w.]){re.escape(form)}(?!\w|\.\d*[1-9])", answer, re.IGNORECASE)
        for form in KNOWN_ANSWERS[prompt]
    )


@dataclass(frozen=True)
class FactsKept:
    """Of the questions the base answered right (``base_right``), those the candidate still answers right."""

    asked: int
    base_right: tuple[str, ...]
    kept: tuple[str, ...]
    #: the questions it lost, with the candidate's answer
    lost: tuple[tuple[str, str], ...]

    @property
    def share(self) -> float:
        """Kept over the base's right answers; 1.0 when the base has none right (nothing to keep)."""
        return len(self.kept) / len(self.base_right) if self.base_right else 1.0


def answers_kept(answers: Answers, limit: int | None = None) -> FactsKept:
    """:func:`facts_kept` of a QA matrix's general answers (``Answers.general``: the base's and the subject's), the
    first ``limit`` of them (None: all)."""
    general = answers.general[:limit]
    return facts_kept(
        {item.prompt: item.outputs.get(BASE, "") for item in general},
        {item.prompt: item.outputs.get(answers.subject, "") for item in general},
    )


def facts_kept(base: Mapping[str, str], candidate: Mapping[str, str]) -> FactsKept:
    """Compare the base's and the candidate's answers (``prompt -> answer``; prompts of ``KNOWN_ANSWERS``)."""
    prompts: Sequence[str] = [p for p in base if p in KNOWN_ANSWERS]
    right = tuple(p for p in prompts if says_answer(p, base[p]))
    kept = tuple(p for p in right if says_answer(p, candidate.get(p, "")))
    lost = tuple((p, candidate.get(p, "")) for p in right if p not in kept)
    return FactsKept(len(prompts), right, kept, lost)


__all__ = [
    "FACTS_SIZE",
    "FACT_MAX_NEW_TOKENS",
    "GENERAL_FACTS_LOST",
    "KNOWN_ANSWERS",
    "FactsKept",
    "answers_kept",
    "fact_prompts",
    "facts_kept",
    "says_answer",
]
